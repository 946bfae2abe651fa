"""The ``trt_subgraph`` torch.compile backend (registered by entry point, never on import).

Dynamo hands us a torch-level graph with parameters as inputs. Inference graphs are lowered
to ATen through aot_autograd's inference path (which keeps ``nn_module_stack``) and go through
the pipeline; graphs that need gradients take inductor's differentiable path instead.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx

from . import engines
from ._compat import aot_autograd, inductor_compile_fx
from .options import Options
from .pipeline import Compilation
from .regions import compile_regions

log = logging.getLogger("trt_subgraph")
_warned_grad = False


def trt_subgraph_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    *,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Any:
    """Compile one Dynamo graph. ``options``: see :class:`trt_subgraph.options.Options`."""
    opts = Options.from_user(options, mode)
    engine, reason = engines.select(
        opts.engine, torch_executed_ops=opts.torch_executed_ops, sparsity=opts.sparsity
    )
    if torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    ):
        return _differentiable(gm, example_inputs, engine.name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weight_flags = [_is_weight(p, x) for p, x in zip(placeholders, example_inputs)]
    try:
        compiled = compile_regions(gm, list(example_inputs), weight_flags, opts, engine, reason)
    except Exception as exc:  # lowering whole is slower to compile, never wrong
        log.warning("trt_subgraph: region-by-region lowering failed (%s: %s); lowering the whole graph",
                    type(exc).__name__, exc)
        compiled = None
    if compiled is not None:
        return compiled
    compilation = Compilation(opts, engine, reason, weight_flags, list(example_inputs))
    return aot_autograd(fw_compiler=compilation, inference_compiler=compilation)(gm, example_inputs)


def _differentiable(gm: torch.fx.GraphModule, example_inputs: list[Any], engine: str) -> Any:
    """Engines return outputs without autograd history, so graphs that need grad go elsewhere."""
    global _warned_grad
    if not _warned_grad:
        _warned_grad = True
        log.warning(
            "trt_subgraph: gradients are enabled and inputs require grad; engines are inference-only, "
            "so this graph runs through %s (differentiable). Use torch.no_grad() or "
            "torch.inference_mode() for engine execution.",
            "eager PyTorch" if engine == "eager" else "inductor",
        )
    if engine == "eager":
        return gm.forward
    return inductor_compile_fx(gm, example_inputs)


def _is_weight(placeholder: torch.fx.Node, example: Any) -> bool:
    """Parameters and buffers of modules (Dynamo lifts them as graph inputs)."""
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", "")
    if name:
        return "._parameters[" in name or "._buffers[" in name
    return isinstance(example, torch.nn.Parameter)


def reset() -> None:
    """Called by ``torch._dynamo.reset()``: forget built artifacts held in memory."""
    from .build import clear_memory_cache

    clear_memory_cache()


trt_subgraph_backend.reset = reset  # type: ignore[attr-defined]
