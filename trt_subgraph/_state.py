"""Per-process state in one place: what :func:`reset` forgets, and the warn-once helper.

Modules that keep state for the life of the process (the in-memory artifact cache, the report
history, measured sparse verdicts, ...) register a function that forgets it with
:func:`on_reset`; ``trt_subgraph.reset()`` and ``torch._dynamo.reset()`` call them all. Imports
no torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["on_reset", "reset", "warn_once"]

_FORGET: list[Callable[[], None]] = []
_SEEN: set[Hashable] = set()


def on_reset(forget: Callable[[], None]) -> Callable[[], None]:
    """Register `forget` (a function taking no arguments) to run at every :func:`reset`."""
    _FORGET.append(forget)
    return forget


def reset() -> None:
    """Forget everything trt_subgraph holds for this process, as if it had just started.

    Forgets the artifacts built in this process (the disk cache stays), the report history
    (``last_report()`` is None afterwards), the sparse timings held in memory (the decisions
    file in the cache directory stays), which warnings were shown and which engine choices
    were announced, and the recorded CUDA graphs (each compiled function records again at its
    next calls; call this before ``torch.distributed.destroy_process_group()``, which hangs while
    a graph that captured NCCL collectives exists). Compiled functions that are still
    referenced keep working: what they use (engines, compressed 2:4 weights, cuSPARSELt plans)
    is never freed here. Called by ``torch._dynamo.reset()`` (and ``torch.compiler.reset()``).
    """
    _SEEN.clear()
    for forget in _FORGET:
        forget()


def warn_once(
    log: logging.Logger,
    key: Hashable,
    msg: str,
    *args: Any,
    level: int = logging.WARNING,
    seen: set | None = None,
) -> bool:
    """Log `msg` at `level` the first time `key` is seen, at DEBUG after that; True the first time.

    `seen`: the set that remembers keys (default: the process-wide one, cleared by
    :func:`reset`); an object whose warnings are its own passes its own set.
    """
    seen = _SEEN if seen is None else seen
    if key in seen:
        log.debug(msg, *args)
        return False
    seen.add(key)
    log.log(level, msg, *args)
    return True
