"""Find repeated-block boundaries in a Dynamo or ATen graph.

Every compute node gets a block label (or None for glue between blocks), from, in order:
``invoke_subgraph`` calls (``torch.compiler.nested_compile_region``), repeated
``nn_module_stack`` prefixes, else a structural matcher over the op sequence. Partitioning
then runs inside each block, so a partition never crosses a block boundary and identical
blocks produce identical pieces. Blocks are found once per graph: on the Dynamo graph where it
is split into regions (each region then is one block or glue, cut no further), else on the ATen
graph.
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
    """Blocks from module paths: the outermost instances of the graph's block classes.

    A module with child modules in the graph is a *candidate* when a sibling has its class (the
    layers of a stack, the blocks of a stage). A class *repeats* when two of its candidates
    anywhere in the graph compute alike (equal signatures). A repeating class is a block class
    unless one of its candidates sits inside an instance of another repeating class:
    repeated sub-modules of one block (sibling norm-activation or conv-norm-activation modules)
    are not blocks. An instance that holds candidates of its own class is a container (the
    sequence of a model's stages), neither a block nor a reason to drop another class. Every
    other instance of a block class is a block, one inside another block excepted: the single
    block of a stage too, not only the repeated ones.
    """
    parent_of: dict[str, str | None] = {}  # in graph order: a module before the modules inside it
    class_of: dict[str, str] = {}
    members: dict[str, list[torch.fx.Node]] = collections.defaultdict(list)
    for node in nodes:
        parent = None
        for path, cls in _stack(node):
            parent_of.setdefault(path, parent)
            class_of.setdefault(path, cls)
            members[path].append(node)
            parent = path

    def ancestors(path: str) -> list[str]:
        out = []
        while (path := parent_of[path]) is not None:
            out.append(path)
        return out

    composite = {p for p in parent_of.values() if p is not None}
    siblings = collections.Counter((parent_of[p], class_of[p]) for p in composite)
    candidates = [p for p in parent_of if p in composite and siblings[(parent_of[p], class_of[p])] >= 2]
    signatures: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in candidates:
        signatures[class_of[path]][_signature(members[path])] += 1
    repeated = {cls for cls, counts in signatures.items() if max(counts.values()) >= 2}
    containers = {a for p in candidates for a in ancestors(p) if class_of[a] == class_of[p]}
    block_like = {p for p in composite if class_of[p] in repeated and p not in containers}
    nested = {
        class_of[p] for p in candidates if any(a in block_like and class_of[a] != class_of[p] for a in ancestors(p))
    }
    block_classes = repeated - nested
    blocks: set[str] = set()
    for path in parent_of:
        if class_of[path] in block_classes and path in block_like and not blocks.intersection(ancestors(path)):
            blocks.add(path)
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
