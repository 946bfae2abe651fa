"""Where each input of an aot_autograd graph comes from, so that it is classified (weight or
activation) and given its real value from the inputs that were traced.

aot_autograd's ATen graph does not take its caller's inputs one for one: a tensor-subclass
input (a torchao-style quantized weight) becomes one input per inner tensor, an input passed
twice is passed once, views of one buffer that the graph mutates become one base, and effect
tokens or RNG state are added. aot_autograd describes every placeholder (``meta["desc"]``,
torch >= 2.9); an input that no input of the caller stands behind is an activation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from ._compat import aot_input_origin, has_aot_input_descriptors, is_traceable_wrapper_subclass
from .fx_utils import placeholders

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InputSource:
    """The caller's input at `position`, then the inner tensors named by `attrs` (outermost
    first) where that input is a tensor subclass that aot_autograd flattened."""

    position: int
    attrs: tuple[str, ...] = ()

    def value(self, inputs: Sequence[Any]) -> Any:
        """This input's value among `inputs` (one call's inputs of the caller's graph)."""
        value = inputs[self.position]
        for attr in self.attrs:
            value = getattr(value, attr)
        return value


def input_sources(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> list[InputSource | None]:
    """Per placeholder of aot_autograd's graph `gm`, where it comes from among `inputs` (what
    aot_autograd was called with), or None where aot_autograd made it.

    Without descriptors (torch 2.8) a placeholder is matched to the input at its position only
    when every placeholder's kind, dtype and rank agree with its input's; otherwise none is
    matched, so every input counts as an activation.
    """
    nodes = placeholders(gm)
    if has_aot_input_descriptors(gm):
        sources = []
        for node in nodes:
            origin = aot_input_origin(node)
            ok = origin is not None and origin[0] < len(inputs) and _resolves(InputSource(*origin), inputs)
            sources.append(InputSource(*origin) if ok else None)
        return sources
    if len(nodes) == len(inputs) and all(_agrees(n.meta.get("val"), x) for n, x in zip(nodes, inputs)):
        return [InputSource(i) for i in range(len(nodes))]
    log.info("trt_subgraph: cannot tell which inputs of the ATen graph are weights; all count as activations")
    return [None] * len(nodes)


def _resolves(source: InputSource, inputs: Sequence[Any]) -> bool:
    try:
        return isinstance(source.value(inputs), torch.Tensor) or not source.attrs
    except AttributeError:
        return False


def _agrees(val: Any, x: Any) -> bool:
    if isinstance(val, torch.Tensor) and isinstance(x, torch.Tensor):
        return val.dtype == x.dtype and val.dim() == x.dim() and not is_traceable_wrapper_subclass(x)
    return not isinstance(val, torch.Tensor) and not isinstance(x, torch.Tensor)
