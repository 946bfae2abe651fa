"""The eager engine: runs each canonical subgraph as ATen ops. For debugging and slow machines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import CanonicalSubgraph, Engine


class EagerEngine(Engine):
    name = "eager"
    differentiable_fallback = "eager"
    keeps_layout = True

    def build(self, sub: CanonicalSubgraph, weights: list[torch.Tensor]) -> Any:
        return sub.gm

    def bind(self, artifact: Any, sub: CanonicalSubgraph) -> Callable[..., tuple]:
        return artifact
