"""Split each block into engine-supported pieces and PyTorch-fallback nodes.

``CapabilityBasedPartitioner`` proposes maximal cycle-free groups of supported nodes over the
whole graph; each group is then cut at block-label boundaries. Blocks are contiguous runs in
the graph's topological order, so each cut stays cycle-free (a path that left a piece and came
back would have to leave the run, and a run has nothing before its end to come back from).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import torch.fx

from ._compat import CapabilityBasedPartitioner, OperatorSupportBase
from .fx_utils import is_size_arithmetic, label_runs

# Ops that move no data: a piece made of these alone is not worth an engine call.
_NON_COMPUTE = {
    "aten.view.default",
    "aten._unsafe_view.default",
    "aten.t.default",
    "aten.permute.default",
    "aten.expand.default",
    "aten.unsqueeze.default",
    "aten.squeeze.dim",
    "aten.alias.default",
    "aten.detach.default",
}


class _Support(OperatorSupportBase):
    def __init__(self, is_supported: Callable[[torch.fx.Node], bool]) -> None:
        super().__init__()
        self._is_supported = is_supported

    def is_node_supported(self, submodules, node: torch.fx.Node) -> bool:
        return node.op == "call_function" and self._is_supported(node)


def is_compute(node: torch.fx.Node) -> bool:
    return node.target is not operator.getitem and str(node.target) not in _NON_COMPUTE


def find_pieces(
    gm: torch.fx.GraphModule,
    labels: dict[torch.fx.Node, str | None],
    is_supported: Callable[[torch.fx.Node], bool],
    min_block_size: int,
) -> list[list[torch.fx.Node]]:
    """Pieces (nodes in graph order) to hand to the engine; all other nodes run in PyTorch."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    run_of = label_runs(gm, labels)
    partitioner = CapabilityBasedPartitioner(gm, _Support(is_supported), allows_single_node_partition=True)
    pieces: list[list[torch.fx.Node]] = []
    for partition in partitioner.propose_partitions():
        by_run: dict[int, list[torch.fx.Node]] = {}
        for node in partition.nodes:
            by_run.setdefault(run_of[node], []).append(node)
        for nodes in by_run.values():
            nodes.sort(key=order.__getitem__)
            if sum(map(is_compute, nodes)) >= min_block_size:
                pieces.append(nodes)
    pieces.sort(key=lambda nodes: order[nodes[0]])
    return pieces


def with_float_sizes(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """`nodes` (a piece, in graph order) plus copies of the size arithmetic that computes the
    SymFloats they read, such as an interpolation's scale (``h_out / h``), in graph order.

    A piece of a dynamic graph is compiled on size symbols of its own (`trt_subgraph.symbolic`),
    bound from its inputs' sizes and SymInts. A SymFloat input binds none, and inductor's cache
    cannot key a graph that takes one, so its artifact could not be kept. With the arithmetic
    copied in, the piece takes the sizes themselves; the originals stay for other readers."""
    inside = set(nodes)
    copies: dict[torch.fx.Node, torch.fx.Node] = {}

    def copy_of(value: torch.fx.Node, reader: torch.fx.Node) -> torch.fx.Node:
        if value in inside or not (isinstance(value.meta.get("val"), torch.SymFloat) and is_size_arithmetic(value)):
            return value
        if value not in copies:
            with gm.graph.inserting_before(reader):  # its own float arguments are copied first
                copies[value] = gm.graph.node_copy(value, lambda arg: copy_of(arg, reader))
        return copies[value]

    for node in nodes:
        read = functools.partial(copy_of, reader=node)
        node.args, node.kwargs = torch.fx.map_arg(node.args, read), torch.fx.map_arg(node.kwargs, read)
    if not copies:
        return nodes
    for original in reversed(copies):  # readers before what they read
        if not original.users:
            gm.graph.erase_node(original)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(inside | set(copies.values()), key=order.__getitem__)
