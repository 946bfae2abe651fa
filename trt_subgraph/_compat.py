"""Every private or non-backward-compatible torch API that trt_subgraph uses, in one place.

PyTorch renames and moves these between minor versions (``cache_size_limit`` became
``recompile_limit``, modules disappear), so each one is imported here, behind a feature
probe where it is known to move, and nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from typing import Any

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.registry import lookup_backend
from torch._functorch.aot_autograd import make_boxed_func
from torch._guards import detect_fake_mode
from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket
from torch.fx.experimental.proxy_tensor import unset_fake_temporarily
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase
from torch.fx.passes.tools_common import stable_topological_sort
from torch.fx.passes.utils.fuser_utils import erase_nodes, fuse_as_graphmodule
from torch.fx.passes.utils.fuser_utils import insert_subgm as _insert_subgm
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = [
    "CapabilityBasedPartitioner",
    "HigherOrderOperator",
    "OpOverload",
    "OpOverloadPacket",
    "OperatorSupportBase",
    "StorageWeakRef",
    "aot_autograd",
    "cslt_available",
    "cslt_compress",
    "detect_fake_mode",
    "erase_nodes",
    "fuse_as_graphmodule",
    "inductor_compile_fx",
    "insert_subgm",
    "invoke_subgraph_op",
    "load_compiled_artifact",
    "make_boxed_func",
    "stable_topological_sort",
    "standalone_compile",
    "symbol_range",
    "tracing_with_fake_mode",
    "unset_fake_temporarily",
    "version_counter",
]


_INSERT_TAKES_POINT = "insertion_point" in inspect.signature(_insert_subgm).parameters


def insert_subgm(gm, sub_gm, orig_inputs, orig_outputs, insertion_point) -> Any:
    """torch >= 2.13 takes an insertion point; older versions insert after the last output
    (the caller re-sorts the graph topologically afterwards either way)."""
    if _INSERT_TAKES_POINT:
        return _insert_subgm(gm, sub_gm, orig_inputs, orig_outputs, insertion_point)
    return _insert_subgm(gm, sub_gm, orig_inputs, orig_outputs)


def inductor_compile_fx(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
    """Inductor's own differentiable compile, used for the training path."""
    return lookup_backend("inductor")(gm, example_inputs)


def standalone_compile(gm: torch.fx.GraphModule, example_inputs: list, dynamic: bool) -> Any:
    """Compile one ATen subgraph with inductor into a saveable artifact (torch >= 2.8)."""
    from torch._inductor import standalone_compile as _standalone_compile

    return _standalone_compile(
        gm,
        example_inputs,
        dynamic_shapes="from_example_inputs" if dynamic else "from_graph",
    )


def _without_starting_inductor_pool() -> Any:
    """Load Triton kernels in this process unless inductor's worker pool already runs.

    Inductor starts its compile-worker pool (one process per core, each importing torch) at the
    first kernel it meets, even one that only needs loading from the cache that the artifact
    restored. A load compiles nothing, so the workers would only compete for the CPU. Builds
    keep the pool: with 10 unique regions (ResNet) it pays (benchmarks/RESULTS.md).
    ``TORCHINDUCTOR_COMPILE_THREADS`` set by the user wins.
    """
    from torch._inductor import config

    if os.environ.get("TORCHINDUCTOR_COMPILE_THREADS") or inductor_pool_started():
        return contextlib.nullcontext()
    return config.patch(compile_threads=1)


def inductor_pool_started() -> bool:
    """Whether inductor's compile-worker pool was started in this process."""
    from torch._inductor import async_compile

    return bool(getattr(async_compile, "_pool_set", None))


def load_compiled_artifact(path: str) -> Any:
    from torch._inductor import CompiledArtifact

    with _without_starting_inductor_pool():
        return CompiledArtifact.load(path=path, format="binary")


def tracing_with_fake_mode(inputs: list) -> Any:
    """A fresh TracingContext on the fake mode in use, so a nested aot_autograd call (one
    region of a Dynamo graph) neither reads nor overwrites the outer graph's context."""
    from torch._guards import TracingContext, tracing

    fake_mode = detect_fake_mode(inputs)
    return tracing(TracingContext(fake_mode)) if fake_mode is not None else contextlib.nullcontext()


def invoke_subgraph_op() -> Any:
    """The higher-order op that ``torch.compiler.nested_compile_region`` produces, if any."""
    higher_order = getattr(torch.ops, "higher_order", None)
    return getattr(higher_order, "invoke_subgraph", None) if higher_order else None


def symbol_range(shape_env: Any, symbol: Any) -> tuple[int, int | None]:
    """(lower, upper) value range of a size symbol; upper None when unbounded."""
    bounds = (getattr(shape_env, "var_to_range", None) or {}).get(symbol)
    if bounds is None:
        return (0, None)

    def as_int(bound: Any) -> int | None:
        if not getattr(bound, "is_finite", True):
            return None
        try:
            return int(bound)
        except (TypeError, ValueError, OverflowError, AttributeError):
            return None

    return (as_int(bounds.lower) or 0, as_int(bounds.upper))


def cslt_available() -> bool:
    """cuSPARSELt 2:4 kernels (the CUTLASS path refuses sm90, so only this one is used)."""
    backend = getattr(torch.backends, "cusparselt", None)
    return bool(backend is not None and backend.is_available() and hasattr(torch, "_cslt_compress"))


def cslt_compress(weight: torch.Tensor) -> torch.Tensor:
    return torch._cslt_compress(weight)


def version_counter(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter (``_version``): bumped by every in-place write
    through the tensor itself (not by writes through ``.data``)."""
    return tensor._version


def cpu_codegen_key() -> dict[str, str]:
    """What inductor's CPU code depends on beyond its config: the vector instruction set it
    generates for (``ATEN_CPU_CAPABILITY`` and ``config.cpp.simdlen`` pick it, e.g. ``avx512``,
    ``avx2``, ``INVALID_VEC_ISA`` for scalar code) and the C++ compiler with its version.

    An artifact generated for AVX-512 and loaded where inductor picks AVX2 computes garbage
    without an error, so all three belong in every CPU cache key.
    """
    import platform

    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {"arch": platform.machine(), "vec_isa": str(pick_vec_isa()), "compiler": _cpp_compiler()}


@functools.cache
def _cpp_compiler() -> str:
    """The C++ compiler inductor runs and its version banner (one subprocess per process)."""
    from torch._inductor import cpp_builder

    compiler = cpp_builder.get_cpp_compiler()
    version = getattr(cpp_builder, "get_compiler_version_info", lambda _: "")(compiler)
    return f"{compiler} {version}"


def inductor_config_key() -> str:
    """A stable digest of inductor's portable config: a changed setting is a changed artifact."""
    import xxhash
    from torch._inductor import config

    save = getattr(config, "save_config_portable", None)
    settings = save() if save else {}
    text = "\n".join(f"{k}={settings[k]!r}" for k in sorted(settings))
    return xxhash.xxh3_64_hexdigest(text.encode())


def raise_recompile_limit(limit: int) -> None:
    """Raise Dynamo's per-code-object recompile limit (``cache_size_limit`` before torch 2.7)."""
    import torch._dynamo.config as config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))
            return
