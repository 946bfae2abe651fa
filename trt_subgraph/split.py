"""Find repeated-block boundaries in a Dynamo or ATen graph.

Every compute node gets a block label (or None for glue between blocks), from, in order:
``invoke_subgraph`` calls (``torch.compiler.nested_compile_region``), repeated
``nn_module_stack`` prefixes, else a structural matcher over the op sequence. Partitioning
then runs inside each block, so a partition never crosses a block boundary and identical
blocks produce identical pieces.
"""

from __future__ import annotations

import collections
import logging
import operator
from typing import Any

import torch.fx

from ._compat import invoke_subgraph_op
from .engines.base import op_name
from .fx_utils import placeholders

log = logging.getLogger(__name__)

BLOCK_META = "trt_subgraph_block"
# Below this many ops the structural matcher finds noise, not blocks.
_MIN_STRUCTURAL_PERIOD = 4
_MAX_STRUCTURAL_NODES = 6000


def inline_invoke_subgraphs(gm: torch.fx.GraphModule) -> int:
    """Inline every ``invoke_subgraph`` call, tagging the inlined nodes with their call index.

    The shared body is one GraphModule; inlining gives each call its own nodes (so fallback
    pieces and weights stay per instance) while the tag keeps the boundary.
    """
    hop = invoke_subgraph_op()
    if hop is None:
        return 0
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is hop]
    for index, call in enumerate(calls):
        body = getattr(gm, call.args[0].target)
        operands = call.args[2:]
        _inline_body(gm, call, body, operands, f"invoke_subgraph.{index}")
    if calls:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return len(calls)


def _inline_body(gm, call, body, operands, label) -> None:
    env: dict[torch.fx.Node, Any] = {}
    for placeholder, operand in zip(placeholders(body), operands):
        env[placeholder] = operand
    outputs = None
    with gm.graph.inserting_before(call):
        for node in body.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                outputs = torch.fx.map_arg(node.args[0], lambda n: env[n])
                continue
            if node.op == "get_attr":
                # A nested region: lift its body onto the outer module under a unique name.
                attr = getattr(body, node.target)
                name = f"_{label.replace('.', '_')}_{node.target}"
                setattr(gm, name, attr)
                new = gm.graph.get_attr(name)
            else:
                new = gm.graph.node_copy(node, lambda n: env[n])
            new.meta[BLOCK_META] = label
            env[node] = new
    for user in list(call.users):
        if user.op == "call_function" and user.target is operator.getitem:
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
    if call.users:
        raise RuntimeError("trt_subgraph: invoke_subgraph output used other than by indexing")
    gm.graph.erase_node(call)


def assign_blocks(gm: torch.fx.GraphModule) -> tuple[dict[torch.fx.Node, str | None], str]:
    """Block label for every call node, and the method that found the blocks."""
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    if any(BLOCK_META in n.meta for n in nodes):
        labels = {n: n.meta.get(BLOCK_META) for n in nodes}
        method = "invoke_subgraph"
    elif any(n.meta.get("nn_module_stack") for n in nodes):
        labels = _labels_from_module_stack(nodes)
        method = "nn_module_stack"
    else:
        labels = _labels_from_structure(nodes)
        method = "structural"
    if not any(labels.values()):
        method = "none"
    return _fill_gaps(nodes, labels), method


def _stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        out.append((path, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"))
    return out


def _signature(nodes: list[torch.fx.Node]) -> tuple:
    """A cheap structural signature of a module's region, to tell repeats from look-alikes."""
    out = []
    for n in nodes:
        val = n.meta.get("val", n.meta.get("example_value"))
        shape = tuple(str(s) for s in val.shape) if hasattr(val, "shape") else None
        dtype = str(val.dtype) if hasattr(val, "dtype") else None
        out.append((op_name(n.target), shape, dtype))
    return tuple(out)


def _labels_from_module_stack(nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, str | None]:
    children: dict[str | None, dict[str, str]] = collections.defaultdict(dict)
    members: dict[str, list[torch.fx.Node]] = collections.defaultdict(list)
    has_children: set[str] = set()
    for node in nodes:
        parent = None
        for path, cls in _stack(node):
            children[parent].setdefault(path, cls)
            members[path].append(node)
            if parent is not None:
                has_children.add(parent)
            parent = path

    blocks: set[str] = set()

    def visit(parent: str | None) -> None:
        by_class: dict[str, list[str]] = collections.defaultdict(list)
        for path, cls in children.get(parent, {}).items():
            by_class[cls].append(path)
        for paths in by_class.values():
            candidates = [p for p in paths if p in has_children]
            signatures = collections.Counter(_signature(members[p]) for p in candidates)
            if len(candidates) >= 2 and max(signatures.values()) >= 2:
                blocks.update(candidates)
            else:
                for path in paths:
                    visit(path)

    visit(None)
    labels: dict[torch.fx.Node, str | None] = {}
    for node in nodes:
        labels[node] = next((path for path, _ in _stack(node) if path in blocks), None)
    return labels


def _labels_from_structure(nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, str | None]:
    """Without metadata: the longest run of a periodic op sequence is a chain of blocks."""
    labels: dict[torch.fx.Node, str | None] = dict.fromkeys(nodes)
    ops = [op_name(n.target) for n in nodes]
    n = len(ops)
    if n > _MAX_STRUCTURAL_NODES:
        log.info("trt_subgraph: %d nodes without module metadata; not searching for blocks", n)
        return labels
    best = (0, 0, 0)  # (run length, period, start)
    for period in range(_MIN_STRUCTURAL_PERIOD, n // 2 + 1):
        run = 0
        for i in range(n - period):
            run = run + 1 if ops[i] == ops[i + period] else 0
            if run >= period and run > best[0]:
                best = (run, period, i - run + 1)
    run, period, start = best
    if not period:
        return labels
    repeats = (run + period) // period
    for k in range(repeats):
        for node in nodes[start + k * period : start + (k + 1) * period]:
            labels[node] = f"structural.{k}"
    return labels


def _fill_gaps(nodes, labels):
    """A node with no label between two nodes of one block belongs to that block."""
    filled = dict(labels)
    previous = None
    pending: list[torch.fx.Node] = []
    for node in nodes:
        label = labels[node]
        if label is None:
            pending.append(node)
            continue
        if pending and previous == label:
            for gap in pending:
                filled[gap] = label
        pending = []
        previous = label
    return filled
