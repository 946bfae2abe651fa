"""Every private or non-backward-compatible torch API that trt_subgraph uses, in one place.

PyTorch renames and moves these between minor versions (``cache_size_limit`` became
``recompile_limit``, modules disappear), so each one is imported here, behind a feature
probe where it is known to move, and nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
import re
import tempfile
import threading
import types
import uuid
from collections.abc import Callable, Iterator
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
from torch.fx.passes.utils.fuser_utils import erase_nodes, fuse_as_graphmodule
from torch.fx.passes.utils.fuser_utils import insert_subgm as _insert_subgm
from torch.multiprocessing.reductions import StorageWeakRef

log = logging.getLogger(__name__)

try:  # torch >= 2.10
    from torch.fx.passes.tools_common import stable_topological_sort
except ImportError:  # torch 2.8 and 2.9: only inductor's, which sorts a Graph in place

    def stable_topological_sort(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """Put `gm`'s nodes in an order where each comes after its inputs, moving as few as
        possible (in place; returns `gm`)."""
        from torch._inductor.pattern_matcher import stable_topological_sort as sort_graph

        sort_graph(gm.graph)
        return gm


__all__ = [
    "CapabilityBasedPartitioner",
    "HigherOrderOperator",
    "OpOverload",
    "OpOverloadPacket",
    "OperatorSupportBase",
    "StorageWeakRef",
    "any_autocast_enabled",
    "aot_artifacts",
    "aot_autograd",
    "aot_compiled_backend_result",
    "aot_graph_metadata",
    "aot_input_origin",
    "apply_compile_settings",
    "autocast_calls",
    "autocast_disabled",
    "compile_settings",
    "create_size_symbol",
    "cslt_available",
    "cslt_compress",
    "custom_meta_reaches_aten_nodes",
    "decomposed_while_tracing",
    "detect_fake_mode",
    "dynamo_static_input",
    "erase_nodes",
    "expression_range",
    "fp32_precision_in_effect",
    "fresh_shape_env",
    "fuse_as_graphmodule",
    "graph_pickle",
    "graph_unpickle",
    "guards_checker",
    "guards_expression",
    "harmless_calls",
    "has_aot_input_descriptors",
    "import_inductor",
    "inductor_compile_fx",
    "inductor_file_name",
    "insert_subgm",
    "invoke_subgraph_op",
    "is_traceable_wrapper_subclass",
    "load_compiled_artifact",
    "loading_artifacts",
    "lowering_not_pinned",
    "make_boxed_func",
    "marked_cacheable_functions",
    "new_fake_mode",
    "pick_vec_isa_recording_checks",
    "process_state",
    "recording_cpu_kernels",
    "restore_inductor_files",
    "serializable_callable_base",
    "set_grad_enabled_call",
    "stable_topological_sort",
    "standalone_compile",
    "symbol_hint",
    "symbol_range",
    "tracing_with_fake_mode",
    "unset_fake_temporarily",
    "vec_isa_checks_key",
    "vec_isa_picked",
    "version_counter",
    "vmap_scope_calls",
    "without_aot_autograd_cache",
    "without_header_precompiling",
    "writes_an_argument",
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


def standalone_compile(gm: torch.fx.GraphModule, example_inputs: list, fake_mode: Any = None) -> Any:
    """Compile one ATen subgraph with inductor into a saveable artifact (torch >= 2.8).

    `fake_mode`: the FakeTensorMode (with its own ShapeEnv) of symbolic `example_inputs`; the
    compile then reasons about their size symbols there. ``dynamic_shapes="from_tracing_context"``
    inside a TracingContext of that mode exists in torch 2.8 to 2.13 (a ``fake_mode`` argument
    does not before 2.12); None: static example inputs, real ones compiled ``"from_graph"``, fake
    ones copied into a fresh fake mode first (see below).

    Triton kernels autotune at their first run, on the real inputs, as under ``torch.compile``:
    ``standalone_compile`` turns on ``triton.autotune_at_compile_time``, which benchmarks each
    kernel's configs during the compile on generated inputs, beside the graph's other builds.
    Measured on an H200 (torch 2.11), the configs it picked for the pointwise kernels of
    repeated blocks ran up to 30% slower than those picked at the first run (benchmarks/
    RESULTS.md, *Compile time, kernel tuning and 2:4 convolutions*). ``config_patches`` apply
    inside that setting (`compile_fx`), so they turn it off again.
    """
    from torch._guards import TracingContext, tracing
    from torch._inductor import standalone_compile as _standalone_compile
    from torch._subclasses.fake_tensor import FakeTensor

    on_cpu = any(isinstance(x, torch.Tensor) and x.device.type == "cpu" for x in example_inputs)
    aot = {"aot": True} if aot_artifacts() else {}
    options = {"config_patches": {"triton.autotune_at_compile_time": False}}
    # Only symbolic compiles keep out of inductor's caches: a static compile's code is right for
    # whatever compile its cache key matches, and a key of its own would also key its kernels'
    # autotuning results, so that no other process ever found them.
    own_cache_keys = _unshared_inductor_cache_keys() if fake_mode is not None else contextlib.nullcontext()
    if fake_mode is None and any(isinstance(x, FakeTensor) for x in example_inputs):
        # Static fake inputs of another fake mode (the caller's aot_autograd trace): torch 2.13
        # copies them into the fresh mode that "from_graph" compiles in; 2.8 to 2.10 assert that
        # they are of that mode. So they are copied into a fresh mode here, on every version.
        fake_mode = new_fake_mode()  # with a ShapeEnv: aot_autograd saves no artifact without one
        with unset_fake_temporarily():
            example_inputs = [
                fake_mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x
                for x in example_inputs
            ]
    # No fake mode of the caller's stays active: torch 2.8 to 2.10 assert that an active one is
    # the compile's own.
    with pinned_cpu_vec_isa() if on_cpu else contextlib.nullcontext(), unset_fake_temporarily():
        if fake_mode is None:
            return _standalone_compile(gm, example_inputs, dynamic_shapes="from_graph", options=options, **aot)
        with tracing(TracingContext(fake_mode)), own_cache_keys:
            return _standalone_compile(
                gm, example_inputs, dynamic_shapes="from_tracing_context", options=options, **aot
            )


@contextlib.contextmanager
def _unshared_inductor_cache_keys() -> Iterator[None]:
    """For a compile on symbolic sizes: keys of inductor's own caches (FX graph, AOTAutograd)
    that no other compile has, so neither serves it. A hit there returns another compile's code
    without adding the size guards that code assumed to this compile's ShapeEnv: the artifact
    would run unguarded on sizes it is wrong for. trt_subgraph's cache keeps every artifact with
    its guards. ``torch.compiler.config.cache_key_tag`` enters both keys (torch >= 2.7); where it
    is missing, both caches are off for the compile (its artifact then cannot be saved)."""
    from torch.compiler import config as compiler_config

    if hasattr(compiler_config, "cache_key_tag"):
        with compiler_config.patch(cache_key_tag=f"trt_subgraph symbolic build {uuid.uuid4().hex}"):
            yield
        return
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with functorch_config.patch(enable_autograd_cache=False), inductor_config.patch(fx_graph_cache=False):
        yield


@functools.cache
def aot_artifacts() -> bool:
    """Whether ``standalone_compile`` makes AOTCompiledArtifacts (``aot=True``, torch >= 2.10):
    one bundled callable whose saved bytes load in memory, with no write into inductor's caches
    and no cache lookup, so several of them may load at once (threads)."""
    from torch._inductor import standalone_compile as _standalone_compile

    return "aot" in inspect.signature(_standalone_compile).parameters


def fresh_shape_env() -> tuple[Any, Any]:
    """(FakeTensorMode, ShapeEnv): a new ShapeEnv that neither duck-sizes (equal sizes stay
    distinct symbols) nor specializes sizes 0 and 1, and a fake mode on it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    shape_env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
    return FakeTensorMode(shape_env=shape_env), shape_env


def create_size_symbol(shape_env: Any, name: str, hint: int, bounds: Any) -> Any:
    """A new backed size symbol `name` in `shape_env`: value `hint` for decisions that do not
    guard, value range `bounds` (a ValueRanges, as another ShapeEnv's ``var_to_range`` holds)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    symbol = shape_env.create_symbol(
        hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC, do_not_specialize_zero_one=True
    )
    shape_env.constrain_symbol_range(symbol, bounds.lower, bounds.upper)
    return symbol


def expression_range(expr: Any, shape_env: Any) -> Any:
    """The value range (a ValueRanges) of a size expression over `shape_env`'s symbols, from
    their ranges (``torch.utils._sympy.value_ranges.bound_sympy``)."""
    from torch.utils._sympy.value_ranges import bound_sympy

    return bound_sympy(expr, {symbol: shape_env.var_to_range[symbol] for symbol in expr.free_symbols})


def symbol_hint(shape_env: Any, symbol: Any) -> int | None:
    """The value a backed size symbol had when it was created; None for an unbacked symbol
    (``backed_var_to_val`` from torch 2.11, ``var_to_val`` before)."""
    values = getattr(shape_env, "backed_var_to_val", None)
    if values is None:
        values = shape_env.var_to_val
    value = values.get(symbol)
    return int(value) if value is not None else None


def guards_expression(shape_env: Any, placeholders: list) -> str | None:
    """Every condition `shape_env` holds about the sizes of `placeholders` (fake tensors and
    SymInts), as one Python expression over ``L['t0']``, ``L['t1']``, ... (None: no condition)."""
    return shape_env.produce_guards_expression(placeholders)


def guards_checker(expression: str) -> Callable[[list], bool]:
    """A function of the real values of the placeholders that evaluates a
    :func:`guards_expression`; compiled once."""
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    code = compile(expression, "<trt_subgraph guards>", "eval")

    def check(args: list) -> bool:
        return bool(eval(code, SYMPY_INTERP, {"L": {f"t{i}": a for i, a in enumerate(args)}}))

    return check


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


def loading_artifacts() -> Any:
    """The context to hold around a batch of :func:`load_compiled_artifact` calls, concurrent
    ones included: inductor's compile-worker pool stays unstarted (see
    ``_without_starting_inductor_pool``), and a load's own patch of the same setting then neither
    changes nor restores another value. Entering it waits for :func:`start_inductor_setup`'s
    threads, whose values every load reads."""
    wait_inductor_setup()
    return _without_starting_inductor_pool()


_LEGACY_LOADS = threading.Lock()


def load_compiled_artifact(path: str) -> Any:
    """Load an artifact saved in ``standalone_compile``'s binary format; safe from several
    threads at once. An AOTCompiledArtifact (torch >= 2.10) loads in memory; the older format
    writes into inductor's caches while loading, so those load one at a time."""
    from torch._inductor import CompiledArtifact

    with _without_starting_inductor_pool(), contextlib.nullcontext() if _is_aot_file(path) else _LEGACY_LOADS:
        return CompiledArtifact.load(path=path, format="binary")


def _is_aot_file(path: str) -> bool:
    """Whether a saved artifact starts with AOTCompiledArtifact's header (torch >= 2.10)."""
    try:
        from torch._inductor.standalone_compile import AOTCompiledArtifact
        from torch.utils._appending_byte_serializer import BytesReader

        with open(path, "rb") as f:
            head = f.read(64)
        return BytesReader(head).read_bytes() == AOTCompiledArtifact.AOT_HEADER
    except Exception:  # no such class (torch < 2.10), unreadable or short file: the older format
        return False


def import_inductor() -> None:
    """Import what every inductor build needs (a worker does this before its first build)."""
    import torch._inductor.codecache
    import torch._inductor.compile_fx
    import torch._inductor.standalone_compile  # noqa: F401


_SETUP_LOCK = threading.Lock()
_SETUP: dict[str, threading.Thread] = {}


def start_inductor_setup(cuda: bool) -> None:
    """Start computing, in background threads, the values that inductor's first build or
    artifact load in a process computes one after another: the hash of torch's sources
    (``torch_key``, 0.1-0.2 s) and, with `cuda`, the hash of Triton's (``triton_key``, 0.4 s)
    and Triton's CUDA driver, whose first use compiles a C module when Triton's cache is empty
    (0.4 s). The three overlap each other where the caller waits for them
    (:func:`wait_inductor_setup`), as a batch of loads does: a saved encoder loaded in 0.6 s
    instead of 1.3 s (the times are a load's profile on an H200, torch 2.11, Triton 3.6). Not
    for a process about to build: there the hashing threads and the lowering contend for the
    GIL (torch's hash took 1.6-1.9 s instead of 0.1 s). Once per process; a failure leaves the
    work to its first user, which raises as it would have; so does a torch or Triton without
    these functions."""
    try:
        _start_inductor_setup(cuda)
    except Exception as exc:  # ImportError where a release moved them
        log.debug("trt_subgraph: inductor set-up not started: %s", exc)


def _start_inductor_setup(cuda: bool) -> None:
    with _SETUP_LOCK:
        if "torch" not in _SETUP:
            from torch._inductor.codecache import torch_key

            _SETUP["torch"] = _setup_thread(torch_key)
        if cuda and "triton" not in _SETUP and torch.cuda.is_available():
            from torch.utils._triton import has_triton_package

            if has_triton_package():
                # imported here, in the caller's thread: the threads then import nothing that the
                # caller may be importing at the same time
                import triton.compiler.compiler
                import triton.runtime.driver  # noqa: F401
                from torch._inductor.runtime.triton_compat import triton_key
                from torch.utils._triton import triton_backend, triton_hash_with_backend

                source = _SETUP["triton"] = _setup_thread(triton_key)

                def driver() -> None:
                    triton_backend()
                    source.join()
                    triton_hash_with_backend()

                _SETUP["driver"] = _setup_thread(driver)


def _setup_thread(job: Callable[[], Any]) -> threading.Thread:
    def run() -> None:
        try:
            job()
        except Exception as exc:
            log.debug("trt_subgraph: inductor set-up %s failed: %s", job.__name__, exc)

    thread = threading.Thread(target=run, daemon=True, name="trt_subgraph-setup")
    thread.start()
    return thread


def wait_inductor_setup(timeout_s: float = 60.0) -> None:
    """Wait for what :func:`start_inductor_setup` started (at most `timeout_s` seconds each):
    a caller that needs those values then reads them, instead of computing them a second time
    beside the thread that is computing them."""
    for thread in list(_SETUP.values()):
        thread.join(timeout_s)


def compile_settings() -> dict[str, Any]:
    """Everything in this process besides the graph that changes what inductor generates, to
    build elsewhere exactly as here: inductor's and aot_autograd's configs (pickled) and
    :func:`process_state`. Raises when a config holds something that does not pickle."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    return {
        "inductor": inductor_config.save_config(),
        "functorch": functorch_config.save_config(),
        "process": process_state(),
    }


def apply_compile_settings(settings: dict[str, Any]) -> None:
    """Make this process build as the one that took `settings` (:func:`compile_settings`), with
    inductor compiling its kernels here, one at a time (no compile pool of its own)."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    inductor_config.load_config(settings["inductor"])
    inductor_config.compile_threads = 1
    functorch_config.load_config(settings["functorch"])
    want, have = settings["process"], process_state()
    matmul = torch.backends.cuda.matmul
    if have["num_threads"] != want["num_threads"]:
        torch.set_num_threads(want["num_threads"])
    if have["default_dtype"] != want["default_dtype"]:
        torch.set_default_dtype(want["default_dtype"])
    if have["fp32_precision"] != want["fp32_precision"]:
        _set_fp32_precision(want["fp32_precision"])
    if have["deterministic"] != want["deterministic"]:
        enabled, warn_only, fill = want["deterministic"]
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    if have["reduced_precision"] != want["reduced_precision"]:
        fp16, bf16, fp16_accumulation = want["reduced_precision"]
        matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = fp16, bf16
        if fp16_accumulation is not None:
            matmul.allow_fp16_accumulation = fp16_accumulation


# torch's float32 precision settings (torch >= 2.9), (backend, op), each general one before the
# specific ones under it, since setting a general one sets those too. "tf32", "bf16" (oneDNN) or
# "ieee"; "none" defers to the general one. Besides them, and alone before them, the legacy
# switches: `set_float32_matmul_precision` and ``torch.backends.cudnn.allow_tf32``.
_FP32_PRECISIONS = (
    ("generic", "all"),
    ("cuda", "all"),
    ("cuda", "matmul"),
    ("cuda", "conv"),
    ("cuda", "rnn"),
    ("mkldnn", "all"),
    ("mkldnn", "matmul"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
)


def _fp32_precision() -> dict[str, Any]:
    """How float32 matmuls, convolutions and RNNs may round, on every backend this torch has."""

    def legacy(read: Callable[[], Any]) -> Any:
        try:
            return read()
        except RuntimeError:  # torch >= 2.9 refuses to answer once both APIs set different things
            return "mixed"

    found = {
        "legacy": {
            "matmul": legacy(torch.get_float32_matmul_precision),
            "cudnn_tf32": legacy(lambda: torch.backends.cudnn.allow_tf32),
        }
    }
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    for backend, op in _FP32_PRECISIONS if getter is not None else ():
        try:
            found[f"{backend}.{op}"] = getter(backend, op)
        except RuntimeError:  # a backend or op this torch does not have
            continue
    return found


def fp32_precision_in_effect(precision: dict[str, Any]) -> dict[str, Any]:
    """`process_state`'s ``fp32_precision`` as torch applies it: each op's own setting, else its
    backend's, else the generic one, and "none" left at all three is "ieee" (no rounding). Two
    states that compute alike give the same answer (``highest`` after ``high`` sets "ieee" where
    a fresh process has "none")."""
    found = {"legacy": precision["legacy"]}
    for name, own in precision.items():
        backend, _, op = name.partition(".")
        if name != "legacy" and op != "all":
            chain = (own, precision.get(f"{backend}.all", "none"), precision.get("generic.all", "none"))
            found[name] = next((value for value in chain if value != "none"), "ieee")
    return found


def _set_fp32_precision(want: dict[str, Any]) -> None:
    """Make `_fp32_precision` give `want` (where it says "mixed", as closely as torch allows)."""
    if want["legacy"]["matmul"] != "mixed":
        torch.set_float32_matmul_precision(want["legacy"]["matmul"])
    if want["legacy"]["cudnn_tf32"] != "mixed":
        torch.backends.cudnn.allow_tf32 = want["legacy"]["cudnn_tf32"]
    for name, value in want.items():  # general first: `_FP32_PRECISIONS`' order
        if name != "legacy":
            torch._C._set_fp32_precision_setter(*name.split("."), value)


def process_state() -> dict[str, Any]:
    """The process-wide settings that change what a build generates or the numbers it computes,
    beyond the compiler's config: what inductor's own cache keys hold (the CPU thread count, which
    C++ kernels specialize on; the default dtype; deterministic algorithms with their warn-only
    and fill-uninitialized-memory modes; reduced-precision reductions) and the float32 precision
    (TF32, bf16) of matmuls and of convolutions (cuDNN's TF32, which inductor's convolution
    templates read and its keys miss), with fp16 accumulation in cuBLAS (None where this torch has
    no such setting)."""
    matmul = torch.backends.cuda.matmul
    return {
        "num_threads": torch.get_num_threads(),
        "default_dtype": torch.get_default_dtype(),
        "fp32_precision": _fp32_precision(),
        "deterministic": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory,
        ),
        "reduced_precision": (
            matmul.allow_fp16_reduced_precision_reduction,
            matmul.allow_bf16_reduced_precision_reduction,
            getattr(matmul, "allow_fp16_accumulation", None),
        ),
    }


def tracing_with_fake_mode(inputs: list) -> Any:
    """A fresh TracingContext on the fake mode of the fake tensors among `inputs` (else the fake
    mode in use), so a nested aot_autograd call (one region of a Dynamo graph) neither reads nor
    overwrites the outer graph's context. Inside a backend, Dynamo's TracingContext holds a fake
    mode of its own, not the one of the graph's example values; torch 2.13 lets that context's
    mode win, torch 2.8 to 2.10 assert that both are one mode."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensor

    fake_mode = next((x.fake_mode for x in inputs if isinstance(x, FakeTensor)), None)
    if fake_mode is None:
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


def dynamo_static_input(placeholder: torch.fx.Node) -> bool:
    """Whether Dynamo marked the tensor of this graph input as having a static address, as it
    marks every parameter and buffer of the modules it traces (``mark_static_address``, also
    callable by users), read from the ``tensor_dict`` it keeps in the placeholder's meta (torch
    2.8 to 2.13; False where a torch keeps none)."""
    return (placeholder.meta.get("tensor_dict") or {}).get("_dynamo_static_input_type") is not None


def version_counter(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter (``_version``): bumped by every in-place write
    through the tensor itself (not by writes through ``.data``)."""
    return tensor._version


def version_counters(tensors: list[torch.Tensor]) -> list[int]:
    """:func:`version_counter` of each of `tensors` (a per-call check of many weights, without
    a function call per tensor)."""
    return [t._version for t in tensors]


def cpu_codegen_key() -> dict[str, str]:
    """What inductor's CPU code depends on beyond its config: the vector instruction set it
    generates for (``ATEN_CPU_CAPABILITY`` and ``config.cpp.simdlen`` pick it, e.g. ``avx512``,
    ``avx2``, ``INVALID_VEC_ISA`` for scalar code) and the C++ compiler with its version.

    An artifact generated for AVX-512 and loaded where inductor picks AVX2 computes garbage
    without an error, so all three belong in every CPU cache key.
    """
    import platform

    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {"arch": platform.machine(), "vec_isa": str(pick_vec_isa()), "compiler": _cpp_compiler_identity()}


def pinned_cpu_vec_isa() -> Any:
    """A context in which inductor's own caches key on the CPU vector ISA.

    Inductor's FX-graph and AOTAutograd caches key on its config, but not on the ISA that
    ``ATEN_CPU_CAPABILITY`` selects: two processes sharing ``TORCHINDUCTOR_CACHE_DIR`` with
    different capabilities load each other's kernels (AVX-512 code run where AVX2 is picked gave
    NaN, torch 2.13). Pinning ``config.cpp.simdlen`` to the picked ISA's width (0 for scalar
    code) selects the same ISA and puts it in those keys. A user's own ``simdlen`` is kept.
    """
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if config.cpp.simdlen is not None:
        return contextlib.nullcontext()
    return config.patch({"cpp.simdlen": pick_vec_isa().bit_width()})


@functools.cache
def _cpp_compiler_banner() -> tuple[str, str]:
    """(the C++ compiler inductor runs, by the name it was given; its version banner): one
    subprocess per process."""
    from torch._inductor import cpp_builder

    compiler = cpp_builder.get_cpp_compiler()
    return compiler, getattr(cpp_builder, "get_compiler_version_info", lambda _: "")(compiler)


def _cpp_compiler() -> str:
    """The C++ compiler by its name and its version banner: what names inductor's vector-ISA
    check programs. Cache keys of generated code use :func:`_cpp_compiler_identity`."""
    compiler, version = _cpp_compiler_banner()
    return f"{compiler} {version}"


@functools.cache
def _cpp_compiler_identity() -> str:
    """The C++ compiler as a binary, whatever name reached it (``CXX=g++``, ``/usr/bin/g++``,
    ``c++``): its resolved path and its version banner without gcc's ``COLLECT_GCC=<the name it
    was run by>`` line, which differs for the same compiler."""
    import re
    import shutil

    compiler, version = _cpp_compiler_banner()
    found = shutil.which(compiler)
    version = re.sub(r"COLLECT_GCC=.*?_(?=COLLECT_LTO_WRAPPER=|Target: )", "", version)
    return f"{os.path.realpath(found) if found else compiler} {version}"


# Settings that change no artifact of trt_subgraph's, or not by their spelling:
# ``enable_autograd_for_aot``, which torch patches while ``load_compiled_function`` rebuilds a
# saved function (it concerns AOTInductor's packaged libraries, which standalone_compile does
# not make); ``cpp.cxx``, the C++ compiler by the name ``CXX`` gives it, which CPU keys hold as
# the binary it names (`_cpp_compiler_identity`) and which generates no GPU code.
_CONFIG_NOT_IN_KEY = ("enable_autograd_for_aot", "cpp.cxx")


def inductor_config_key() -> str:
    """A stable digest of inductor's portable config: a changed setting is a changed artifact."""
    import xxhash
    from torch._inductor import config

    save = getattr(config, "save_config_portable", None)
    settings = {k: v for k, v in (save() if save else {}).items() if k not in _CONFIG_NOT_IN_KEY}
    text = "\n".join(f"{k}={settings[k]!r}" for k in sorted(settings))
    return xxhash.xxh3_64_hexdigest(text.encode())


def aot_config_key() -> str:
    """A stable digest of aot_autograd's portable config (``torch._functorch.config``): how a
    graph is lowered to ATen (decompositions, view replay, partitioning) depends on it."""
    import xxhash
    from torch._functorch import config

    save = getattr(config, "save_config_portable", None)
    settings = save() if save else {}
    text = "\n".join(f"{k}={settings[k]!r}" for k in sorted(settings))
    return xxhash.xxh3_64_hexdigest(text.encode())


# Namespaces of torch's own ops: their decompositions change only with torch's version.
_TORCH_OP_NAMESPACES = frozenset({"aten", "prims", "rngprims", "quantized", "_quantized", "higher_order"})
# Higher-order ops that name a user's Triton kernel and its constant arguments by an index into
# a table of the process (``kernel_side_table``), not by their source or values.
_TRITON_KERNEL_CALLS = frozenset({"triton_kernel_wrapper_mutation", "triton_kernel_wrapper_functional"})


def is_user_triton_kernel_call(target: Any) -> bool:
    """Whether a node's target calls a user-defined Triton kernel (``triton_kernel_wrapper_*``)."""
    return isinstance(target, HigherOrderOperator) and target.name() in _TRITON_KERNEL_CALLS


def user_triton_kernel(kernel_idx: int, constant_args_idx: int) -> tuple[Any, str | None, dict[str, Any]]:
    """The user Triton kernel a ``triton_kernel_wrapper_*`` call names by indices into a table of
    this process: (the kernel object, what its code is or None, its constant arguments).

    What its code is: Triton's own hash of a ``triton.jit`` function (``JITFunction.cache_key``,
    over its source and the functions and globals it uses), with the configs of a
    ``triton.autotune`` around it as inductor's FX-graph cache key renders them
    (``FxGraphHashDetails.user_defined_triton_source``). None for other wrappers (heuristics):
    no hash of theirs covers the Python functions they call."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernel = kernel_side_table.get_kernel(kernel_idx)
    constants = dict(kernel_side_table.get_constant_args(constant_args_idx))
    jit, configs = kernel, ""
    if hasattr(jit, "configs") and hasattr(jit, "fn"):  # triton.runtime.autotuner.Autotuner
        configs = str(sorted(sorted(str(kv) for kv in c.all_kwargs().items()) for c in jit.configs))
        jit = jit.fn
    code = getattr(jit, "cache_key", None)
    return kernel, (f"{code} {configs}" if isinstance(code, str) else None), constants


def lowering_not_pinned(node: torch.fx.Node) -> str | None:
    """Why the text of the Dynamo graph that holds `node` does not determine its lowering, or
    None. AOTAutograd's own cache check (``check_node_safe``, in every torch this package
    supports) refuses a call of a Python function that Dynamo put in the graph by name
    (``torch._dynamo.allow_in_graph``): its code is traced into the lowering but is not in the
    graph, unless torch knows the function or it is marked in
    ``torch._inductor.config.unsafe_marked_cacheable_functions``. Functions of torch pass here
    even where that check refuses them (``torch.amp.autocast_mode._enter_autocast``): torch's
    version, in every key, pins their code; higher-order ops it refuses stay refused. An op
    outside torch's namespaces with a ``CompositeImplicitAutograd`` kernel is traced into the
    ops that kernel calls, which its name does not pin either; a user's Triton kernel is named
    by an index."""
    try:
        from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache, check_node_safe
    except ImportError:
        return "this torch has no AOTAutograd cacheability check"
    target = node.target
    try:
        check_node_safe(node)
    except BypassAOTAutogradCache as exc:
        if node.op != "call_function" or not callable(target) or isinstance(target, HigherOrderOperator):
            return str(exc).split("\n")[0].strip()
        module = getattr(target, "__module__", None) or ""
        if module != "torch" and not module.startswith("torch."):
            name = f"{module}.{getattr(target, '__qualname__', target)}"
            return f"it calls {name}, which Dynamo put in the graph untraced: the graph does not hold its code"
    if node.op != "call_function":
        return None
    if is_user_triton_kernel_call(target):
        return "it calls a user-defined Triton kernel, which the graph names by an index, not by its source"
    if isinstance(target, (OpOverload, OpOverloadPacket)) and str(target).split(".")[0] not in _TORCH_OP_NAMESPACES:
        overloads = [target] if isinstance(target, OpOverload) else [getattr(target, n) for n in target.overloads()]
        key = torch._C.DispatchKey.CompositeImplicitAutograd
        if any(op.has_kernel_for_dispatch_key(key) for op in overloads):
            return f"op {target} is traced into the ops its CompositeImplicitAutograd kernel calls"
    return None


def marked_cacheable_functions() -> dict[str, str]:
    """``torch._inductor.config.unsafe_marked_cacheable_functions`` ({} where this torch has no such setting):
    the functions a user marked cacheable, each with the hash that stands for its code."""
    from torch._inductor import config

    return dict(getattr(config, "unsafe_marked_cacheable_functions", {}))


def raise_recompile_limit(limit: int) -> None:
    """Raise Dynamo's per-code-object recompile limit (``cache_size_limit`` before torch 2.7)."""
    import torch._dynamo.config as config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))
            return


def aot_input_origin(placeholder: torch.fx.Node) -> tuple[int, tuple[str, ...]] | None:
    """Where an input of aot_autograd's ATen graph comes from, read from the descriptor that
    aot_autograd puts on each placeholder (``meta["desc"]``, torch >= 2.9): (position among the
    inputs aot_autograd was called with, attribute path into a tensor-subclass input that it
    flattened; ``()`` for the input itself). None for what aot_autograd made itself (the base it
    merges aliased inputs into, effect tokens, RNG state) and for module attributes it lifted.
    """
    try:
        from torch._functorch._aot_autograd.descriptors import PlainAOTInput, SubclassGetAttrAOTInput
    except ImportError:  # torch < 2.9: no descriptors
        return None
    desc = placeholder.meta.get("desc")
    attrs: list[str] = []
    while isinstance(desc, SubclassGetAttrAOTInput):
        attrs.append(desc.attr)
        desc = desc.base
    if isinstance(desc, PlainAOTInput):
        return desc.idx, tuple(reversed(attrs))
    return None


def has_aot_input_descriptors(gm: torch.fx.GraphModule) -> bool:
    """Whether aot_autograd described this graph's placeholders (torch >= 2.9)."""
    return any("desc" in n.meta for n in gm.graph.nodes if n.op == "placeholder")


def is_traceable_wrapper_subclass(value: Any) -> bool:
    """A tensor subclass that tracing flattens into inner tensors (``__tensor_flatten__``)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass as _is_subclass

    return _is_subclass(value)


# ---------------------------------------------------------------------------------------------
# Global-state calls in Dynamo graphs, aot_autograd's graph metadata, saving compiled functions


def autocast_calls() -> tuple[Any, Any]:
    """(enter, exit): the functions Dynamo records for ``torch.autocast`` blocks
    (``torch.amp._enter_autocast(device_type, dtype, enabled, cache_enabled)`` returns the context
    that ``torch.amp._exit_autocast`` closes)."""
    return torch.amp._enter_autocast, torch.amp._exit_autocast


def set_grad_enabled_call() -> Any:
    """The function Dynamo records where grad mode changes (``torch._C._set_grad_enabled``)."""
    return torch._C._set_grad_enabled


def vmap_scope_calls() -> tuple[Any, Any] | None:
    """(increment, decrement): the functions Dynamo records around a ``torch.vmap`` body (each
    increment returns its level, each decrement closes the innermost); None where absent.
    torch 2.8 records the C functions that torch 2.13's ``torch._functorch.predispatch`` wraps."""
    try:
        from torch._functorch import predispatch as module
    except ImportError:
        module = torch._C._functorch
    increment = getattr(module, "_vmap_increment_nesting", None)
    decrement = getattr(module, "_vmap_decrement_nesting", None)
    return (increment, decrement) if increment is not None and decrement is not None else None


def harmless_calls() -> tuple[Any, ...]:
    """Calls Dynamo records for their side effect that change no value: API-usage logging (every
    ``nn.Module`` built in a forward, such as a sliced ``ModuleList``, logs once) and the one-time
    loading of vmap's decompositions."""
    try:
        from torch._functorch import predispatch
    except ImportError:
        predispatch = None
    vmap = importlib.import_module("torch._functorch.vmap")  # 2.8 records its loader; 2.13 predispatch's

    found = [
        torch._C._log_api_usage_once,
        getattr(predispatch, "lazy_load_decompositions", None),
        getattr(vmap, "lazy_load_decompositions", None),
    ]
    return tuple(dict.fromkeys(f for f in found if f is not None))


def aot_graph_metadata() -> Any:
    """aot_autograd's ViewAndMutationMeta of the graph it is compiling (input mutations, output
    aliasing, effect tokens), read from the tracing context inside its compiler; None outside."""
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    return getattr(context, "fw_metadata", None) if context is not None else None


def any_autocast_enabled() -> bool:
    """Whether autocast is on for any device (aot_autograd then runs its graph with autocast off)."""
    return bool(torch._C._is_any_autocast_enabled())


def autocast_disabled() -> Any:
    """A context with autocast off on every device, as aot_autograd runs graphs traced under it."""
    return torch._C._DisableAutocast()


def graph_pickle(gm: torch.fx.GraphModule, keep_meta: Callable[[str], bool]) -> bytes:
    """`gm` pickled by torch's GraphPickler (fake tensors, SymInts and ops by name; node meta
    filtered by `keep_meta` where this torch's pickler takes a filter). Raises when a node calls
    something it cannot name."""
    import dataclasses

    from torch.fx._graph_pickler import GraphPickler, Options

    if "node_metadata_key_filter" in {f.name for f in dataclasses.fields(Options)}:
        return GraphPickler.dumps(gm, Options(ops_filter=None, node_metadata_key_filter=keep_meta))
    return GraphPickler.dumps(gm, Options(ops_filter=None))


def graph_unpickle(data: bytes, fake_mode: Any) -> torch.fx.GraphModule:
    """The GraphModule of :func:`graph_pickle`, its fake tensors made in `fake_mode`."""
    from torch.fx._graph_pickler import GraphPickler

    gm = GraphPickler.loads(data, fake_mode)
    gm.recompile()
    return gm


def new_fake_mode() -> Any:
    """A fresh FakeTensorMode on its own ShapeEnv."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv())


def serializable_callable_base() -> type:
    """torch's ``SerializableCallable`` ABC, which ``aot_compile`` requires of a backend's result
    (``torch._dynamo.aot_compile_types`` from torch 2.11, ``torch._dynamo.aot_compile`` in 2.9 and
    2.10); a plain ABC on torch 2.8, which has no ``aot_compile``."""
    import abc

    for module in ("torch._dynamo.aot_compile_types", "torch._dynamo.aot_compile"):
        try:
            return importlib.import_module(module).SerializableCallable
        except (ImportError, AttributeError):
            continue
    return abc.ABC


@contextlib.contextmanager
def aot_compile_enabled() -> Any:
    """Within it, ``torch.compile(...)`` results have ``aot_compile`` (torch 2.9 to 2.11 attach it
    only with ``torch._dynamo.config.enable_aot_compile`` set; from 2.12 it is the default)."""
    import torch._dynamo.config as dynamo_config

    if not hasattr(dynamo_config, "enable_aot_compile"):
        yield
        return
    with dynamo_config.patch(enable_aot_compile=True):
        yield


def aot_compiled_backend_result(compiled: Any) -> Any:
    """What the backend returned inside a function of ``torch.compile(...).aot_compile(...)`` or
    ``torch.compiler.load_compiled_function`` (None for anything else)."""
    artifacts = getattr(compiled, "_artifacts", None)
    return getattr(artifacts, "compiled_fn", None)


def decomposed_while_tracing(name: str) -> bool:
    """Whether every functional overload that an op name (``aten.linear``, ``aten.linear.default``)
    covers has a CompositeImplicitAutograd kernel: tracing to ATen decomposes such an op into
    other ops (``aten.linear`` into ``aten.t`` and ``aten.addmm``), so no node of it is left."""
    namespace, op, *overload = name.split(".")
    packet = getattr(getattr(torch.ops, namespace), op)
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    found = False
    for name_ in overload or packet.overloads():
        try:
            overload_op = getattr(packet, name_)
            if overload_op._schema.is_mutable:  # out= and in-place variants: functionalized away
                continue
            if not overload_op.has_kernel_for_dispatch_key(key):
                return False
        except (AttributeError, RuntimeError):  # an overload the dispatcher does not know
            continue
        found = True
    return found


def custom_meta_reaches_aten_nodes() -> bool:
    """Whether tracing to ATen copies a node's ``meta["custom"]`` onto the nodes traced from it."""
    from torch.fx import proxy

    return "custom" in getattr(proxy, "_COPY_META_FIELDS", ())


def without_aot_autograd_cache() -> Any:
    """A context in which aot_autograd neither looks up nor saves its cache entries, even inside
    ``aot_compile`` (which forces that cache on): trt_subgraph's compiler returns no inductor
    output code for it to save, and keeps its own artifacts."""
    from torch._functorch import config

    if not hasattr(config, "force_autograd_cache"):
        return contextlib.nullcontext()
    return config.patch(force_autograd_cache=False)


# ---------------------------------------------------------------------------------------------
# Compiled C++ kernels of CPU artifacts: kept with the artifact, restored before it loads
#
# A saved inductor artifact holds the source of its C++ kernels, not the compiled libraries:
# loading it compiles them again (CppCodeCache, torch 2.8 to 2.13) unless inductor's cache
# directory already holds a library at the path its source and compile command hash to. So the
# libraries a build used are kept with the artifact and put back at those paths before it loads.


_PATCH_LOCK = threading.Lock()
_PATCHES: dict[tuple[int, str], list[Any]] = {}  # (id of owner, name) -> [holders, original]
_ABSENT = object()
_KERNEL_RECORDERS: list[tuple[int, list[Any]]] = []  # (thread, modules it loaded)
# Inductor names what it writes for a hash `c<base32>` as `<its 2nd and 3rd characters>/<hash>.<ext>`.
_INDUCTOR_FILE_RE = re.compile(r"(?P<dir>[a-z0-9]{2})/c(?P=dir)[a-z0-9]*(\.[a-z0-9_]+)?\.(so|o)")


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name` is `value` while any thread is inside; nests and overlaps across threads
    (the first to enter installs it, the last to leave restores the original)."""
    key = (id(owner), name)
    with _PATCH_LOCK:
        entry = _PATCHES.get(key)
        if entry is None:
            entry = _PATCHES[key] = [0, vars(owner).get(name, _ABSENT)]
            setattr(owner, name, value)
        entry[0] += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _PATCHES[key]
                if entry[1] is _ABSENT:
                    delattr(owner, name)
                else:
                    setattr(owner, name, entry[1])


_LOAD_BY_KEY_PATH: Any = None  # inductor's own PyCodeCache.load_by_key_path, once recorded


def _recording_load_by_key_path(cls: Any, *args: Any, **kwargs: Any) -> Any:
    module = _LOAD_BY_KEY_PATH(cls, *args, **kwargs)
    thread = threading.get_ident()
    with _PATCH_LOCK:
        for owner, loaded in _KERNEL_RECORDERS:
            if owner == thread:
                loaded.append(module)
    return module


@contextlib.contextmanager
def recording_cpu_kernels() -> Iterator[list[str]]:
    """Paths of the compiled C++ kernel libraries (``.so``) that the inductor code this thread
    loads inside the block calls: filled when the block ends.

    Inductor loads each compiled graph's Python wrapper through
    ``PyCodeCache.load_by_key_path`` (a module it already loaded is returned from memory, so a
    kernel this process compiled for an earlier graph counts too); the wrapper's globals hold
    its C++ kernels, functions of extension modules inductor loaded from its cache directory.
    Where that moved (a later torch), nothing is recorded and loads compile their kernels.
    """
    global _LOAD_BY_KEY_PATH
    try:
        from torch._inductor.codecache import PyCodeCache

        with _PATCH_LOCK:
            if _LOAD_BY_KEY_PATH is None:
                _LOAD_BY_KEY_PATH = vars(PyCodeCache)["load_by_key_path"].__func__
    except (ImportError, KeyError, AttributeError):
        yield []
        return
    modules: list[Any] = []
    recorder = (threading.get_ident(), modules)
    with _PATCH_LOCK:
        _KERNEL_RECORDERS.append(recorder)
    found: list[str] = []
    try:
        with _patched(PyCodeCache, "load_by_key_path", classmethod(_recording_load_by_key_path)):
            yield found
    finally:
        with _PATCH_LOCK:
            _KERNEL_RECORDERS.remove(recorder)
    for module in modules:
        for value in vars(module).values():
            owner = getattr(value, "__self__", None)
            path = getattr(owner, "__file__", None) if isinstance(owner, types.ModuleType) else None
            if isinstance(path, str) and _INDUCTOR_FILE_RE.fullmatch(inductor_file_name(path)):
                found.append(path)


def inductor_file_name(path: str) -> str:
    """The name of a file of inductor's cache directory relative to it (``<2 chars>/<hash>.<ext>``:
    inductor puts what it writes for a hash in the folder named by the hash's 2nd and 3rd
    characters)."""
    return f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"


def restore_inductor_files(files: dict[str, bytes]) -> None:
    """Put compiled kernels (or vector-ISA check programs) back into inductor's cache directory
    (``TORCHINDUCTOR_CACHE_DIR``, else its default), under the names :func:`inductor_file_name`
    gave them; a file already there is kept. Raises ValueError for a name that is not such a
    name (a ``..``, an absolute path, another extension)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    root = cache_dir()
    for name, data in files.items():
        if not _INDUCTOR_FILE_RE.fullmatch(name):
            raise ValueError(f"not a compiled file of inductor's cache directory: {name!r}")
        path = os.path.join(root, name)
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".trt_subgraph.", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o755)  # as the compiler leaves a library
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def without_header_precompiling() -> Any:
    """A context in which inductor loads C++ kernels without precompiling its kernel header.

    With ``cpp_cache_precompile_headers`` (on by default), inductor runs the C++ preprocessor
    once per process and compile command before it even looks for a kernel's library, to hash
    the precompiled header (and builds that header when missing), though a restored library
    needs no compile. The setting itself stays on: it is part of the compile command that the
    library's name hashes. A kernel whose library is missing still compiles, only without the
    precompiled header. Nests and overlaps across threads; other compiles at the same time in
    this process also go without it (slower, not different).
    """
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache
    except ImportError:
        return contextlib.nullcontext()
    if "_get_uncompiled_header" not in vars(CppPythonBindingsCodeCache):
        return contextlib.nullcontext()
    return _patched(CppPythonBindingsCodeCache, "_get_uncompiled_header", classmethod(lambda cls, device: None))


def vec_isa_picked() -> bool:
    """Whether inductor already checked which CPU vector ISAs work in this process (True where
    that cannot be told)."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    cache_info = getattr(valid_vec_isa_list, "cache_info", None)
    return cache_info is None or cache_info().currsize > 0


def vec_isa_checks_key() -> dict[str, str]:
    """What inductor's vector-ISA check programs depend on: they are named by the hash of their
    source, the compiler's version banner, the ISA's flags and torch's version."""
    import platform

    return {"arch": platform.machine(), "compiler": _cpp_compiler(), "torch": torch.__version__}


def pick_vec_isa_recording_checks() -> list[str]:
    """Run inductor's choice of CPU vector ISA and return the paths of the check programs it
    built or found (one small library per candidate ISA and extension, compiled and then loaded
    in a child process, the first time in each process); [] when the choice was made before
    in this process (nothing is checked again)."""
    from torch._inductor import codecache
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    sources: list[str] = []
    write = codecache.write

    def recording_write(content: Any, extension: str, *args: Any, **kwargs: Any) -> Any:
        out = write(content, extension, *args, **kwargs)
        if extension == "cpp":
            sources.append(out[1])
        return out

    with _patched(codecache, "write", recording_write):
        pick_vec_isa()
    return [p for p in (os.path.splitext(s)[0] + ".so" for s in sources) if os.path.isfile(p)]


def writes_an_argument(target: Any) -> bool:
    """Whether a call target is an op whose schema writes one of its arguments (``aten.add_``,
    an ``out=`` variant, a custom op declared as mutating)."""
    return isinstance(target, OpOverload) and target._schema.is_mutable


def returns_new_tensors(target: Any) -> bool:
    """Whether a call target is an ATen op whose schema returns no alias of its arguments (not a
    view, not an in-place or ``out=`` variant). ATen's schemas say so reliably; other namespaces'
    may not (``_c10d_functional.wait_tensor`` returns its argument unannotated)."""
    return (
        isinstance(target, OpOverload)
        and target.namespace == "aten"
        and not target._schema.is_mutable
        and all(r.alias_info is None for r in target._schema.returns)
    )


def is_view_op(target: Any) -> bool:
    """Whether a call target is an ATen op that returns a view of its first argument."""
    return isinstance(target, OpOverload) and target.namespace == "aten" and target.is_view


def all_reduce_ops() -> tuple[Any, Any] | None:
    """(``_c10d_functional.all_reduce``, its in-place ``all_reduce_``) where torch has both, else None."""
    try:
        namespace = torch.ops._c10d_functional
        return namespace.all_reduce.default, namespace.all_reduce_.default
    except (AttributeError, RuntimeError):
        return None


def functional_all_reduce() -> Callable[..., torch.Tensor]:
    """``torch.distributed._functional_collectives.all_reduce(tensor, reduce_op, group)``: the
    all-reduce that Dynamo traces into ``_c10d_functional.all_reduce`` and ``wait_tensor`` ops
    (tensor parallelism in compiled graphs; torch >= 2.3)."""
    from torch.distributed._functional_collectives import all_reduce

    return all_reduce
