"""The plan cache: a warm start through plain ``torch.compile`` skips the backend's lowering.

Dynamo traces the model in every new process, but what the backend makes of Dynamo's graph (the
split graph, each region's ATen graph with its engine pieces, the canonical subgraphs and their
artifacts' cache keys) only depends on that graph, its inputs' metadata, the options and the
process's settings. After a compile, the backend stores that plan in the disk cache, as
:mod:`trt_subgraph.saved` serializes it but with each artifact named by its cache key instead of
held (the artifacts are entries of their own). A later process that hands the backend the same
graph finds the plan under the same key and assembles the forward from it and the cached
artifacts: no region split, no aot_autograd trace, no fingerprinting, no build, no build workers.

The key (:func:`plan_key`) holds the graph's structure, code, ``nn_module_stack`` and constant
attributes; each input's dtype, shape, stride, device, storage offset, aliasing, whether it
requires grad and whether it is a weight, and each weight's 2:4 variant where the engine may
run sparse kernels; the options that shape the plan; the engine and its settings; Python, torch
and trt_subgraph versions, and that of each package outside torch whose function the graph
calls (einops); the GPU; grad mode, inference mode, autocast, the default dtype, TF32
and matmul precision, deterministic algorithms, the thread count, aot_autograd's config and the
functions marked in ``torch._inductor.config.unsafe_marked_cacheable_functions``.

Not cached (the backend lowers as usual, and the report's ``regions["plan"]`` says why):
graphs with symbolic sizes (lowering them adds guards to Dynamo's shape environment, which a
cached plan could not add), callables that no name identifies (closures, bound methods),
graphs whose lowering their text does not pin, since a later process may have changed that code
(a call of a Python function that Dynamo put in the graph by name, as
``torch._dynamo.allow_in_graph`` does, which AOTAutograd's cache refuses too; an op outside
torch's namespaces that its ``CompositeImplicitAutograd`` kernel decomposes; a user-defined
Triton kernel), tensor-subclass inputs, graphs that a saved function cannot hold (inputs
mutated in place, outputs that are views of inputs, engine pieces inside ``torch.cond``), plans
with a failed build, and ``trt_subgraph.capture``. A plan whose artifacts are not all cached any more is
lowered as usual and stored again.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import pickle
import platform
import sys
from typing import Any

import torch
import torch.fx
import xxhash

from . import __version__, saved, symbolic
from ._compat import (
    StorageWeakRef,
    aot_config_key,
    is_traceable_wrapper_subclass,
    lowering_not_pinned,
    marked_cacheable_functions,
    process_state,
)
from .cache import FORMAT_VERSION as CACHE_FORMAT
from .cache import DiskCache, make_key
from .engines.base import ACTIVATION, SYMINT, WEIGHT, Engine
from .fingerprint import UnhashableArgument, describe
from .fx_utils import placeholders
from .options import Options

__all__ = ["NotCacheable", "lookup", "plan_key", "store"]

log = logging.getLogger(__name__)

_KIND = "trt_subgraph plan"
# Options that do not change the plan: where the caches are, and how misses are built.
_NOT_PLANNING = (
    "cache",
    "cache_dir",
    "cache_size_limit",
    "build_workers",
    "background_glue",
    "plan_cache",
    "rank_split_builds",
    "remote_cache",
    "remote_cache_ttl",
    "remote_cache_entry_limit",
)


class NotCacheable(Exception):
    """Why a graph's plan is not cached."""


def plan_key(
    gm: torch.fx.GraphModule, example_inputs: list[Any], weight_flags: list[bool], options: Options, engine: Engine
) -> str:
    """The plan cache's key of Dynamo graph `gm` (before the backend changes it) with these
    `example_inputs` (Dynamo's real inputs), `weight_flags` (which are parameters or buffers),
    `options` and `engine`: 32 hex digits. Raises :class:`NotCacheable` saying why there is none."""
    fakes = [p.meta.get("example_value") for p in placeholders(gm)]
    if len(fakes) != len(example_inputs):
        raise NotCacheable("the graph's placeholders and inputs differ in number")
    if symbolic.is_symbolic(fakes) or symbolic.is_symbolic(example_inputs):
        raise NotCacheable("symbolic sizes")
    kinds = [
        SYMINT if isinstance(x, int) and not isinstance(x, bool) else WEIGHT if flag else ACTIVATION
        for x, flag in zip(example_inputs, weight_flags)
    ]
    return make_key(
        {
            "kind": _KIND,
            "plan_format": saved.PLAN_FORMAT,
            "cache_format": CACHE_FORMAT,
            "graph": _graph_digest(gm, kinds),
            "inputs": _inputs(example_inputs, weight_flags, engine),
            "options": _planning_options(options),
            "engine": engine.name,
            "settings": engine.settings(),
            "versions": _versions(),
            "devices": _devices(example_inputs),
            "state": _global_state(),
        }
    )


def lookup(key: str, options: Options) -> saved.CompiledForward | None:
    """The forward assembled from the plan cached under `key` and the cached artifacts it
    names, or None: no such plan, a damaged one (the disk cache refuses an entry whose
    authentication tag does not verify, and removes it), or one whose artifacts are not all
    cached any more (logged)."""
    disk = _disk(options)
    payload = disk.get(key) if disk is not None else None
    if payload is None:
        return None
    try:
        state = pickle.loads(payload)
        return saved._rebuild(state, None, options=options, cached=True)
    except saved.StalePlan as exc:
        log.info("trt_subgraph: cached plan %s not used: %s; lowering the graph", key, exc)
    except Exception as exc:  # an entry this release cannot read: lower as usual, store anew
        log.warning(
            "trt_subgraph: cached plan %s could not be used (%s: %s); lowering the graph", key, type(exc).__name__, exc
        )
    return None


def store(key: str, compiled: Any, options: Options) -> str:
    """Store the plan of `compiled` (the backend's result) in the disk cache under `key`; the
    report's entry: ``"stored"``, or ``"not stored (why)"``."""
    plan = getattr(compiled, "_plan", None)
    if plan is None:
        return "not stored (no plan)"
    failed = [rec.fingerprint for rec in plan.report.subgraphs if rec.status == "fallback"]
    if failed:
        return f"not stored (the builds of subgraphs {failed} failed)"
    try:
        payload = pickle.dumps(saved._plan_state(plan, artifacts=False), protocol=pickle.HIGHEST_PROTOCOL)
    except saved.Unsavable as exc:
        return f"not stored ({exc.reason})"
    except Exception as exc:  # something in the plan does not pickle
        log.warning("trt_subgraph: the plan of this graph could not be stored (%s: %s)", type(exc).__name__, exc)
        return f"not stored ({type(exc).__name__}: {exc})"
    disk = _disk(options)
    if disk is None:
        return "not stored (disk cache off)"
    meta = {"engine": plan.engine.name, "versions": _versions(), "info": {"kind": _KIND}}
    return "stored" if disk.put(key, payload, meta) else "not stored (the disk cache refused it)"


def _disk(options: Options) -> DiskCache | None:
    directory = options.disk_cache_dir
    return DiskCache(directory, options.cache_size_limit) if directory is not None else None


def _graph_digest(gm: torch.fx.GraphModule, kinds: list[str]) -> str:
    """xxh3-128 of what the plan of `gm` is made from: its structure and fake values
    (`fingerprint.describe`, which refuses callables no name identifies), its code (node
    names, which name module paths), each node's ``nn_module_stack`` and custom meta (blocks
    are found by them), and its attributes (constant tensors by value, subgraphs alike). Refuses
    a graph whose lowering its text does not pin (`lowering_not_pinned`: code that a later
    process may have changed under the same name, as a Python function Dynamo did not trace)."""
    try:
        text = [describe(gm, kinds, meta_key="example_value"), gm.code]
    except UnhashableArgument as exc:
        raise NotCacheable(str(exc)) from None
    scopes: dict[str, int] = {}  # a stack's keys name module instances by id(): numbered here
    for node in gm.graph.nodes:
        if (why := lowering_not_pinned(node)) is not None:
            raise NotCacheable(why)
        if (package := _outside_package(node)) is not None:
            text.append(f"package {package} {_package_version(package)}")
        stack = node.meta.get("nn_module_stack") or {}
        rendered = [f"{scopes.setdefault(key, len(scopes))}={_module_path(entry)}" for key, entry in stack.items()]
        custom = node.meta.get("custom")
        text.append(f"{node.name} {rendered} {custom!r}" if custom else f"{node.name} {rendered}")
        if node.op == "get_attr":
            text.append(f"{node.target} = {_attribute(gm, node.target)}")
    return xxhash.xxh3_128_hexdigest("\n".join(text).encode())


def _outside_package(node: torch.fx.Node) -> str | None:
    """The top-level package of a function outside torch and the standard library that the node
    calls (AOTAutograd lets some through, such as ``einops.rearrange``, and traces their code
    into the lowering: the package's version then pins it), else None."""
    module = getattr(node.target, "__module__", None) if node.op == "call_function" else None
    package = (module or "").split(".")[0]
    if not package or package in ("torch", "builtins") or package in sys.stdlib_module_names:
        return None
    return package


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(sys.modules.get(package), "__version__", "unknown"))


def _module_path(entry: Any) -> str:
    """An ``nn_module_stack`` entry, (path, module class), as text."""
    path, cls = entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, None)
    name = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)
    return f"{path}:{name}"


def _attribute(gm: torch.fx.GraphModule, target: str) -> str:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    if isinstance(value, torch.fx.GraphModule):
        kinds = [ACTIVATION] * len(placeholders(value))
        return "graph " + _graph_digest(value, kinds)
    if isinstance(value, torch.Tensor) and not is_traceable_wrapper_subclass(value):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        return f"tensor {value.dtype} {tuple(value.shape)} {xxhash.xxh3_128_hexdigest(data.tobytes())}"
    raise NotCacheable(f"attribute {target} is a {type(value).__name__}")


def _inputs(example_inputs: list[Any], weight_flags: list[bool], engine: Engine) -> list[str]:
    """Each input's metadata as the plan depends on it; storages shared between inputs by
    position (aliasing changes what aot_autograd generates)."""
    storages: dict[Any, int] = {}
    lines = []
    for position, (x, flag) in enumerate(zip(example_inputs, weight_flags)):
        if is_traceable_wrapper_subclass(x):
            raise NotCacheable("tensor-subclass inputs")
        if isinstance(x, torch.Tensor):
            storage = storages.setdefault(StorageWeakRef(x.untyped_storage()), position)
            line = (
                f"tensor {x.dtype} {tuple(x.shape)} {x.stride()} {x.device} {x.layout} offset {x.storage_offset()} "
                f"storage-of {storage} requires_grad {x.requires_grad} parameter {isinstance(x, torch.nn.Parameter)}"
            )
            if flag:
                line += f" weight variant {engine.weight_variant(x)}"
        elif x is None or isinstance(x, (bool, int, float, str)):
            line = f"value {x!r}"
        else:
            raise NotCacheable(f"an input of type {type(x).__name__}")
        lines.append(line)
    return lines


def _planning_options(options: Options) -> dict[str, Any]:
    values = dataclasses.asdict(options)
    return {name: _plain(value) for name, value in values.items() if name not in _NOT_PLANNING}


def _plain(value: Any) -> Any:
    if isinstance(value, (frozenset, set)):
        return sorted(map(str, value))
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "trt_subgraph": __version__}


def _devices(inputs: list[Any]) -> list[str]:
    """Each device of the tensor inputs; a GPU with its name and compute capability."""
    devices = sorted({x.device for x in inputs if isinstance(x, torch.Tensor)}, key=str)
    described = []
    for device in devices:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            described.append(f"{device} {torch.cuda.get_device_name(index)} sm{major}{minor}")
        else:
            described.append(str(device))
    return described


def _global_state() -> dict[str, Any]:
    """The process state that lowering reads besides the graph and the options (`process_state`
    holds the float32 precision of matmuls and convolutions: TF32)."""
    autocast = {}
    for device in ("cpu", "cuda"):
        try:
            autocast[device] = [torch.is_autocast_enabled(device), str(torch.get_autocast_dtype(device))]
        except RuntimeError:  # a device autocast does not know
            autocast[device] = None
    return {
        "grad": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "autocast": autocast,
        "autocast_cache": torch.is_autocast_cache_enabled(),
        "process": {name: _plain(value) for name, value in process_state().items()},
        "aot_config": aot_config_key(),
        "marked_cacheable": sorted(marked_cacheable_functions().items()),
    }
