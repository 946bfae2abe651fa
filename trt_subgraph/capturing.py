"""See what the backend sees: every unique canonical subgraph, each instance's weights and module path.

Used by the ONNX export and by anyone who wants to inspect the split without running engines.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from .pipeline import Lowered, UniqueSubgraph


@dataclasses.dataclass
class Capture:
    unique: list[UniqueSubgraph]
    output: Any


def capture(model: torch.nn.Module, *example_inputs: Any, **options: Any) -> Capture:
    """Compile ``model`` with the eager engine, run it once under no_grad, return the subgraphs."""
    from .backend import trt_subgraph_backend

    options = {"engine": "eager", "cache_dir": None, "cudagraphs": False, **options}
    collected: list[Lowered] = []
    torch.compiler.reset()
    backend = functools.partial(trt_subgraph_backend, capture=collected)
    backend.reset = trt_subgraph_backend.reset  # type: ignore[attr-defined]  # torch._dynamo.reset() calls it
    compiled = torch.compile(model, backend=backend, options=options)
    with torch.no_grad():
        output = compiled(*example_inputs)
    merged: dict[str, UniqueSubgraph] = {}
    for lowered in collected:
        for unit in lowered.unique.values():
            if unit.sub.fingerprint in merged:
                merged[unit.sub.fingerprint].instance_weights.extend(unit.instance_weights)
                merged[unit.sub.fingerprint].instance_paths.extend(unit.instance_paths)
            else:
                merged[unit.sub.fingerprint] = unit
    return Capture(unique=list(merged.values()), output=output)
