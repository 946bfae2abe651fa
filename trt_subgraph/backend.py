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
from ._state import reset, warn_once
from .engines.base import Engine
from .fx_utils import placeholders
from .options import Options
from .pipeline import Compilation, Lowered
from .regions import compile_regions

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
        return _differentiable(gm, example_inputs, engine)
    weight_flags = [_is_weight(p, x) for p, x in zip(placeholders(gm), example_inputs)]
    try:
        compiled = compile_regions(gm, list(example_inputs), weight_flags, opts, engine, reason, capture)
    except Exception as exc:  # lowering whole is slower to compile, never wrong
        log.warning(
            "trt_subgraph: region-by-region lowering failed (%s: %s); lowering the whole graph", type(exc).__name__, exc
        )
        compiled = None
    if compiled is not None:
        return compiled
    compilation = Compilation(opts, engine, reason, weight_flags, list(example_inputs), capture=capture)
    return aot_autograd(fw_compiler=compilation, inference_compiler=compilation)(gm, example_inputs)


def _differentiable(gm: torch.fx.GraphModule, example_inputs: list[Any], engine: Engine) -> Any:
    """Engines return outputs without autograd history, so graphs that need grad go elsewhere."""
    eager = engine.differentiable_fallback == "eager"
    warn_once(
        log,
        "grad path",
        "trt_subgraph: gradients are enabled and inputs require grad; engines are inference-only, "
        "so this graph runs through %s (differentiable). Use torch.no_grad() or "
        "torch.inference_mode() for engine execution.",
        "eager PyTorch" if eager else "inductor",
    )
    if eager:
        return gm.forward
    return inductor_compile_fx(gm, example_inputs)


def _is_weight(placeholder: torch.fx.Node, example: Any) -> bool:
    """Parameters and buffers of modules (Dynamo lifts them as graph inputs)."""
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", "")
    if name:
        return "._parameters[" in name or "._buffers[" in name
    return isinstance(example, torch.nn.Parameter)


# ``torch._dynamo.reset()`` calls this: forget all of trt_subgraph's per-process state.
trt_subgraph_backend.reset = reset  # type: ignore[attr-defined]
