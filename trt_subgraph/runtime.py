"""The assembled forward: engine calls plus PyTorch fallback ops, optionally one CUDA graph.

Weights are graph inputs, so torch-native engines read the current values on every call. Under
a CUDA graph the weights are static inputs: replays read their memory in place, and a changed
address or version counter (a replaced parameter, ``load_state_dict``, an in-place update under
``no_grad``) re-records the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._compat import version_counter

log = logging.getLogger(__name__)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class PieceRunner(torch.nn.Module):
    """One instance of a unique subgraph inside the assembled graph."""

    def __init__(self, sub: Any, runner: Callable[..., Any]) -> None:
        super().__init__()
        self.fingerprint = sub.fingerprint
        self.canonical = sub.gm
        self.runner = runner

    def forward(self, *args: Any) -> tuple:
        try:
            out = self.runner(*args)
        except Exception as exc:
            if self.runner is self.canonical or _capturing():
                raise
            # An engine that fails at run time is replaced by PyTorch for good, loudly.
            log.warning(
                "trt_subgraph: subgraph %s failed in its engine (%s: %s); running it in PyTorch",
                self.fingerprint,
                type(exc).__name__,
                exc,
            )
            self.runner = self.canonical
            out = self.runner(*args)
        return tuple(out) if isinstance(out, list) else out


def cudagraph_blocker(example_inputs: Sequence[Any]) -> str | None:
    """Why the forward cannot be one CUDA graph, or None when it can."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if len(tensors) != len(example_inputs):
        return "dynamic shapes (symbolic sizes among the inputs)"
    if any(any(isinstance(s, torch.SymInt) for s in t.shape) for t in tensors):
        return "dynamic shapes"
    if not tensors or any(t.device.type != "cuda" for t in tensors):
        return "inputs are not all on a CUDA device"
    if len({t.device for t in tensors}) > 1:
        return "inputs on several devices"
    return None


class CUDAGraphForward:
    """Replays the whole forward as one CUDA graph; weights are static, activations copied in.

    The first call runs uncaptured and the second records, as inductor's CUDA graph trees do: the
    first output does not wait for a capture, and one-time lazy set-up (cuBLAS handles, kernel
    loading) happens before any capture.
    """

    def __init__(self, forward: Callable[[list], Any], static_positions: Sequence[int]) -> None:
        self.forward = forward
        self.static_positions = list(static_positions)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None
        self.warmed_up = False
        self.records = 0

    def __call__(self, args: list) -> Any:
        if self.failed is not None:
            return self.forward(list(args))
        if not self.warmed_up:
            self.warmed_up = True
            return self.forward(list(args))
        # A changed address or version counter (replaced or updated weight) re-records: engines
        # and ops that hold a derived copy of a weight (TensorRT refit, 2:4 compressed weights)
        # refresh it while recording, since replays run no Python.
        addresses = [(args[i].data_ptr(), version_counter(args[i])) for i in self.static_positions]
        if self.graph is None or addresses != self.addresses:
            if not self._record(args, addresses):
                return self.forward(list(args))
        for i, static in self.copy_in:
            static.copy_(args[i])
        self.graph.replay()
        return [o.clone() if isinstance(o, torch.Tensor) else o for o in self.outputs]

    def _record(self, args: list, addresses: list[int]) -> bool:
        static = set(self.static_positions)
        inputs = [a if i in static or not isinstance(a, torch.Tensor) else a.clone() for i, a in enumerate(args)]
        self.copy_in = [(i, inputs[i]) for i, a in enumerate(args) if i not in static and isinstance(a, torch.Tensor)]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # a side-stream run before capture, as torch.cuda.graphs asks
                self.forward(list(inputs))
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self.forward(list(inputs))
        except Exception as exc:  # capture-unsafe op: stay correct, stay uncaptured
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("trt_subgraph: CUDA graph capture failed (%s); running without CUDA graphs", self.failed)
            return False
        self.graph, self.outputs, self.addresses = graph, outputs, addresses
        self.records += 1
        return True
