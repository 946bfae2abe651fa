"""Small FX helpers shared by the pipeline stages: inputs, outputs, label runs, graph copies."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx

__all__ = ["copy_graph", "is_size_arithmetic", "label_runs", "output_node", "output_values", "placeholders"]


def _graph(gm: torch.fx.GraphModule | torch.fx.Graph) -> torch.fx.Graph:
    return gm if isinstance(gm, torch.fx.Graph) else gm.graph


def placeholders(gm: torch.fx.GraphModule | torch.fx.Graph) -> list[torch.fx.Node]:
    """The graph's input nodes, in order."""
    return [n for n in _graph(gm).nodes if n.op == "placeholder"]


def output_node(gm: torch.fx.GraphModule | torch.fx.Graph) -> torch.fx.Node:
    """The graph's output node (the last node)."""
    return next(n for n in reversed(_graph(gm).nodes) if n.op == "output")


def output_values(gm: torch.fx.GraphModule | torch.fx.Graph) -> tuple[Any, ...]:
    """What the graph returns, as a tuple (a single returned value becomes a 1-tuple)."""
    value = output_node(gm).args[0]
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def is_size_arithmetic(node: torch.fx.Node) -> bool:
    """Whether `node` computes a number from numbers only: arithmetic on symbolic sizes (``s0 *
    16``, the rows of a batch of sequences) that a dynamic graph has where a static one has a
    constant. No tensor goes in or comes out, so it launches no kernel and a CUDA graph replay
    skips it."""
    number = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)
    if node.op != "call_function" or not isinstance(node.meta.get("val"), number):
        return False
    inputs: list[torch.fx.Node] = []
    torch.fx.map_arg((node.args, node.kwargs), inputs.append)
    return all(isinstance(n.meta.get("val"), number) for n in inputs)


def label_runs(
    gm: torch.fx.GraphModule,
    labels: dict[torch.fx.Node, Any],
    ops: Iterable[str] = ("call_function",),
) -> dict[torch.fx.Node, int]:
    """Number of the contiguous run of equal labels each node whose op is in `ops` belongs to,
    along the graph's order: a new run wherever the label changes."""
    ops = frozenset(ops)
    run_of: dict[torch.fx.Node, int] = {}
    run, previous = -1, object()
    for node in gm.graph.nodes:
        if node.op not in ops:
            continue
        label = labels.get(node)
        if label != previous:
            run, previous = run + 1, label
        run_of[node] = run
    return run_of


def copy_graph(
    source: torch.fx.Graph,
    input_node: Callable[[torch.fx.Graph, torch.fx.Node, int], torch.fx.Node],
    node_name: Callable[[torch.fx.Node, int], str],
) -> torch.fx.Graph:
    """A copy of a graph of placeholders, ``call_function`` nodes and one output.

    ``input_node(graph, placeholder, i)`` makes the copy of the i-th placeholder in the new
    graph (a placeholder, or a ``get_attr``); ``node_name(node, j)`` names the copy of the j-th
    ``call_function`` node. Nodes keep only their ``val`` meta: no module paths or stack
    traces, so copies of identical blocks are identical.
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    inputs = calls = 0
    for node in source.nodes:
        if node.op == "placeholder":
            new = input_node(graph, node, inputs)
            inputs += 1
        elif node.op == "output":
            new = graph.output(torch.fx.map_arg(node.args[0], env.__getitem__))
        elif node.op == "call_function":
            new = graph.call_function(
                node.target,
                torch.fx.map_arg(node.args, env.__getitem__),
                torch.fx.map_arg(node.kwargs, env.__getitem__),
            )
            new.name = node_name(node, calls)
            calls += 1
        else:
            raise TypeError(f"trt_subgraph: unexpected {node.op} node {node.name} in a subgraph")
        if "val" in node.meta:
            new.meta["val"] = node.meta["val"]
        env[node] = new
    return graph
