"""Engines behind one protocol, and the choice of engine for ``engine="auto"``."""

from __future__ import annotations

import importlib
import logging

import torch

from .._state import warn_once
from .base import CanonicalSubgraph, Engine

__all__ = ["CanonicalSubgraph", "Engine", "select"]

log = logging.getLogger(__name__)

_ENGINES = {
    "eager": ("trt_subgraph.engines.eager", "EagerEngine"),
    "inductor": ("trt_subgraph.engines.inductor", "InductorEngine"),
    "tensorrt": ("trt_subgraph.engines.tensorrt", "TensorRTEngine"),
}


def engine_class(name: str) -> type[Engine]:
    module, cls = _ENGINES[name]
    return getattr(importlib.import_module(module), cls)


def select(
    name: str, *, torch_executed_ops: frozenset[str] = frozenset(), sparsity: str = "auto"
) -> tuple[Engine, str]:
    """The engine for an ``engine`` option, and why; ``auto`` is announced once per reason."""
    if name == "auto":
        reason = _tensorrt_unavailable()
        if reason is None:
            chosen, why = "tensorrt", "tensorrt and torch_tensorrt import and a CUDA device is present"
        else:
            chosen, why = "inductor", f"TensorRT engine unavailable: {reason}"
        warn_once(
            log,
            ("engine='auto'", chosen, why),
            "trt_subgraph: engine='auto' chose %r (%s)",
            chosen,
            why,
            level=logging.INFO,
        )
    else:
        chosen, why = name, "requested"
        if name == "tensorrt":
            reason = _tensorrt_unavailable()
            if reason is not None:
                raise RuntimeError(
                    f"trt_subgraph: engine='tensorrt' is not usable here: {reason}. "
                    "Install the extra with `pip install trt_subgraph[tensorrt]` on a CUDA machine, "
                    "or pick engine='inductor'."
                )
    cls = engine_class(chosen)
    if cls.sparse_weights:
        return cls(torch_executed_ops=torch_executed_ops, sparse=sparsity != "off"), why
    return cls(torch_executed_ops=torch_executed_ops), why


def _tensorrt_unavailable() -> str | None:
    try:
        cls = engine_class("tensorrt")
    except ImportError as exc:
        return f"the TensorRT adapter failed to import ({exc})"
    reason = cls.unavailable_reason()
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA device"
    return reason
