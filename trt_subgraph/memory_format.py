"""One memory format for the activations of a whole graph, decided once (option ``memory_format``).

Why: inductor compiling a conv-heavy graph whole runs its convolutions channels-last
(``GraphLowering.decide_layout_opt`` in ``torch/_inductor/graph.py``) and converts the graph's
input once. A piece compiled alone makes that decision for itself, and since inductor returns
a graph's outputs with eager's strides (``config.keep_output_stride``), every such piece converts
its inputs to channels-last and its outputs back, on every call. Here the decision is made once,
on the Dynamo graph, before it is split: a conversion to channels-last goes in before the first
convolution that needs one, and Dynamo's metadata is recomputed from there. Convolutions,
norms, pointwise ops and residual adds keep the layout (eager's rules), so every region and
piece is traced, fingerprinted and compiled with channels-last activations: the pieces agree,
and only the graph's input is converted, as in the whole-graph compile. Graph outputs keep the
strides eager gives them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.utils.flop_counter import conv_flop_count

from ._compat import HigherOrderOperator
from ._state import warn_once
from .engines.base import Engine
from .fx_utils import output_node, placeholders
from .options import MEMORY_FORMATS

__all__ = ["MEMORY_FORMATS", "ConvShape", "apply", "decide", "prefers_channels_last"]

log = logging.getLogger(__name__)

_CONV2D = (torch.conv2d,)  # also ``F.conv2d`` and ``nn.Conv2d`` (the same builtin)
# Ops whose result depends on the memory layout of a tensor, not only on its values.
_LAYOUT_DEPENDENT = {"as_strided", "as_strided_", "set_", "stride", "data_ptr", "storage_offset", "untyped_storage"}
# Inductor's "few convolutions" bound: layout optimization is skipped when the graph has at
# least this many nodes per convolution (``decide_layout_opt``).
_NODES_PER_CONV = 300


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One 2-D convolution: input (N, C, H, W), weight (K, C/groups, R, S) and output shapes."""

    input: tuple[int, ...]
    weight: tuple[int, ...]
    output: tuple[int, ...]
    groups: int = 1


def prefers_channels_last(convs: Sequence[ConvShape]) -> bool:
    """Inductor's rule for inference graphs (torch 2.13's ``decide_layout_opt``): channels-last
    when the convolutions' FLOPs, each weighted by the speed-up inductor measured for its kind
    (grouped with more than one channel per group 1.358, both channel counts <= 64 0.783, a
    non-1x1 kernel with K*2 <= C 0.725, any other 0.823; < 1 is faster channels-last), sum to no
    more than their plain total."""
    total = weighted = 0.0
    for conv in convs:
        k, c_per_group, *kernel = conv.weight
        flops = conv_flop_count(list(conv.input), list(conv.weight), list(conv.output))
        if conv.groups > 1 and c_per_group > 1:
            factor = 1.358
        elif k <= 64 and c_per_group <= 64:
            factor = 0.783
        elif k * 2 <= c_per_group and kernel[0] > 1:
            factor = 0.725
        else:
            factor = 0.823
        total += flops
        weighted += factor * flops
    return weighted <= total


def decide(gm: torch.fx.GraphModule, choice: str, engine: Engine) -> str | None:
    """Why Dynamo graph `gm` keeps its layout under `choice`, or None when its activations go
    channels-last. Raises ValueError for a `choice` not in ``MEMORY_FORMATS``.

    ``"preserve"``: always kept. ``"channels_last"``: kept only where the rewrite cannot run: no
    2-D convolution, symbolic sizes, or ops that cannot be re-run on Dynamo's metadata (global-
    state nodes, submodule calls, higher-order ops) or that read strides (``as_strided``).
    ``"auto"``: besides, kept unless inductor would run the graph channels-last if it compiled it
    whole: 2-D convolutions on CUDA, at least one per 300 nodes, :func:`prefers_channels_last`;
    and unless the engine keeps the layout of what it is given (``Engine.keeps_layout``).
    """
    if choice not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {list(MEMORY_FORMATS)}, got {choice!r}")
    if choice == "preserve":
        return "requested"
    convs = _convs(gm)
    return _unsupported(gm, convs) or (_auto_declines(gm, convs, engine) if choice == "auto" else None)


def apply(gm: torch.fx.GraphModule, choice: str, engine: Engine) -> str:
    """Make the activations of Dynamo graph `gm` channels-last, in place, where :func:`decide`
    says so; returns the report's entry, the format and why: e.g. ``"channels_last (53 2-D
    convolutions on cuda; 1 conversion in the graph)"`` or ``"preserve (auto: no 2-D
    convolution)"``.

    A conversion goes in before each 2-D convolution whose input is not channels-last yet (in
    practice the first one only), and graph outputs get eager's strides back. Where recomputing
    the metadata fails (a ``view`` that only the contiguous layout allows), the graph is left as
    it was and the entry says why; `choice` ``"channels_last"`` then also logs a warning.
    """
    why_not = decide(gm, choice, engine)
    if choice == "preserve":
        return "preserve (requested)"
    if why_not is None:
        convs = _convs(gm)
        try:
            converted = _make_channels_last(gm, convs)
        except Exception as exc:  # e.g. a view that only the contiguous layout allows
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            why_not = f"recomputing the graph's metadata channels-last failed ({type(exc).__name__}: {message})"
    if why_not is not None:
        if choice == "channels_last" and why_not != "no 2-D convolution":
            warn_once(
                log, ("memory_format", why_not), "trt_subgraph: memory_format='channels_last' not applied: %s", why_not
            )
        return f"preserve ({choice}: {why_not})"
    device = _val(convs[0], 0).device.type
    reason = f"{len(convs)} 2-D convolution{'s' * (len(convs) > 1)} on {device}" if choice == "auto" else "requested"
    return f"channels_last ({reason}; {converted} conversion{'s' * (converted != 1)} in the graph)"


def _convs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if _is_conv2d(n)]


def _is_conv2d(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _CONV2D:
        return False
    x, w = _val(node, 0), _val(node, 1)
    return isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.dim() == 4


def _arg(node: torch.fx.Node, position: int, name: str, default: Any = None) -> Any:
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _val(node: torch.fx.Node, position: int) -> Any:
    """Dynamo's example value of the conv's input (0) or weight (1)."""
    arg = _arg(node, position, ("input", "weight")[position])
    return arg.meta.get("example_value") if isinstance(arg, torch.fx.Node) else arg


def _unsupported(gm: torch.fx.GraphModule, convs: list[torch.fx.Node]) -> str | None:
    """Why the graph's activations cannot be made channels-last here, or None."""
    if not convs:
        return "no 2-D convolution"
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt) or (
            isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape)
        ):
            return "dynamic shapes"
        if node.op == "call_module":
            return "submodule calls"
        if node.op not in ("call_function", "call_method"):
            continue
        if isinstance(node.target, HigherOrderOperator):
            return "higher-order ops"
        if value is None:
            return f"global-state or side-effect node {node.name}"
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name in _LAYOUT_DEPENDENT:
            return f"{name} reads the memory layout ({node.name})"
    return None


def _auto_declines(gm: torch.fx.GraphModule, convs: list[torch.fx.Node], engine: Engine) -> str | None:
    """Why "auto" keeps the layout of this graph, or None when it makes it channels-last."""
    if not engine.keeps_layout:
        return f"the {engine.name} engine takes contiguous inputs"
    devices = sorted({str(_val(n, 0).device) for n in convs})
    if any(not d.startswith("cuda") for d in devices):
        return f"convolutions on {', '.join(devices)} (auto decides channels-last on CUDA only)"
    nodes = len(gm.graph.nodes)
    if nodes >= _NODES_PER_CONV * len(convs):
        return f"few convolutions ({len(convs)} among {nodes} nodes)"
    shapes = [
        ConvShape(tuple(_val(n, 0).shape), tuple(_val(n, 1).shape), tuple(n.meta["example_value"].shape), _groups(n))
        for n in convs
    ]
    if not prefers_channels_last(shapes):
        return "inductor's rule expects these convolutions to be slower channels-last (grouped convolutions)"
    return None


def _groups(node: torch.fx.Node) -> int:
    return int(_arg(node, 6, "groups", 1))


def _channels_last(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_contiguous(memory_format=torch.channels_last)


class _Propagate(torch.fx.Interpreter):
    """Runs a Dynamo graph on fake tensors and keeps every node's value (placeholders and module
    attributes: their recorded example values)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = n.meta["example_value"] if n.op in ("placeholder", "get_attr") else super().run_node(n)
        self.values[n] = value
        return value


def _propagate(gm: torch.fx.GraphModule, fake_mode: Any) -> dict[torch.fx.Node, Any]:
    gm.recompile()
    interpreter = _Propagate(gm)
    with fake_mode:
        interpreter.run(*[p.meta["example_value"] for p in placeholders(gm)])
    return interpreter.values


def _convert(
    gm: torch.fx.GraphModule, value: torch.fx.Node, before: torch.fx.Node, memory_format: Any
) -> torch.fx.Node:
    """``value.contiguous(memory_format=...)`` inserted before `before`, taking over the uses of
    `value` from there on; it belongs to the module of `before` (so no block is cut)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    with gm.graph.inserting_before(before):
        node = gm.graph.call_method("contiguous", (value,), {"memory_format": memory_format})
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in before.meta:
            node.meta[key] = before.meta[key]
    value.replace_all_uses_with(
        node, delete_user_cb=lambda user: user is not node and order.get(user, -1) >= order[before]
    )
    return node


def _make_channels_last(gm: torch.fx.GraphModule, convs: list[torch.fx.Node]) -> int:
    """Convert conv inputs to channels-last until every 2-D conv gets one, keep the outputs'
    strides, and rewrite Dynamo's example values; returns how many conversions went in."""
    fake_mode = next(
        v.fake_mode
        for p in placeholders(gm)
        if (v := p.meta.get("example_value")) is not None and hasattr(v, "fake_mode")
    )
    out = output_node(gm)
    results = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    before = [r.meta.get("example_value") if isinstance(r, torch.fx.Node) else None for r in results]
    values = {n: n.meta.get("example_value") for n in gm.graph.nodes}
    added: list[torch.fx.Node] = []
    try:
        for _ in convs:
            pending = next((c for c in convs if not _channels_last(values[_arg(c, 0, "input")])), None)
            if pending is None:
                break
            added.append(_convert(gm, _arg(pending, 0, "input"), pending, torch.channels_last))
            values = _propagate(gm, fake_mode)
        if not added:
            return 0
        converted = len(added)
        for result, old in {r: b for r, b in zip(results, before) if isinstance(r, torch.fx.Node)}.items():
            new = values.get(result)
            if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and new.stride() != old.stride():
                fmt = _format_of(old)
                if fmt is None:
                    raise ValueError(
                        f"output {result.name} has strides {old.stride()}, neither contiguous nor channels-last"
                    )
                added.append(_convert(gm, result, out, fmt))
        values = _propagate(gm, fake_mode)
    except Exception:
        for node in reversed(added):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        gm.recompile()
        raise
    for node, value in values.items():
        if node.op in ("call_function", "call_method"):
            node.meta["example_value"] = value
    gm.recompile()
    return converted


def _format_of(value: torch.Tensor) -> Any:
    if value.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if value.is_contiguous(memory_format=torch.channels_last) else None
