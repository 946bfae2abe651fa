"""Canonical form of a piece: the same graph, names and metadata for every identical block.

Placeholders become ``in_0..``, nodes ``n_0..`` in topological order, and node metadata keeps
only ``val`` (no module paths, no stack traces), so nothing block-specific reaches the engine.
"""

from __future__ import annotations

import torch
import torch.fx

from .engines.base import CanonicalSubgraph
from .fingerprint import fingerprint
from .fx_utils import copy_graph


def canonicalize(piece: torch.fx.GraphModule, input_kinds: list[str]) -> CanonicalSubgraph:
    graph = copy_graph(
        piece.graph,
        input_node=lambda graph, node, i: graph.placeholder(f"in_{i}"),
        node_name=lambda node, j: f"n_{j}",
    )
    gm = torch.fx.GraphModule(torch.nn.Module(), graph, class_name="CanonicalSubgraph")
    return CanonicalSubgraph(gm=gm, input_kinds=tuple(input_kinds), fingerprint=fingerprint(gm, input_kinds))
