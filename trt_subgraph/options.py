"""User options of the backend, validated once, with errors that list what is allowed.

Unknown option keys raise (rather than being dropped silently, as torch_tensorrt does), so a
typo cannot go unnoticed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ._compat import OpOverload, OpOverloadPacket
from .cache import DEFAULT_SIZE_LIMIT as DEFAULT_CACHE_SIZE_LIMIT
from .cache import default_cache_dir
from .cache.remote import DEFAULT_ENTRY_LIMIT as DEFAULT_REMOTE_ENTRY_LIMIT
from .cache.remote import DEFAULT_TTL_S as DEFAULT_REMOTE_TTL
from .cache.remote import check_url

__all__ = [
    "DEFAULT_CACHE_SIZE_LIMIT",
    "ENGINES",
    "MEMORY_FORMATS",
    "MODES",
    "RANK_SPLIT",
    "SPARSITY",
    "Options",
    "default_cache_dir",
]

ENGINES = ("auto", "eager", "inductor", "tensorrt")
SPARSITY = ("auto", "on", "off")  # the sparsity modes (the 2:4 runtime checks against these too)
MEMORY_FORMATS = ("auto", "preserve", "channels_last")  # activations' layout (see ``memory_format``)
MODES = (None, "default", "reduce-overhead", "max-autotune-no-cudagraphs")
RANK_SPLIT = ("auto", "off")  # the ``rank_split_builds`` modes


_UNSET: Any = object()
DEFAULT_CUDAGRAPH_MAX_SHAPES = 8


@dataclasses.dataclass(frozen=True)
class Options:
    """What ``torch.compile(..., backend="trt_subgraph", options={...})`` accepts."""

    engine: str = "auto"
    cache: bool = True
    cache_dir: Path | None = None
    cache_size_limit: int = DEFAULT_CACHE_SIZE_LIMIT
    sparsity: str = "auto"
    cudagraphs: bool = True
    # CUDA graphs kept per compiled graph, one per input-shape signature (least recently used
    # dropped); with `cudagraph_sizes`, at least one per listed size. 8: the batch sizes a server
    # typically sees (1, 2, 4, ... 128) without holding dozens of graphs' outputs and workspaces
    # (inductor warns at 8 distinct shapes too: ``cudagraph_dynamic_shape_warn_limit``).
    cudagraph_max_shapes: int = DEFAULT_CUDAGRAPH_MAX_SHAPES
    # Batch sizes to pad a dynamic batch up to (ascending, unique), as vLLM's capture sizes.
    cudagraph_sizes: tuple[int, ...] | None = None
    min_block_size: int = 1
    torch_executed_ops: frozenset[str] = frozenset()
    # The activations' memory format: "channels_last" runs every 2-D convolution's input and what
    # follows it channels-last, "preserve" keeps eager's layouts, and "auto" goes channels-last
    # where inductor would for the whole graph (2-D convolutions on CUDA that its layout rule
    # favours; engines that keep layouts), so that pieces compiled alone agree on one layout
    # instead of each converting in and out. See `trt_subgraph.memory_format.apply`.
    memory_format: str = "auto"
    # The most worker processes that build the unique subgraphs a graph misses in the caches, all
    # at once (engines that build without weights: inductor; a graph starts at most its unique
    # regions minus one): 0 builds them in this process one after another; None picks
    # `trt_subgraph.workers.default_workers` (half the cores, at most 8, none below 4 cores).
    # See `trt_subgraph.workers`.
    build_workers: int | None = None
    # Glue between blocks (embeddings, stem, head) that misses the caches builds in a worker in
    # the background: the first call waits for the blocks only, PyTorch runs the glue until a
    # later call swaps its engines in (CUDA graphs then record again). Needs build workers. On
    # by default: the BERT-base-like encoder's cold first call on an H200 went from 8.3-9.1 s
    # to 6.4-7.0 s (benchmarks/RESULTS.md, "Glue off the critical path").
    background_glue: bool = True
    # Keep what the backend makes of each Dynamo graph (its plan) in the disk cache, so that a
    # new process compiling the same graph assembles it from there and the cached artifacts,
    # without lowering it again. Off when the disk cache is. See `trt_subgraph.plan_cache`.
    plan_cache: bool = True
    # Where torch.distributed runs more than one rank: "auto" splits the unique subgraphs that
    # miss the caches among the ranks, each rank building its share and the ranks exchanging the
    # artifacts (engines that persist artifacts; every rank must compile the same graphs in the
    # same order); "off": every rank builds alone. See `trt_subgraph.ranks`.
    rank_split_builds: str = "auto"
    # A cache level shared by a fleet of processes on many machines, under memory and the disk
    # cache: a Redis URL (``redis://host:6379/0``; default ``$TRT_SUBGRAPH_REMOTE_CACHE``, else
    # None: off). See `trt_subgraph.cache.remote`. Off when `cache` is False.
    remote_cache: str | None = None
    # Seconds a remote entry lives after it was last stored or read (None: until removed).
    remote_cache_ttl: int | None = DEFAULT_REMOTE_TTL
    # The largest remote entry in bytes (header included); larger ones are not stored or read.
    remote_cache_entry_limit: int = DEFAULT_REMOTE_ENTRY_LIMIT

    @property
    def disk_cache_dir(self) -> Path | None:
        return self.cache_dir if self.cache else None

    @classmethod
    def from_user(cls, options: dict[str, Any] | None, mode: str | None = None) -> Options:
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(
                "trt_subgraph: options must be a dict such as {'engine': 'eager'}, "
                f"got {type(options).__name__} {options!r}"
            )
        options = dict(options or {})
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"trt_subgraph: unknown option(s) {unknown}; valid options are {valid}")
        if mode not in MODES:
            raise ValueError(f"trt_subgraph: unknown mode {mode!r}; valid modes are {list(MODES)}")

        engine = options.get("engine", "auto")
        _check_choice("engine", engine, ENGINES)
        sparsity = options.get("sparsity", "auto")
        _check_choice("sparsity", sparsity, SPARSITY)
        memory_format = options.get("memory_format", "auto")
        _check_choice("memory_format", memory_format, MEMORY_FORMATS)
        cache = options.get("cache", True)
        _check_type("cache", cache, bool)
        cudagraphs = options.get("cudagraphs", True)
        _check_type("cudagraphs", cudagraphs, bool)
        if mode == "reduce-overhead":
            cudagraphs = True
        elif mode == "max-autotune-no-cudagraphs":
            cudagraphs = False

        cache_dir = options.get("cache_dir", _UNSET)
        if cache_dir is _UNSET:
            cache_dir = default_cache_dir()
        elif cache_dir is None:
            cache = False
        elif isinstance(cache_dir, (str, os.PathLike)):
            if not os.fspath(cache_dir):
                raise ValueError(
                    "trt_subgraph: option 'cache_dir' is an empty path (an unset variable?); give a directory, "
                    "or None to turn the disk cache off"
                )
            cache_dir = Path(cache_dir)
        else:
            raise ValueError(f"trt_subgraph: option 'cache_dir' must be a path or None, got {type(cache_dir).__name__}")

        limit = options.get("cache_size_limit", DEFAULT_CACHE_SIZE_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise ValueError(f"trt_subgraph: option 'cache_size_limit' must be a positive int (bytes), got {limit!r}")
        min_block_size = options.get("min_block_size", 1)
        if not isinstance(min_block_size, int) or isinstance(min_block_size, bool) or min_block_size < 1:
            raise ValueError(f"trt_subgraph: option 'min_block_size' must be an int >= 1, got {min_block_size!r}")
        sizes = options.get("cudagraph_sizes")
        if sizes is not None:
            if not isinstance(sizes, (list, tuple)) or not sizes or not all(_is_count(n) for n in sizes):
                raise ValueError(
                    "trt_subgraph: option 'cudagraph_sizes' must be a non-empty list of batch sizes >= 1 "
                    f"such as [1, 2, 4, 8], got {sizes!r}"
                )
            sizes = tuple(sorted(set(sizes)))
        max_shapes = options.get("cudagraph_max_shapes", max(DEFAULT_CUDAGRAPH_MAX_SHAPES, len(sizes or ())))
        if not _is_count(max_shapes):
            raise ValueError(
                f"trt_subgraph: option 'cudagraph_max_shapes' must be an int >= 1 (CUDA graphs kept), got {max_shapes!r}"
            )
        ops = options.get("torch_executed_ops")
        ops = () if ops is None else ops
        if isinstance(ops, (str, OpOverload, OpOverloadPacket)) or not isinstance(ops, Iterable):
            raise ValueError(
                "trt_subgraph: option 'torch_executed_ops' must be a collection of ops or op names "
                f"such as {{'aten.gelu.default'}}, got {ops!r}"
            )
        build_workers = options.get("build_workers")
        if build_workers is not None and (
            not isinstance(build_workers, int) or isinstance(build_workers, bool) or build_workers < 0
        ):
            raise ValueError(
                "trt_subgraph: option 'build_workers' must be an int >= 0 (worker processes; 0 builds in this "
                f"process) or None (chosen from the CPU cores), got {build_workers!r}"
            )
        background_glue = options.get("background_glue", True)
        _check_type("background_glue", background_glue, bool)
        plan_cache = options.get("plan_cache", True)
        _check_type("plan_cache", plan_cache, bool)
        rank_split_builds = options.get("rank_split_builds", "auto")
        _check_choice("rank_split_builds", rank_split_builds, RANK_SPLIT)
        remote = _remote_cache(options.get("remote_cache", _UNSET))
        ttl = options.get("remote_cache_ttl", DEFAULT_REMOTE_TTL)
        if ttl is not None and not _is_count(ttl):
            raise ValueError(
                f"trt_subgraph: option 'remote_cache_ttl' must be an int >= 1 (seconds) or None (no expiry), got {ttl!r}"
            )
        entry_limit = options.get("remote_cache_entry_limit", DEFAULT_REMOTE_ENTRY_LIMIT)
        if not _is_count(entry_limit):
            raise ValueError(
                f"trt_subgraph: option 'remote_cache_entry_limit' must be a positive int (bytes), got {entry_limit!r}"
            )
        return cls(
            engine=engine,
            cache=cache,
            cache_dir=cache_dir,
            cache_size_limit=limit,
            sparsity=sparsity,
            cudagraphs=cudagraphs,
            cudagraph_max_shapes=max_shapes,
            cudagraph_sizes=sizes,
            min_block_size=min_block_size,
            torch_executed_ops=frozenset(resolve_op(op) for op in ops),
            memory_format=memory_format,
            build_workers=build_workers,
            background_glue=background_glue,
            plan_cache=plan_cache,
            rank_split_builds=rank_split_builds,
            remote_cache=remote,
            remote_cache_ttl=ttl,
            remote_cache_entry_limit=entry_limit,
        )


def _remote_cache(url: Any) -> str | None:
    """The ``remote_cache`` option checked (unset: ``$TRT_SUBGRAPH_REMOTE_CACHE``, empty: off)."""
    where = "option 'remote_cache'"
    if url is _UNSET:
        url, where = os.environ.get("TRT_SUBGRAPH_REMOTE_CACHE") or None, "TRT_SUBGRAPH_REMOTE_CACHE"
    if url is None:
        return None
    try:
        check_url(url)
    except ValueError as e:
        raise ValueError(f"trt_subgraph: {where}: {e}") from None
    if importlib.util.find_spec("redis") is None:
        raise ValueError(
            f"trt_subgraph: {where} is {url!r}, but redis-py is not installed; "
            "pip install 'trt_subgraph[remote]' (or pip install redis)"
        )
    return url


def resolve_op(op: Any) -> str:
    """The canonical name of one ``torch_executed_ops`` entry: ``aten.gelu`` (every overload) or
    ``aten.gelu.default`` (one overload).

    Accepted: an op (``torch.ops.aten.gelu.default``) or an op packet (``torch.ops.aten.gelu``),
    or their names spelled ``aten.gelu``, ``aten.gelu.default``, ``torch.ops.aten.gelu.default``
    or ``aten::gelu``. Raises ValueError for anything that names no registered op or overload.
    """
    if isinstance(op, (OpOverload, OpOverloadPacket)):
        return str(op)
    if not isinstance(op, str):
        raise ValueError(
            f"trt_subgraph: option 'torch_executed_ops' holds {op!r} ({type(op).__name__}); "
            "entries are ops such as torch.ops.aten.gelu.default or names such as 'aten.gelu.default'"
        )
    name = op.strip().replace("::", ".")
    name = name.removeprefix("torch.ops.")
    parts = name.split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(
            f"trt_subgraph: option 'torch_executed_ops' entry {op!r} is not an op name; "
            "write 'namespace.op' or 'namespace.op.overload', such as 'aten.gelu' or 'aten.gelu.default'"
        )
    try:
        packet = getattr(getattr(torch.ops, parts[0]), parts[1])
    except (AttributeError, RuntimeError):
        packet = None
    if not isinstance(packet, OpOverloadPacket):
        raise ValueError(
            f"trt_subgraph: option 'torch_executed_ops' entry {op!r}: no op {parts[0]}.{parts[1]} is registered "
            "(names are ATen-level, such as 'aten.gelu' or 'aten.addmm.default')"
        )
    if len(parts) == 2:
        return str(packet)
    if parts[2] not in packet.overloads():
        raise ValueError(
            f"trt_subgraph: option 'torch_executed_ops' entry {op!r}: {packet} has no overload {parts[2]!r}; "
            f"its overloads are {sorted(packet.overloads())}"
        )
    return str(getattr(packet, parts[2]))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"trt_subgraph: option {name!r} must be one of {list(allowed)}, got {value!r}")


def _check_type(name: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise ValueError(f"trt_subgraph: option {name!r} must be a {kind.__name__}, got {value!r}")
