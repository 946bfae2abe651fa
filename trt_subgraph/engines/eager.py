"""The eager engine: runs each canonical subgraph as ATen ops. For debugging and slow machines."""
from __future__ import annotations

from typing import Any, Callable

import torch

from .base import CanonicalSubgraph, Engine


class EagerEngine(Engine):
    name = "eager"

    def build(self, sub: CanonicalSubgraph, weights: list[torch.Tensor]) -> Any:
        return sub.gm

    def serialize(self, artifact: Any) -> bytes | None:
        return None

    def bind(self, artifact: Any, sub: CanonicalSubgraph) -> Callable[..., tuple]:
        return artifact
