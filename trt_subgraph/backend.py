"""The ``trt_subgraph`` torch.compile backend (registered by entry point, never on import).

Dynamo hands us a torch-level graph with parameters as inputs. Inference graphs are lowered
to ATen through aot_autograd's inference path (which keeps ``nn_module_stack``) and go through
the pipeline; graphs that need gradients take inductor's differentiable path instead.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import torch
import torch.fx

from . import engines, memory_format, plan_cache, ranks
from ._compat import (
    OpOverload,
    OpOverloadPacket,
    aot_autograd,
    custom_meta_reaches_aten_nodes,
    decomposed_while_tracing,
    dynamo_static_input,
    inductor_compile_fx,
    without_aot_autograd_cache,
)
from ._state import reset, warn_once
from .engines.base import TORCH_EXECUTED, Engine, device_types
from .fx_utils import placeholders
from .options import Options
from .pipeline import Compilation, Lowered
from .regions import compile_regions
from .report import Report, record
from .saved import CompiledForward, Plan, PlannedGraph, Recorder

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
    weight_flags = [_is_weight(p, x) for p, x in zip(placeholders(gm), example_inputs)]
    key, note = _plan_key(gm, list(example_inputs), weight_flags, opts, engine, capture)
    if key is not None and (found := plan_cache.lookup(key, opts)) is not None:
        if opts.rank_split_builds == "auto" and engine.persistable:
            ranks.take_part_without_builds()  # the ranks that lower this graph expect every rank
        return found
    compiled = _lower(gm, list(example_inputs), weight_flags, opts, engine, reason, capture)
    if key is not None:
        note = plan_cache.store(key, compiled, opts)
    if compiled._plan is not None:
        compiled._plan.report.regions["plan"] = note
    return compiled


def _plan_key(gm, example_inputs, weight_flags, options, engine, capture) -> tuple[str | None, str]:
    """(the plan cache's key of this graph, "") or (None, why the plan cache is not used)."""
    if not options.plan_cache or options.disk_cache_dir is None:
        return None, "off" if not options.plan_cache else "off (disk cache off)"
    if capture is not None:
        return None, "off (trt_subgraph.capture)"
    try:
        return plan_cache.plan_key(gm, example_inputs, weight_flags, options, engine), ""
    except plan_cache.NotCacheable as exc:
        return None, f"not cached ({exc})"
    except Exception as exc:  # the plan cache must never stop a compile
        log.warning("trt_subgraph: no plan cache key for this graph (%s: %s)", type(exc).__name__, exc)
        return None, f"not cached ({type(exc).__name__}: {exc})"


def _lower(gm, example_inputs, weight_flags, opts, engine, reason, capture) -> CompiledForward:
    """The compiled forward of an inference graph, region by region where regions apply."""
    _mark_decomposed_ops(gm, opts.torch_executed_ops)
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
    """Whether a graph input is a parameter or buffer of a module (Dynamo lifts them as graph
    inputs): a weight, static in the forward's CUDA graph; any other input is an activation,
    copied into the graph at every replay.

    Under ``torch.compile`` Dynamo's source of the input says so (``..._buffers['running_mean']``).
    Under ``aot_compile`` inputs carry no source: there a parameter is a weight, and so is a
    tensor whose input name, which Dynamo derives from its source
    (``L_self_modules_bn_buffers_running_mean_``), names a module's parameters or buffers and
    which Dynamo marked static, as it marks module state. A tensor the caller passes stays an
    activation when only one of the two holds: named like a buffer (``L_my_buffers_y_``), or
    marked static by its user (``torch._dynamo.mark_static_address``).
    """
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", "")
    if name:
        return "._parameters[" in name or "._buffers[" in name
    if isinstance(example, torch.nn.Parameter):
        return True
    from_module = _MODULE_STATE.search(str(placeholder.target)) is not None
    return isinstance(example, torch.Tensor) and from_module and dynamo_static_input(placeholder)


# Dynamo's name for an input reached through a module's ``._parameters[...]``/``._buffers[...]``
_MODULE_STATE = re.compile(r"_(?:parameters|buffers)_")


# ``torch._dynamo.reset()`` calls this: forget all of trt_subgraph's per-process state.
trt_subgraph_backend.reset = reset  # type: ignore[attr-defined]
