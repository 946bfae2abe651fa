"""User options of the backend, validated once, with errors that list what is allowed.

Unknown option keys raise (rather than being dropped silently, as torch_tensorrt does), so a
typo cannot go unnoticed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .cache import DEFAULT_SIZE_LIMIT as DEFAULT_CACHE_SIZE_LIMIT
from .cache import default_cache_dir

__all__ = ["DEFAULT_CACHE_SIZE_LIMIT", "ENGINES", "MODES", "SPARSITY", "Options", "default_cache_dir"]

ENGINES = ("auto", "eager", "inductor", "tensorrt")
SPARSITY = ("auto", "on", "off")  # the sparsity modes (the 2:4 runtime checks against these too)
MODES = (None, "default", "reduce-overhead", "max-autotune-no-cudagraphs")


_UNSET: Any = object()


@dataclasses.dataclass(frozen=True)
class Options:
    """What ``torch.compile(..., backend="trt_subgraph", options={...})`` accepts."""

    engine: str = "auto"
    cache: bool = True
    cache_dir: Path | None = None
    cache_size_limit: int = DEFAULT_CACHE_SIZE_LIMIT
    sparsity: str = "auto"
    cudagraphs: bool = True
    min_block_size: int = 1
    torch_executed_ops: frozenset[str] = frozenset()

    @property
    def disk_cache_dir(self) -> Path | None:
        return self.cache_dir if self.cache else None

    @classmethod
    def from_user(cls, options: dict[str, Any] | None, mode: str | None = None) -> Options:
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
            cache_dir = Path(cache_dir)
        else:
            raise ValueError(f"trt_subgraph: option 'cache_dir' must be a path or None, got {type(cache_dir).__name__}")

        limit = options.get("cache_size_limit", DEFAULT_CACHE_SIZE_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise ValueError(f"trt_subgraph: option 'cache_size_limit' must be a positive int (bytes), got {limit!r}")
        min_block_size = options.get("min_block_size", 1)
        if not isinstance(min_block_size, int) or isinstance(min_block_size, bool) or min_block_size < 1:
            raise ValueError(f"trt_subgraph: option 'min_block_size' must be an int >= 1, got {min_block_size!r}")
        ops = options.get("torch_executed_ops", ())
        if isinstance(ops, str) or not all(isinstance(op, str) for op in ops):
            raise ValueError(
                "trt_subgraph: option 'torch_executed_ops' must be a collection of op names "
                f"such as {{'aten.gelu.default'}}, got {ops!r}"
            )
        return cls(
            engine=engine,
            cache=cache,
            cache_dir=cache_dir,
            cache_size_limit=limit,
            sparsity=sparsity,
            cudagraphs=cudagraphs,
            min_block_size=min_block_size,
            torch_executed_ops=frozenset(ops),
        )


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"trt_subgraph: option {name!r} must be one of {list(allowed)}, got {value!r}")


def _check_type(name: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise ValueError(f"trt_subgraph: option {name!r} must be a {kind.__name__}, got {value!r}")
