"""The engine protocol: build once per canonical subgraph, bind per instance, run.

An engine never sees module paths or node names, only a :class:`CanonicalSubgraph`, so the
artifact it builds for one block is valid for every structurally identical block.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.fx

from .._compat import OpOverload
from ..fx_utils import placeholders

WEIGHT, ACTIVATION, SYMINT = "weight", "activation", "symint"

#: The ``meta["custom"]`` key that marks a Dynamo node whose op ``torch_executed_ops`` names and
#: tracing decomposes (``aten.linear``); tracing copies it onto every ATen node traced from it.
TORCH_EXECUTED = "trt_subgraph.torch_executed"


@dataclasses.dataclass(frozen=True)
class CanonicalSubgraph:
    """A subgraph in canonical form: placeholders ``in_i``, nodes ``n_j``, meta ``val`` only."""

    gm: torch.fx.GraphModule
    input_kinds: tuple[str, ...]
    fingerprint: str

    @property
    def placeholders(self) -> list[torch.fx.Node]:
        return placeholders(self.gm)

    @property
    def example_inputs(self) -> list[Any]:
        return [n.meta["val"] for n in self.placeholders]

    @property
    def weight_positions(self) -> list[int]:
        return [i for i, kind in enumerate(self.input_kinds) if kind == WEIGHT]

    @property
    def num_ops(self) -> int:
        return sum(1 for n in self.gm.graph.nodes if n.op == "call_function")


class Engine(abc.ABC):
    """Turns canonical subgraphs into runnable artifacts.

    The pipeline asks an engine what it can do through the capability attributes below, never
    by its ``name`` (which is for reports, logs and cache entries).
    """

    name: ClassVar[str]
    namespaces: ClassVar[tuple[str, ...]] = ("aten", "prims", "trt_subgraph")

    #: Artifacts can be kept in the disk cache (``serialize`` returns bytes). When False the
    #: disk cache is not consulted for this engine at all.
    persistable: ClassVar[bool] = False
    #: ``build`` needs the canonical subgraph only (it ignores ``weights``), so it can run in a
    #: worker process that returns the ``serialize``d artifact (``trt_subgraph.workers``).
    #: Requires ``persistable``.
    builds_in_workers: ClassVar[bool] = False
    #: Builds 2:4 sparse kernels where a weight is 2:4; the constructor then takes ``sparse``
    #: (whether it may), which the ``sparsity`` option sets.
    sparse_weights: ClassVar[bool] = False
    #: Compiles ``trt_subgraph::sparse_linear`` (cuSPARSELt), so the pipeline may route 2:4
    #: linears (and 1x1 convolutions, linears over channels) through that op before the pieces
    #: reach the engine.
    supports_sparse_linears: ClassVar[bool] = False
    #: How graphs that need gradients run, since engines are inference-only: ``"inductor"``
    #: (its differentiable compile) or ``"eager"`` (the Dynamo graph as it is).
    differentiable_fallback: ClassVar[str] = "inductor"
    #: Takes activations in the layout they arrive in and returns outputs with the strides of
    #: the subgraph's metadata, so a graph made channels-last (option ``memory_format``) needs
    #: no copies between pieces. Engines that take contiguous tensors leave this False.
    keeps_layout: ClassVar[bool] = False

    def __init__(self, *, torch_executed_ops: frozenset[str] = frozenset()) -> None:
        self.torch_executed_ops = torch_executed_ops

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this engine can run here, else what is missing."""
        return None

    def settings(self) -> dict[str, Any]:
        """Everything besides the subgraph that changes the artifact: part of every cache key."""
        return {"engine": self.name}

    def codegen_key(self, sub: CanonicalSubgraph) -> dict[str, Any]:
        """What of this machine the generated code depends on beyond torch's version and the
        device (instruction set, compiler): part of every cache key."""
        return {}

    def weight_variant(self, weight: torch.Tensor) -> str | None:
        """What in this weight's values changes the code built for it (None: nothing does).

        Shapes and dtypes are in every key already; this is for value-dependent choices such as
        2:4 sparse kernels. Instances whose weights differ here never share a region or artifact.
        """
        return None

    def is_node_supported(self, node: torch.fx.Node) -> bool:
        """ATen, prims and trt_subgraph's own ops; other custom ops and ``torch_executed_ops`` run in PyTorch."""
        if node.target is operator.getitem:
            return True
        if not isinstance(node.target, OpOverload) or node.target.namespace not in self.namespaces:
            return False
        return not self.torch_executed(node)

    def torch_executed(self, node: torch.fx.Node) -> bool:
        """Whether the ``torch_executed_ops`` option keeps this ATen node in PyTorch: it names the
        node's op, or the op that tracing decomposed into this node (see :data:`TORCH_EXECUTED`)."""
        if not isinstance(node.target, OpOverload):
            return False
        names = {str(node.target), str(node.target.overloadpacket)}
        custom = node.meta.get("custom")
        if isinstance(custom, dict) and TORCH_EXECUTED in custom:
            names.add(custom[TORCH_EXECUTED])
        return bool(names & self.torch_executed_ops)

    @abc.abstractmethod
    def build(self, sub: CanonicalSubgraph, weights: list[torch.Tensor]) -> Any:
        """Build the artifact once per fingerprint (``weights``: the first instance's)."""

    def serialize(self, artifact: Any) -> bytes | None:
        """Bytes for the disk cache, or None when this artifact cannot be persisted (only
        called when ``persistable``)."""
        return None

    def start_setup(self, device_types: list[str]) -> None:
        """Start, in threads, the one-time set-up of this process that loading artifacts for
        `device_types` (``"cpu"``, ``"cuda"``) needs; :meth:`loading` waits for it (default: no
        set-up). Called before loads only: beside a build, threads contend with it for the GIL."""
        return None

    def saved_extras(self, device_types: list[str]) -> Any:
        """What a saved function of this engine carries besides its artifacts: what this process
        made for the machine that a load in a new process would otherwise make again (default:
        None). Must pickle."""
        return None

    def restore_saved_extras(self, extras: Any) -> None:
        """Put back the :meth:`saved_extras` of a saved function, before any cache key is made
        for it (default: nothing)."""
        return None

    def loads_concurrently(self) -> bool:
        """Whether ``deserialize`` may run in several threads at once (inside :meth:`loading`)."""
        return False

    def loading(self) -> contextlib.AbstractContextManager:
        """A context held around a batch of ``deserialize`` calls."""
        return contextlib.nullcontext()

    def attach_disk_cache(self, disk: Any) -> None:
        """Called with the disk cache (a ``trt_subgraph.cache.DiskCache``) that keeps this
        engine's artifacts, before any key is made for it: an engine may keep and restore there
        what it needs per machine besides its artifacts. Only called when ``persistable``."""
        return None

    def deserialize(self, payload: bytes, sub: CanonicalSubgraph) -> Any:
        raise NotImplementedError(f"{self.name} artifacts are not persisted")

    @abc.abstractmethod
    def bind(self, artifact: Any, sub: CanonicalSubgraph) -> Callable[..., tuple]:
        """A runner for one instance; it takes every placeholder input, weights included."""


def op_name(target: Any) -> str:
    """``aten.addmm.default`` for an OpOverload; the qualified name for anything else."""
    if isinstance(target, OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return f"{module}.{name}" if module else name


def device_types(inputs: Sequence[Any]) -> list[str]:
    """The device types of the tensors among `inputs` (a graph's, or a subgraph's), sorted."""
    return sorted({x.device.type for x in inputs if isinstance(x, torch.Tensor)})
