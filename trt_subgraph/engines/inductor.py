"""The inductor engine: one inductor compilation per unique subgraph, weights as runtime inputs.

Weights stay graph inputs, so one compiled artifact serves every instance and is never stale:
each call reads whatever the instance's parameters hold now. Artifacts persist through
``standalone_compile``'s binary format.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

from .. import _compat
from ..sparse import runtime as sparse_runtime
from ..sparse.analysis import analyze_weight
from .base import SYMINT, CanonicalSubgraph, Engine


class InductorEngine(Engine):
    name = "inductor"
    persistable = True
    sparse_weights = True
    supports_sparse_linears = True

    def __init__(self, *, torch_executed_ops: frozenset[str] = frozenset(), sparse: bool = False) -> None:
        super().__init__(torch_executed_ops=torch_executed_ops)
        self.sparse = sparse

    def weight_variant(self, weight: torch.Tensor) -> str | None:
        """Whether a linear weight is 2:4 where cuSPARSELt runs: the pipeline then may route it there."""
        if not self.sparse or weight.dim() != 2 or weight.dtype not in sparse_runtime.CSLT_DTYPES:
            return None
        if sparse_runtime.unavailable_reason(weight.device) is not None:
            return None
        return "2:4" if analyze_weight(weight, kind="linear").pattern_ok else "dense"

    def codegen_key(self, sub: CanonicalSubgraph) -> dict[str, Any]:
        """CPU kernels are generated for one vector ISA and compiled by the local C++ compiler;
        GPU kernels by Triton (the GPU's compute capability is in the device key already)."""
        devices = {v.device.type for v in sub.example_inputs if isinstance(v, torch.Tensor)}
        key: dict[str, Any] = {}
        if "cpu" in devices:
            key["cpu"] = _compat.cpu_codegen_key()
        if "cuda" in devices:
            key["cuda"] = {"cuda": torch.version.cuda, "triton": _version_of("triton")}
        return key

    def settings(self) -> dict[str, Any]:
        return {"engine": self.name, "inductor_config": _compat.inductor_config_key()}

    def build(self, sub: CanonicalSubgraph, weights: list[torch.Tensor]) -> Any:
        dynamic = any(kind == SYMINT for kind in sub.input_kinds) or any(
            isinstance(v, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in v.shape)
            for v in sub.example_inputs
        )
        return _compat.standalone_compile(sub.gm, sub.example_inputs, dynamic=dynamic)

    def serialize(self, artifact: Any) -> bytes | None:
        with tempfile.TemporaryDirectory(prefix="trt_subgraph_") as tmp:
            path = os.path.join(tmp, "artifact.bin")
            artifact.save(path=path, format="binary")
            with open(path, "rb") as f:
                return f.read()

    def deserialize(self, payload: bytes, sub: CanonicalSubgraph) -> Any:
        with tempfile.TemporaryDirectory(prefix="trt_subgraph_") as tmp:
            path = os.path.join(tmp, "artifact.bin")
            with open(path, "wb") as f:
                f.write(payload)
            return _compat.load_compiled_artifact(path)

    def bind(self, artifact: Any, sub: CanonicalSubgraph) -> Callable[..., tuple]:
        return artifact


def _version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
