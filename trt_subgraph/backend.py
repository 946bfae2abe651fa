"""The ``trt_subgraph`` torch.compile backend (registered by entry point, never on import).

Dynamo hands us a torch-level graph with parameters as inputs. Inference graphs are lowered
to ATen through aot_autograd's inference path (which keeps ``nn_module_stack``) and go through
the pipeline; graphs that need gradients take inductor's differentiable path instead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.fx

from . import engines, memory_format
from ._compat import (
    OpOverload,
    OpOverloadPacket,
    aot_autograd,
    custom_meta_reaches_aten_nodes,
    decomposed_while_tracing,
    inductor_compile_fx,
    without_aot_autograd_cache,
)
from ._state import reset, warn_once
from .engines.base import TORCH_EXECUTED, Engine
from .fx_utils import placeholders
from .options import Options
from .pipeline import Compilation, Lowered
from .regions import compile_regions
from .report import Report, record
from .saved import CompiledForward, Plan, PlannedGraph, Recorder, device_types

log = logging.getLogger(__name__)


def trt_subgraph_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    *,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
    capture: list[Lowered] | None = None,
) -> Any:
    """Compile one Dynamo graph. ``options``: see :class:`trt_subgraph.options.Options`.

    ``capture``: a list that receives what each lowered graph built, with real weights (used by
    :func:`trt_subgraph.capture`); None for normal compilation.
    """
    opts = Options.from_user(options, mode)
    engine, reason = engines.select(opts.engine, torch_executed_ops=opts.torch_executed_ops, sparsity=opts.sparsity)
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        return CompiledForward(
            _differentiable(gm, example_inputs, engine),
            engine.name,
            device_types(example_inputs),
            unsaved="it was compiled with gradients enabled and inputs that require grad (the gradient path); "
            "compile under torch.no_grad() or torch.inference_mode() to save it",
        )
    _mark_decomposed_ops(gm, opts.torch_executed_ops)
    weight_flags = [_is_weight(p, x) for p, x in zip(placeholders(gm), example_inputs)]
    layout = memory_format.apply(gm, opts.memory_format, engine)
    try:
        compiled, why = compile_regions(
            gm, list(example_inputs), weight_flags, opts, engine, reason, capture, memory_format=layout
        )
    except Exception as exc:  # lowering whole is slower to compile, never wrong
        log.warning(
            "trt_subgraph: region-by-region lowering failed (%s: %s); lowering the whole graph", type(exc).__name__, exc
        )
        compiled, why = None, f"region-by-region lowering failed ({type(exc).__name__}: {exc})"
    if compiled is not None:
        return compiled
    return _whole_graph(gm, list(example_inputs), weight_flags, opts, engine, reason, why, capture, layout)


def _whole_graph(
    gm, example_inputs, weight_flags, options, engine, engine_reason, why, capture, layout
) -> CompiledForward:
    """The whole Dynamo graph through aot_autograd and the pipeline at once; `why`: why not
    region by region (the report's ``regions``); `layout`: the report's ``memory_format``."""
    compilation = Compilation(options, engine, engine_reason, weight_flags, example_inputs, capture=capture)
    recorder = Recorder(compilation, len(example_inputs))
    with without_aot_autograd_cache():
        compiled = aot_autograd(fw_compiler=recorder, inference_compiler=recorder)(gm, example_inputs)
    report = compilation.lowered.report
    report.regions = {"path": "whole graph", "reason": why}
    report.memory_format = layout
    plan = Plan(
        options=options,
        engine=engine,
        device_types=device_types(example_inputs),
        assembly=recorder.assembly,
        report=report,
        outer=None,
        calls={},
        graphs=[PlannedGraph.of(recorder, compilation.lowered)],
    )
    return CompiledForward(compiled, engine.name, plan.device_types, plan=plan)


def _differentiable(gm: torch.fx.GraphModule, example_inputs: list[Any], engine: Engine) -> Any:
    """Engines return outputs without autograd history, so graphs that need grad go elsewhere.

    Records a report (engine ``eager`` or ``inductor``, no subgraphs) that says so, so that
    ``last_report()`` describes this graph rather than the one compiled before it.
    """
    start = time.perf_counter()
    eager = engine.differentiable_fallback == "eager"
    path = "eager PyTorch" if eager else "inductor"
    warn_once(
        log,
        "grad path",
        "trt_subgraph: gradients are enabled and inputs require grad; engines are inference-only, "
        "so this graph runs through %s (differentiable). Use torch.no_grad() or "
        "torch.inference_mode() for engine execution.",
        path,
    )
    compiled = gm.forward if eager else inductor_compile_fx(gm, example_inputs)
    record(
        Report(
            engine="eager" if eager else "inductor",
            engine_reason=f"gradient path: inputs require grad and engines are inference-only, so this graph "
            f"runs through {path} (differentiable)",
            cudagraphs="off (gradient path)",
            compile_s=time.perf_counter() - start,
        )
    )
    return compiled


def _mark_decomposed_ops(gm: torch.fx.GraphModule, ops: frozenset[str]) -> None:
    """Mark the Dynamo nodes that call an op of `ops` which tracing to ATen decomposes
    (``aten.linear`` becomes ``aten.t`` and ``aten.addmm``): the mark reaches every ATen node
    traced from them, so the engine leaves those in PyTorch (:meth:`Engine.torch_executed`).

    A Dynamo node calls such an op when its target is that op, or a torch function or
    ``Tensor`` method of the op's name (``torch._C._nn.linear``, ``torch.nn.functional.linear``,
    ``x.matmul``). Where this torch does not carry the mark through tracing, a warning says
    that the op never reaches the engine."""
    decomposed = {name for name in ops if decomposed_while_tracing(name)}
    if not decomposed:
        return
    if not custom_meta_reaches_aten_nodes():
        for name in sorted(decomposed):
            warn_once(
                log,
                ("torch_executed_ops decomposed", name),
                "trt_subgraph: torch_executed_ops names %s, which tracing to ATen decomposes into other "
                "ops, so it never reaches the engine and this option keeps nothing in PyTorch for it; "
                "name the ATen ops it becomes instead",
                name,
            )
        return
    by_name = {name.split(".")[1]: name for name in decomposed if name.startswith("aten.")}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            target = node.target
            if isinstance(target, (OpOverload, OpOverloadPacket)):
                names = {str(target), str(getattr(target, "overloadpacket", target))}
                hit = min(names & decomposed, default=None)
            elif (getattr(target, "__module__", None) or "").startswith(("torch", "_operator")):
                hit = by_name.get(getattr(target, "__name__", ""))
            else:
                hit = None
        elif node.op == "call_method":
            hit = by_name.get(node.target)
        else:
            continue
        if hit is not None:
            node.meta["custom"] = {**(node.meta.get("custom") or {}), TORCH_EXECUTED: hit}
            warn_once(
                log,
                ("torch_executed_ops decomposed", hit),
                "trt_subgraph: torch_executed_ops names %s, which tracing to ATen decomposes; the ATen ops "
                "it becomes stay in PyTorch (the report's torch_executed lists them)",
                hit,
                level=logging.INFO,
            )


def _is_weight(placeholder: torch.fx.Node, example: Any) -> bool:
    """Parameters and buffers of modules (Dynamo lifts them as graph inputs)."""
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", "")
    if name:
        return "._parameters[" in name or "._buffers[" in name
    return isinstance(example, torch.nn.Parameter)


# ``torch._dynamo.reset()`` calls this: forget all of trt_subgraph's per-process state.
trt_subgraph_backend.reset = reset  # type: ignore[attr-defined]
