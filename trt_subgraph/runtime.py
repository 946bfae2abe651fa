"""The assembled forward: engine calls plus PyTorch fallback ops, optionally replayed as CUDA
graphs (one per input-shape signature).

Weights are graph inputs, so torch-native engines read the current values on every call. Under
a CUDA graph the weights are static inputs: replays read their memory in place, and a changed
address or version counter (a replaced parameter, ``load_state_dict``, an in-place update under
``no_grad``) re-records the graph.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import _state
from ._compat import version_counters

log = logging.getLogger(__name__)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class PieceRunner(torch.nn.Module):
    """One instance of a unique subgraph inside the assembled graph.

    When its engine raises, the same inputs go through the subgraph in PyTorch. If PyTorch
    raises too, the inputs are at fault (an out-of-range index, say): PyTorch's error is raised,
    as eager would, and the engine is kept. Otherwise the engine is at fault: this instance runs
    in PyTorch from then on, with a warning, and `record` (the report's entry) counts a demotion.
    `module_path`: the module the piece computes (``layers.3.attn``), for :func:`observe_pieces`.
    """

    def __init__(self, sub: Any, runner: Callable[..., Any], record: Any = None, *, module_path: str = "") -> None:
        super().__init__()
        self.fingerprint = sub.fingerprint
        self.canonical = sub.gm
        self.runner = runner
        self.record = record
        self.module_path = module_path
        self._show_record(runner)

    def bind(self, runner: Callable[..., Any]) -> None:
        """Run `runner` from the next call on (the engine's, once its artifact is there)."""
        self._modules.pop("runner", None)  # a module runner (PyTorch's) is a child module
        self.runner = runner
        self._show_record(runner)

    def _show_record(self, runner: Callable[..., Any]) -> None:
        """A runner with a ``watch(record)`` method reports into the record what it runs elsewhere."""
        if self.record is not None and hasattr(runner, "watch"):
            runner.watch(self.record)

    def forward(self, *args: Any) -> tuple:
        try:
            out = self.runner(*args)
        except Exception as exc:
            if self.runner is self.canonical or _capturing():
                raise
            try:
                out = self.canonical(*args)
            except Exception as pytorch_exc:  # PyTorch rejects these inputs too: the user's error
                log.debug("trt_subgraph: subgraph %s: engine %r, PyTorch %r", self.fingerprint, exc, pytorch_exc)
                raise pytorch_exc from None
            error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "trt_subgraph: subgraph %s failed in its engine (%s) on inputs that PyTorch runs; "
                "this instance runs in PyTorch from now on",
                self.fingerprint,
                error,
            )
            self.runner = self.canonical
            if self.record is not None:
                self.record.demotions.append(error)
        out = tuple(out) if isinstance(out, list) else out
        if _observers and not _capturing():
            path = _region_path(self.module_path)
            for observer in list(_observers):
                observer(self, path, args, out)
        return out


# Observers of piece calls (``trt_subgraph.compare``); empty in normal runs.
_observers: list[Callable[..., None]] = []
# While observed: (module path of the region whose compiled code runs, of the region running it).
_regions: list[tuple[str, str]] = []


@contextlib.contextmanager
def observe_pieces(observer: Callable[[PieceRunner, str, tuple, Any], None]) -> Iterator[None]:
    """Call ``observer(piece, module_path, args, outputs)`` after every piece call inside the
    block (outside CUDA graph capture; replays run no Python). `module_path` is the module of the
    instance that ran, also where a region reuses another region's compiled code."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def run_region(compiled: Callable[..., Any], args: tuple, lowered_path: str, path: str) -> Any:
    """Call a region's compiled code (lowered for the module at `lowered_path`) for the region of
    the module at `path`: observed pieces inside report their paths under `path`."""
    if not _observers or lowered_path == path:
        return compiled(*args)
    _regions.append((lowered_path, path))
    try:
        return compiled(*args)
    finally:
        _regions.pop()


def _region_path(path: str) -> str:
    if not _regions:
        return path
    old, new = _regions[-1]
    if old and (path == old or path.startswith(old + ".")):
        return new + path[len(old) :]
    return path


def cudagraph_blocker(example_inputs: Sequence[Any]) -> str | None:
    """Why the forward cannot be replayed as CUDA graphs, or None when it can (symbolic sizes
    can: one graph per input-shape signature)."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if any(not isinstance(x, (torch.Tensor, int, torch.SymInt)) or isinstance(x, bool) for x in example_inputs):
        return "inputs other than tensors and sizes"
    if not tensors or any(t.device.type != "cuda" for t in tensors):
        return "inputs are not all on a CUDA device"
    if len({t.device for t in tensors}) > 1:
        return "inputs on several devices"
    return None


@dataclasses.dataclass(frozen=True)
class BatchPadding:
    """How a forward pads its batch to the next of `sizes` (see `trt_subgraph.padding`, which
    decides that it may): dim 0 of the tensor inputs at `inputs` is the batch, the integer
    inputs at `sizes_at` equal it, and dim 0 of the outputs at `outputs` is a multiple of it
    with the batch outermost (the other outputs do not depend on it). A call whose batch inputs
    disagree on the batch is not padded."""

    sizes: tuple[int, ...]  # ascending
    inputs: tuple[int, ...]
    sizes_at: tuple[int, ...]
    outputs: tuple[int, ...]

    def batch_of(self, args: list) -> int | None:
        """The call's batch, or None when its batch inputs and sizes disagree."""
        sizes = {args[i].shape[0] for i in self.inputs} | {args[i] for i in self.sizes_at}
        return sizes.pop() if len(sizes) == 1 else None

    def target(self, batch: int) -> int:
        """The listed size `batch` pads to: the smallest one >= `batch`, else `batch` itself."""
        return next((size for size in self.sizes if size >= batch), batch)

    def pad(self, args: list, batch: int, target: int) -> list:
        """`args` with each batch input grown to `target` rows by repeating its last row (real
        values: an index or a mask stays valid) and each batch size set to `target`."""
        padded = list(args)
        for i in self.inputs:
            a = args[i]
            padded[i] = torch.cat([a, a[-1:].expand(target - batch, *a.shape[1:])])
        for i in self.sizes_at:
            padded[i] = target
        return padded

    def unpad(self, outputs: Sequence[Any], batch: int, target: int) -> list:
        """The rows of the real batch of each batch output."""
        out = list(outputs)
        for i in self.outputs:
            rows = out[i].shape[0] // target * batch
            out[i] = out[i][:rows]
        return out


_LIVE: weakref.WeakSet[CUDAGraphForward] = weakref.WeakSet()  # for `release_cuda_graphs`
_LIVE_LOCK = threading.Lock()  # a WeakSet cannot be iterated while another thread adds to it


@_state.on_reset
def release_cuda_graphs() -> None:
    """Drop the recorded CUDA graphs of every compiled function of this process (each records
    again at its next calls). Run by ``trt_subgraph.reset()``."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for forward in live:
        forward.invalidate()


@dataclasses.dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    copy_in: list[tuple[int, torch.Tensor]]  # (input position, its static buffer)
    outputs: list[Any]
    addresses: tuple[list[int], list[int]]  # the static inputs' data pointers and version counters


class CUDAGraphForward:
    """Replays the forward as CUDA graphs, one per input-shape signature (the shapes of the tensor
    inputs and the values of the integer ones); weights are static, activations copied in.

    A signature's first call runs uncaptured and its second records, as inductor's CUDA graph
    trees do: the first output does not wait for a capture, and one-time lazy set-up (cuBLAS
    handles, kernel loading) happens before any capture. Every call runs the forward's work
    exactly once, the recording call too (its output comes from the run before the capture): a
    forward with collectives (tensor parallel) stays in step with the other ranks, whichever
    call each of them records at. The capture is thread-local, as in CUDA graph trees, so that
    other threads (background builds, NCCL's watchdog) may use CUDA meanwhile. At most
    `max_shapes` graphs are kept;
    recording one more drops the least recently replayed. All graphs share one memory pool: they
    replay one at a time on one stream and their outputs are copied out at each replay, so their
    temporaries can share memory. `padding`: pad the batch to listed sizes, so that nearby batch
    sizes replay one graph (None: no padding).

    ``trt_subgraph.reset()`` (and ``torch._dynamo.reset()``) drops every recorded graph of the
    process; the next calls record again. NCCL cannot destroy a communicator while a CUDA graph
    that captured its collectives exists: ``destroy_process_group()`` hangs
    (https://github.com/pytorch/pytorch/issues/115388), so reset before it.

    Per call, the host reads the shapes of the inputs that are not static (the static ones, the
    weights, have the shapes Dynamo guards on) and each static input's data pointer and version
    counter: about 0.5 µs per weight per call, measured on a CPU with a stand-in graph.
    """

    def __init__(
        self,
        forward: Callable[[list], Any],
        static_positions: Sequence[int],
        max_shapes: int = 8,
        padding: BatchPadding | None = None,
    ) -> None:
        self.forward = forward
        self.static_positions = list(static_positions)
        self.max_shapes = max_shapes
        self.padding = padding
        self.varying: list[int] | None = None  # positions of the other inputs (known at the first call)
        self.padded_inputs = frozenset(padding.inputs) if padding is not None else frozenset()
        self.padded_sizes = frozenset(padding.sizes_at) if padding is not None else frozenset()
        self.graphs: collections.OrderedDict[tuple, _Recorded] = collections.OrderedDict()
        self.called_once: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self.pool: Any = None
        self.failed: str | None = None
        self.records = 0
        with _LIVE_LOCK:
            _LIVE.add(self)

    def invalidate(self) -> None:
        """Drop every recorded graph: what the forward runs has changed (a piece's engine
        arrived) and replays would run the old kernels. Each signature records again, in a
        new memory pool: a pool whose graphs are all destroyed is released by the allocator and
        cannot take another capture (an internal assert in torch's CUDACachingAllocator)."""
        self.graphs.clear()
        self.pool = None

    def __call__(self, args: list) -> Any:
        if self.failed is not None:
            return self.forward(list(args))
        batch = target = 0  # equal: not padded
        if self.padding is not None and (size := self.padding.batch_of(args)) is not None:
            batch, target = size, self.padding.target(size)
        signature = self._signature(args, batch, target)
        recorded = self.graphs.get(signature)
        if recorded is None and signature not in self.called_once:
            self._remember(signature)
            return self._run(args, batch, target)
        # A changed address or version counter (replaced or updated weight) re-records: engines
        # and ops that hold a derived copy of a weight (TensorRT refit, 2:4 compressed weights)
        # refresh it while recording, since replays run no Python.
        addresses = self._addresses(args)
        if recorded is None or addresses != recorded.addresses:
            self.called_once.pop(signature, None)
            padded = self.padding.pad(args, batch, target) if batch != target else args
            outputs = self._record(signature, padded, addresses)
            if outputs is None:
                return self._run(args, batch, target)
            return self.padding.unpad(outputs, batch, target) if batch != target else outputs
        self.graphs.move_to_end(signature)
        padded_inputs = self.padded_inputs if batch != target else ()
        for i, static in recorded.copy_in:
            if i in padded_inputs:
                static[:batch].copy_(args[i])  # the padding rows keep earlier calls' real values
            else:
                static.copy_(args[i])
        recorded.graph.replay()
        outputs = self.padding.unpad(recorded.outputs, batch, target) if batch != target else recorded.outputs
        return [o.clone() if isinstance(o, torch.Tensor) else o for o in outputs]  # the real rows only

    def _signature(self, args: list, batch: int, target: int) -> tuple:
        """The shapes of the inputs that are not static and the values of the integer ones,
        padded (a static input that changes changes :meth:`_addresses`, which records again)."""
        if self.varying is None:
            static = set(self.static_positions)
            self.varying = [i for i in range(len(args)) if i not in static]
        padded = batch != target
        shapes = []
        for i in self.varying:
            a = args[i]
            if isinstance(a, torch.Tensor):
                shapes.append((target, *a.shape[1:]) if padded and i in self.padded_inputs else tuple(a.shape))
            else:
                shapes.append(target if padded and i in self.padded_sizes else a)
        return tuple(shapes)

    def _addresses(self, args: list) -> tuple[list[int], list[int]]:
        weights = [args[i] for i in self.static_positions]
        return [w.data_ptr() for w in weights], version_counters(weights)

    def _run(self, args: list, batch: int, target: int) -> Any:
        if batch == target:
            return self.forward(list(args))
        return self.padding.unpad(self.forward(self.padding.pad(args, batch, target)), batch, target)

    def _remember(self, signature: tuple) -> None:
        self.called_once[signature] = None
        while len(self.called_once) > 4 * self.max_shapes:  # bounded: sizes seen once are forgotten
            self.called_once.popitem(last=False)

    def _record(self, signature: tuple, args: list, addresses: tuple[list[int], list[int]]) -> list | None:
        """Run the forward once on a side stream (this call's outputs, returned) and capture it
        as the signature's graph, which the next call replays. Where the capture fails, the
        forward runs uncaptured from here on; None only where it has not run in this call."""
        static = set(self.static_positions)
        inputs = [a if i in static or not isinstance(a, torch.Tensor) else a.clone() for i, a in enumerate(args)]
        copy_in = [(i, inputs[i]) for i, a in enumerate(args) if i not in static and isinstance(a, torch.Tensor)]
        self.graphs.pop(signature, None)
        while len(self.graphs) >= self.max_shapes:
            self.graphs.popitem(last=False)
        if not self.graphs:  # none left to keep the pool alive (see `invalidate`)
            self.pool = None
        this_call = None
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # a side-stream run before capture, as torch.cuda.graphs asks
                this_call = self.forward(list(inputs))
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self.forward(list(inputs))
        except Exception as exc:  # capture-unsafe op: stay correct, stay uncaptured
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("trt_subgraph: CUDA graph capture failed (%s); running without CUDA graphs", self.failed)
            return None if this_call is None else list(this_call)
        self.graphs[signature] = _Recorded(graph, copy_in, outputs, addresses)
        self.records += 1
        return list(this_call)
