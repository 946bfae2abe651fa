"""Functional all-reduces in a lowered graph run in place where nothing else reads their input.

Tensor-parallel models call ``torch.distributed._functional_collectives.all_reduce``, which
Dynamo keeps in the graph as ``_c10d_functional.all_reduce`` (then ``wait_tensor``); it runs in
PyTorch between the engine pieces. That op is out of place: it copies its input and reduces the
copy. Where its input is a new tensor that nothing else reads (an engine piece's output made
inside the piece, or an ATen op's), the in-place ``all_reduce_`` gives the same result without
the copy, as inductor's reinplacing does for the collectives of a whole graph
(``torch/_inductor/fx_passes/reinplace.py``, ``inplaceable_collective_ops``).
"""

from __future__ import annotations

import operator

import torch.fx

from ._compat import all_reduce_ops, is_view_op, returns_new_tensors
from .fx_utils import output_node

__all__ = ["fresh_outputs", "reinplace_all_reduces"]


def _storage_root(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose tensor `node`'s shares memory with: followed through views and through
    ``aten._unsafe_view``, which shares its input's memory though its schema does not say so."""
    while node.op == "call_function" and (is_view_op(node.target) or str(node.target) == "aten._unsafe_view.default"):
        node = node.args[0]
    return node


def fresh_outputs(gm: torch.fx.GraphModule) -> frozenset[int]:
    """The positions of `gm`'s outputs (a piece's ATen graph, outputs as a tuple) that are new
    tensors no other output shares memory with: each made by an ATen op that returns no alias
    of its arguments (or a view of such a tensor that no other output reaches), never an input."""
    outputs = list(output_node(gm).args[0])
    roots = [_storage_root(n) if isinstance(n, torch.fx.Node) else None for n in outputs]
    fresh = set()
    for i, root in enumerate(roots):
        if root is not None and root.op == "call_function" and returns_new_tensors(root.target):
            if roots.count(root) == 1:
                fresh.add(i)
    return frozenset(fresh)


def reinplace_all_reduces(gm: torch.fx.GraphModule, fresh: dict[str, frozenset[int]]) -> int:
    """Turn each ``_c10d_functional.all_reduce`` of `gm` whose input only it reads, and is a new
    contiguous tensor, into ``all_reduce_`` on that input; the number turned. `fresh`: for each
    engine piece's module name in `gm`, its :func:`fresh_outputs` (read through ``getitem``)."""
    ops = all_reduce_ops()
    if ops is None:
        return 0
    functional, inplace = ops
    turned = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not functional:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or len(source.users) != 1:
            continue
        value = source.meta.get("val")
        if not isinstance(value, torch.Tensor) or not value.is_contiguous():
            continue  # NCCL reduces contiguous tensors only: the functional op copies into one
        if _is_fresh(source, fresh):
            node.target = inplace
            turned += 1
    return turned


def _is_fresh(node: torch.fx.Node, fresh: dict[str, frozenset[int]]) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        piece = node.args[0]
        return (
            isinstance(piece, torch.fx.Node)
            and piece.op == "call_module"
            and node.args[1] in fresh.get(str(piece.target), frozenset())
        )
    return _storage_root(node) is node and returns_new_tensors(node.target)
