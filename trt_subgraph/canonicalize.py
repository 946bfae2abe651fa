"""Canonical form of a piece: the same graph, names and metadata for every identical block.

Placeholders become ``in_0..``, nodes ``n_0..`` in topological order, and node metadata keeps
only ``val`` (no module paths, no stack traces), so nothing block-specific reaches the engine.
"""
from __future__ import annotations

import torch
import torch.fx

from .engines.base import CanonicalSubgraph
from .fingerprint import fingerprint


def canonicalize(piece: torch.fx.GraphModule, input_kinds: list[str]) -> CanonicalSubgraph:
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    index = 0
    for node in piece.graph.nodes:
        if node.op == "placeholder":
            new = graph.placeholder(f"in_{len(env)}")
        elif node.op == "output":
            new = graph.output(torch.fx.map_arg(node.args[0], env.__getitem__))
        elif node.op == "call_function":
            new = graph.call_function(
                node.target,
                torch.fx.map_arg(node.args, env.__getitem__),
                torch.fx.map_arg(node.kwargs, env.__getitem__),
            )
            new.name = f"n_{index}"
            index += 1
        else:
            raise TypeError(f"trt_subgraph: unexpected {node.op} node {node.name} in a piece")
        if "val" in node.meta:
            new.meta["val"] = node.meta["val"]
        env[node] = new
    gm = torch.fx.GraphModule(torch.nn.Module(), graph, class_name="CanonicalSubgraph")
    return CanonicalSubgraph(gm=gm, input_kinds=tuple(input_kinds), fingerprint=fingerprint(gm, input_kinds))
