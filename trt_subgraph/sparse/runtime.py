"""2:4-sparse linears through cuSPARSELt, for the inductor engine on CUDA (sm80+).

`rewrite_linears` replaces ``addmm(b, x, t(w))`` / ``mm(x, t(w))`` of a 2:4-pruned fp16/bf16
weight by ``trt_subgraph::sparse_linear(x, w, b, algorithm)``, and so it does for convolutions
that are linears over the channels: 1x1, stride 1, no padding, no groups, on a channels-last
input, where ``permute(x, (0, 2, 3, 1))`` is the (N, H, W, C) matrix operand without a copy and
permuting the (N, H, W, K) product back gives the convolution's own channels-last output (on a
contiguous NCHW input both permutes would copy, so such convolutions stay dense; the option
``memory_format`` makes CNNs channels-last on CUDA). Larger kernels stay dense: torch and
cuSPARSELt have 2:4 kernels for matrix products only, no sparse implicit-GEMM convolution.
The op takes the weight itself (so weights stay graph inputs and one artifact serves every
block) and looks up its compressed form in the process-wide `SPARSE_WEIGHTS`. Compressing costs
about as much as the product, so it happens once per weight value, never per call.

The product runs through `trt_subgraph.sparse.cusparselt` (plans built once; torch's
``_cslt_sparse_mm`` rebuilds them on every call) and returns the row-major layout ``F.linear``
returns, so nothing downstream changes. Which of cuSPARSELt's algorithms is fastest depends on the shape (on an H100 the
default one is 0.6x dense, the best 1.3-1.5x), so the algorithm is measured at the real shape,
inside a CUDA graph, once per shape and GPU, with dense alongside for mode "auto". The verdicts
are kept in a JSON file (`DECISIONS_FILE` under ``cache_dir``). Where M is dynamic (mode "on"),
the op measures at the first call of each M instead and keeps the verdict for the process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from .. import _compat
from .._state import on_reset, warn_once
from ..fx_utils import placeholders as placeholder_nodes
from ..options import SPARSITY as MODES
from . import cusparselt
from .analysis import analyze_weight
from .cusparselt import DTYPES as CSLT_DTYPES

__all__ = [
    "ALGORITHMS",
    "DECISIONS_FILE",
    "MIN_CONV_SPEEDUP",
    "MIN_SPEEDUP",
    "MODES",
    "PER_SHAPE",
    "PER_SHAPE_EAGER",
    "SPARSE_WEIGHTS",
    "SparseWeights",
    "measure",
    "module_path",
    "rewrite_linears",
    "sparse_linear",
    "unavailable_reason",
]

log = logging.getLogger(__name__)

CSLT_MULTIPLE = 16  # cuSPARSELt fp16/bf16: both dims of the sparse operand >= and multiple of 16
# "auto": sparse must beat dense by more than the spread of repeated measurements (a few %).
MIN_SPEEDUP = 1.05
# "auto", 1x1 convolutions: the product must also pay for what the rewrite changes around it. The
# pointwise kernels that produce its input and read its output then work on the permuted layout;
# on an H200 (ResNet-like, batch 128, fp16) they cost 8 us more around layer4.0.conv1, whose
# product alone went from 39.5 to 36.1 us (1.09x), and the forward was slower. 8 us is 20% of the
# dense time, so sparse must run in 80% of it (benchmarks/RESULTS.md, *Compile time, kernel
# tuning and 2:4 convolutions*).
MIN_CONV_SPEEDUP = 1.25
# cuSPARSELt lists 53 algorithm ids for the row-major product (H100, 0.8), and some of the higher
# ones crash the CUDA context ("illegal instruction"; the likely reason cusparseLtMatmulSearch
# fails on this build). Ids 0-7 ran at every shape tried (H100).
ALGORITHMS = range(8)
# The op's `algorithm` for a dynamic M (mode "on"): the fastest at each M, measured at run time
# inside a CUDA graph (PER_SHAPE, the forward replays CUDA graphs) or eagerly (PER_SHAPE_EAGER).
PER_SHAPE, PER_SHAPE_EAGER = -1, -2
DECISIONS_FILE = "sparse_decisions.json"
UNAVAILABLE = "cuSPARSELt unavailable"

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# Compressed weights


@dataclasses.dataclass
class _Entry:
    source: weakref.ref  # the tensor compressed from; dead once it is freed
    version: int
    compressed: torch.Tensor


class SparseWeights:
    """Compressed copies of 2:4 weights, keyed by the source weight's ``data_ptr()``.

    An entry is current while its source tensor is alive, still at that address, and at the
    ``_version`` it was compressed from. A changed version is recompressed *into the same buffer*,
    so CUDA graphs that captured it stay valid; a new address gets a new buffer (the runtime
    re-records its graph when a weight's address changes).

    Limitation: ``param.data.copy_(...)`` (or any write through ``.data``) does not bump
    ``param._version`` -- ``.data`` is a fresh tensor with its own version counter -- so such an
    update is not seen. Only reading the whole weight would see it, which costs as much as the
    product; call ``refresh_all(force=True)`` after such updates instead. In-place ops on the
    parameter under ``no_grad``, optimizer steps and ``load_state_dict`` all bump the version.
    """

    def __init__(self, compress: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self._compress = compress or _compat.cslt_compress
        self._entries: dict[int, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        """The compressed form of `weight`'s current value (compressing now if needed)."""
        key = weight.data_ptr()
        entry = self._entries.get(key)
        source = entry.source() if entry is not None else None
        if source is None or source.data_ptr() != key or source.shape != weight.shape:
            if weight.is_cuda and torch.cuda.is_current_stream_capturing():
                # correct, but the graph now compresses on every replay
                warn_once(
                    log, "compress in capture", "trt_subgraph: compressing a 2:4 weight inside CUDA graph capture"
                )
            entry = self._entries[key] = _Entry(
                weakref.ref(weight), _compat.version_counter(weight), self._compress(_matrix(weight))
            )
        elif _compat.version_counter(source) != entry.version:
            self._recompress(entry, source)
        return entry.compressed

    def refresh_all(self, force: bool = False) -> bool:
        """Recompress, in place, every weight whose ``_version`` changed (all with `force`).

        Replays run no Python, so the op cannot check. The backend's CUDA graph re-records when a
        weight's version changes (its warm-up runs recompress); call this yourself after writes
        through ``.data`` (with `force`) or before replaying a graph you recorded by hand. Entries
        whose weight was freed or moved are dropped; returns True when that happened, since a graph
        recorded earlier may hold such a buffer and should be re-recorded.
        """
        dropped = False
        for key, entry in list(self._entries.items()):
            source = entry.source()
            if source is None or source.data_ptr() != key:
                del self._entries[key]
                dropped = True
            elif force or _compat.version_counter(source) != entry.version:
                self._recompress(entry, source)
        return dropped

    def clear(self) -> None:
        self._entries.clear()

    def discard(self, weight: torch.Tensor) -> None:
        """Drop `weight`'s compressed copy now (a measurement's weight, about to be freed)."""
        entry = self._entries.get(weight.data_ptr())
        if entry is not None and entry.source() is weight:
            del self._entries[weight.data_ptr()]

    def _recompress(self, entry: _Entry, source: torch.Tensor) -> None:
        entry.compressed.copy_(self._compress(_matrix(source)))
        entry.version = _compat.version_counter(source)


SPARSE_WEIGHTS = SparseWeights()


# ---------------------------------------------------------------------------------------------
# The op


def _product(
    compressed: torch.Tensor, weight_shape: tuple[int, int], x2: torch.Tensor, bias: torch.Tensor | None, algorithm: int
) -> torch.Tensor:
    y = cusparselt.linear(compressed, weight_shape, x2, algorithm)
    return y if bias is None else y.add_(bias)


@torch.library.custom_op(
    "trt_subgraph::sparse_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, int algorithm) -> Tensor",
)
def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, algorithm: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 2:4 `weight`, via cuSPARSELt's `algorithm` on CUDA.

    `weight`: (N, K), or a 1x1 convolution's (N, K, 1, 1) (any number of 1s), taken as (N, K).
    cuSPARSELt needs M (the rows of x) to be a multiple of 8; otherwise, and off CUDA (CPU
    tests), the product is computed densely. `algorithm` `PER_SHAPE` (`PER_SHAPE_EAGER`): the
    fastest for this call's M, timed inside a CUDA graph (eagerly) at the first call with that M.
    """
    matrix = _matrix(weight)
    x2 = x.reshape(-1, x.shape[-1])
    if not (x2.is_contiguous() or x2.t().is_contiguous()):
        x2 = x2.contiguous()
    if x.is_cuda and x2.shape[0] % 8 == 0 and x2.shape[0] > 0:
        if algorithm < 0:
            n, k = matrix.shape
            algorithm = _algorithm_for(x2.shape[0], k, n, x.dtype, x.device, bias is not None, algorithm == PER_SHAPE)
        y = _product(SPARSE_WEIGHTS.get(weight), tuple(matrix.shape), x2, bias, algorithm)
    else:
        y = F.linear(x2, matrix, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """A linear's (N, K) weight as it is; a 1x1 convolution's (N, K, 1, 1) as (N, K), a view."""
    return weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)


@sparse_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, algorithm: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ---------------------------------------------------------------------------------------------
# Where cuSPARSELt can run, and whether it pays


def unavailable_reason(device: torch.device) -> str | None:
    """None when cuSPARSELt 2:4 kernels can run on `device`, else why not."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{UNAVAILABLE} (device {device.type})"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"{UNAVAILABLE} (needs compute capability 8.0+)"
    if not _compat.cslt_available():
        return UNAVAILABLE
    if (why := cusparselt.load_error()) is not None:
        return f"{UNAVAILABLE} ({why})"
    return None


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _graph_ms(fn: Callable[[], Any], device: torch.device, calls: int = 10, replays: int = 20) -> float:
    """Milliseconds per `fn` call, `calls` of them captured in one CUDA graph (launch amortised)."""
    # One side stream for every measurement: cuBLAS keeps a workspace (32 MiB on sm90) per
    # (handle, stream) for the life of the process, so a fresh stream per call costs one each.
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return _eager_ms(graph.replay, device, calls=replays, warmup=1) / calls


def _eager_ms(fn: Callable[[], Any], device: torch.device, calls: int = 20, warmup: int = 3) -> float:
    """Milliseconds per `fn` call, called back to back: host overhead counts where it dominates."""
    stream = torch.cuda.current_stream(device)
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _ in range(calls):
        fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / calls


@torch.no_grad()
def measure(
    m: int,
    k: int,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    bias: bool,
    graphed: bool = True,
    image: tuple[int, ...] | None = None,
) -> tuple[float, float, int]:
    """(dense_ms, sparse_ms, algorithm) of ``x @ W.T + b`` at (M, K, N) on random 2:4 data.

    Each algorithm of `ALGORITHMS` the shape has is timed once inside a CUDA graph (kernel time);
    the three fastest are timed again, interleaved with dense so that clock changes hit both, and
    the best of three runs counts. That second round runs as the model will: inside a CUDA graph
    when `graphed`, else eagerly through the op, whose per-call host work then counts too.
    `image`: for a 1x1 convolution, its output's (N, H, W) (N*H*W = M): dense is then that
    convolution on a channels-last input (cuDNN picks its own kernel), not the matrix product.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=gen)
    # Any 2:4 pattern times the same; mask_2_4 would allocate ~20 bytes per weight element
    # (1.2 GiB for a 32000x2048 lm head), all of it inside the compile's peak.
    w.view(n, k // 4, 4)[..., 2:] = 0
    b = torch.randn(n, device=device, dtype=dtype, generator=gen) if bias else None
    compressed = SPARSE_WEIGHTS.get(w)  # the op's eager path finds this copy, not a second one
    dense = lambda: F.linear(x, w, b)  # noqa: E731
    if image is not None:
        d = len(image) - 1
        x_image = x.view(*image, k).permute(0, d + 1, *range(1, d + 1))  # channels-last (N, K, H, W)
        w_image = w.view(n, k, *[1] * d)
        ones, zeros = [1] * d, [0] * d
        dense = lambda: aten.convolution.default(x_image, w_image, b, ones, zeros, ones, False, zeros, 1)  # noqa: E731
    try:
        return _measure(x, w, b, compressed, graphed, dense)
    finally:
        SPARSE_WEIGHTS.discard(w)


def _measure(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    compressed: torch.Tensor,
    graphed: bool,
    dense_fn: Callable[[], Any],
) -> tuple[float, float, int]:
    (m, k), n, device = x.shape, w.shape[0], x.device

    def sparse(algorithm: int) -> Callable[[], Any]:
        return lambda: _product(compressed, (n, k), x, b, algorithm)

    def sparse_op(algorithm: int) -> Callable[[], Any]:
        return lambda: torch.ops.trt_subgraph.sparse_linear.default(x, w, b, algorithm)

    screened = {}
    max_algorithm = cusparselt.selection(x, n, k).max_algorithm
    for algorithm in (a for a in ALGORITHMS if a <= max_algorithm):
        try:
            screened[algorithm] = _graph_ms(sparse(algorithm), device, calls=5, replays=5)
        except RuntimeError as exc:  # an id this shape cannot use: fails before any capture
            log.debug("trt_subgraph: cuSPARSELt algorithm %d at M%d K%d N%d: %s", algorithm, m, k, n, exc)
    if not screened:
        raise RuntimeError(f"no cuSPARSELt algorithm runs M{m} K{k} N{n} {x.dtype}")
    finalists = sorted(screened, key=screened.__getitem__)[:3]
    timer, run = (_graph_ms, sparse) if graphed else (_eager_ms, sparse_op)
    dense, timed = [], {a: [] for a in finalists}
    for _ in range(3):
        dense.append(timer(dense_fn, device))
        for algorithm in finalists:
            timed[algorithm].append(timer(run(algorithm), device))
    best = min(finalists, key=lambda a: min(timed[a]))
    return min(dense), min(timed[best]), best


_DECISIONS: dict[str, dict[str, Any]] = {}  # decision key -> timing, as in the decisions file
# Decision keys whose run-time measurement (`_algorithm_for`) failed: cuSPARSELt's default runs
# there. Kept apart from `_DECISIONS`, whose every entry holds measured times ("auto" compares them).
_UNMEASURED: set[str] = set()
on_reset(_DECISIONS.clear)
on_reset(_UNMEASURED.clear)


def _decision_key(
    m: int,
    k: int,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    bias: bool,
    graphed: bool,
    image: tuple[int, ...] | None = None,
) -> str:
    cslt = torch.backends.cusparselt.version() if _compat.cslt_available() else None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return (
        f"M{m}xK{k}xN{n} {str(dtype).removeprefix('torch.')} bias={int(bias)} row-major "
        f"{gpu} torch {torch.__version__} cusparselt {cslt}"
        + ("" if graphed else " eager")
        + ("" if image is None else f" conv {'x'.join(map(str, image))}")
    )


def _load_decisions(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("trt_subgraph: ignoring unreadable sparse decisions file %s (%s)", path, exc)
        return {}


def _save_decision(path: Path, key: str, timing: dict[str, Any]) -> None:
    """Read-merge-replace atomically: a concurrent writer can at worst cost a re-measurement."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_decisions(path)
        data[key] = timing
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sparse_decisions.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("trt_subgraph: could not save sparse decision to %s (%s)", path, exc)


def _timing(key: str, run: Callable[[], tuple[float, float, int]], cache_dir: Path | None) -> dict[str, Any]:
    """{"dense_ms", "sparse_ms", "algorithm"} from memory, then the decisions file, then `run()`."""
    if key in _DECISIONS:
        return _DECISIONS[key]
    path = Path(cache_dir) / DECISIONS_FILE if cache_dir is not None else None
    timing = _load_decisions(path).get(key) if path is not None else None
    if not _complete(timing):
        dense_ms, sparse_ms, algorithm = run()
        timing = {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "algorithm": algorithm}
        if path is not None:
            _save_decision(path, key, timing)
        log.info(
            "trt_subgraph: 2:4 linear %s: dense %.4f ms, sparse %.4f ms (algorithm %d)",
            key,
            dense_ms,
            sparse_ms,
            algorithm,
        )
    _DECISIONS[key] = timing
    return timing


def _complete(timing: Any) -> bool:
    """Whether a decisions-file entry holds measured times (positive, finite milliseconds) and an
    algorithm id; anything else (a hand edit, another format) is measured again."""

    def ms(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")

    if not isinstance(timing, dict):
        return False
    algorithm = timing.get("algorithm")
    valid_algorithm = isinstance(algorithm, int) and not isinstance(algorithm, bool) and algorithm >= 0
    return ms(timing.get("dense_ms")) and ms(timing.get("sparse_ms")) and valid_algorithm


# ---------------------------------------------------------------------------------------------
# The graph rewrite


@dataclasses.dataclass
class _Linear:
    node: torch.fx.Node  # the addmm / mm
    x: torch.fx.Node
    weight: torch.fx.Node  # a weight placeholder
    transpose: torch.fx.Node  # t(weight)
    bias: torch.fx.Node | None


def _is_transpose(node: Any) -> bool:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is aten.t.default:
        return True
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    return node.target is aten.transpose.int and sorted(a % 2 for a in node.args[1:3]) == [0, 1]


def _find_linears(gm: torch.fx.GraphModule, weights: dict[torch.fx.Node, torch.Tensor]) -> list[_Linear]:
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.addmm.default and len(node.args) == 3:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            bias, x, wt = node.args
        elif node.target is aten.mm.default:
            (x, wt), bias = node.args, None
        else:
            continue
        if not _is_transpose(wt) or wt.args[0] not in weights:
            continue
        w = weights[wt.args[0]]
        xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        bv = bias.meta.get("val") if isinstance(bias, torch.fx.Node) else None
        if not isinstance(xv, torch.Tensor) or xv.dim() != 2 or w.dim() != 2:
            continue
        if bias is not None and not (isinstance(bv, torch.Tensor) and bv.dim() == 1 and bv.shape[0] == w.shape[0]):
            continue
        found.append(_Linear(node, x, wt.args[0], wt, bias))
    return found


def _ineligible_reason(lin: _Linear, w: torch.Tensor) -> str | None:
    if w.device.type == "meta":
        return "weight on the meta device (it holds no values to check)"
    reasons = []
    verdict = analyze_weight(w, kind="linear")
    if not verdict.pattern_ok:
        reasons.append(
            f"not 2:4 sparse ({verdict.violating_groups} of {verdict.total_groups} groups of 4 hold "
            "more than 2 non-zeros)"
        )
    if w.dtype not in CSLT_DTYPES:
        reasons.append(f"dtype {str(w.dtype).removeprefix('torch.')} (cuSPARSELt linears need float16 or bfloat16)")
    n, k = w.shape
    if n % CSLT_MULTIPLE or k % CSLT_MULTIPLE or not n or not k:
        reasons.append(f"shape {n}x{k}: cuSPARSELt needs both dimensions to be multiples of {CSLT_MULTIPLE}")
    others = [lin.x.meta["val"]] + ([lin.bias.meta["val"]] if lin.bias is not None else [])
    if any(v.dtype != w.dtype for v in others):
        reasons.append("activation or bias dtype differs from the weight's")
    return "; ".join(reasons) or None


@dataclasses.dataclass
class _Conv:
    """An ``aten.convolution`` of a weight placeholder: a linear over the channels when
    `_conv_ineligible_reason` finds nothing against it."""

    node: torch.fx.Node
    x: torch.fx.Node
    weight: torch.fx.Node  # a weight placeholder
    bias: torch.fx.Node | None


def _find_convs(gm: torch.fx.GraphModule, weights: dict[torch.fx.Node, torch.Tensor]) -> list[_Conv]:
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.convolution.default or len(node.args) != 9:
            continue
        x, weight, bias = node.args[:3]
        if weight not in weights or not (bias is None or isinstance(bias, torch.fx.Node)):
            continue
        xv, yv = (x.meta.get("val") if isinstance(x, torch.fx.Node) else None), node.meta.get("val")
        if isinstance(xv, torch.Tensor) and isinstance(yv, torch.Tensor) and xv.dim() == weights[weight].dim() >= 3:
            found.append(_Conv(node, x, weight, bias))
    return found


def _channels_last(value: torch.Tensor) -> bool:
    """Channels innermost in memory: ``permute(0, 2, ..., 1)`` is a contiguous view."""
    return value.permute(0, *range(2, value.dim()), 1).is_contiguous()


def _conv_ineligible_reason(conv: _Conv, w: torch.Tensor) -> str | None:
    """Why this convolution stays dense, or None: a 1x1, stride-1, unpadded, ungrouped
    convolution on a channels-last input is a linear over the channels, and then a linear's
    rules apply (`_ineligible_reason`)."""
    if w.device.type == "meta":
        return "weight on the meta device (it holds no values to check)"
    stride, padding, _, transposed, _, groups = conv.node.args[3:9]
    kernel = tuple(w.shape[2:])
    if transposed:
        return "transposed convolution"
    reasons = []
    if groups != 1:
        reasons.append(f"{'depthwise' if w.shape[1] == 1 else 'grouped'} convolution (groups={groups})")
    if any(k != 1 for k in kernel):
        reasons.append(
            f"{'x'.join(map(str, kernel))} kernel: no sparse implicit-GEMM convolution without TensorRT "
            "(torch and cuSPARSELt have 2:4 kernels for matrix products only)"
        )
    if reasons:  # with the weight's own 2:4 verdict, as `sparsity.check` gives it
        verdict = analyze_weight(w, kind="conv") if groups == 1 else None
        if verdict is not None and not verdict.pattern_ok:
            reasons.append(
                f"not 2:4 sparse ({verdict.violating_groups} of {verdict.total_groups} groups of 4 hold more than 2 "
                "non-zeros)"
                if w.shape[1] % 4 == 0
                else f"input channels {w.shape[1]} not a multiple of 4"
            )
        return "; ".join(reasons)
    if any(s != 1 for s in stride):
        reasons.append(f"stride {tuple(stride)}: not a plain matrix product")
    if any(p != 0 for p in padding):
        reasons.append(f"padding {tuple(padding)}: not a plain matrix product")
    if not (_channels_last(conv.x.meta["val"]) and _channels_last(conv.node.meta["val"])):
        reasons.append(
            "input not channels-last: the matrix product would copy it and its output "
            "(memory_format='channels_last' avoids both)"
        )
    rest = _ineligible_reason(conv, _matrix(w))
    return "; ".join([*reasons, *([rest] if rest else [])]) or None


def module_path(path: str) -> str:
    """``L['self'].layers[3].fc`` -> ``layers[3].fc``: a Dynamo module path as the report names layers."""
    return path.split("].", 1)[1] if path.startswith("L[") and "]." in path else path


def _layer_name(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    return module_path(str(list(stack.values())[-1][0]))


def rewrite_linears(
    gm: torch.fx.GraphModule,
    real_inputs: list,
    weight_flags: list[bool],
    mode: str,
    cudagraphs: bool,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Route eligible 2:4 linears of an ATen inference graph through ``trt_subgraph::sparse_linear``,
    and convolutions that are linears over the channels (1x1, stride 1, no padding, no groups,
    channels-last input).

    `real_inputs`/`weight_flags` are per placeholder. `mode`: "off" never rewrites, "on" rewrites
    every eligible layer, "auto" only those measured faster (needs a static M), timed as they
    will run: inside a CUDA graph when `cudagraphs` (the forward will be one), else eagerly; a
    convolution's sparse product (M = N*H*W rows, its K x C weight) is timed against the dense
    convolution itself. `cache_dir`: where "auto" keeps its measurements
    (`DECISIONS_FILE`); None keeps them in memory. Returns one record per linear or convolution
    of a weight, in graph order: layer, kind ("linear" or "conv"), shape (the weight's), M,
    eligible, sparse, reason (why not eligible or not sparse: a k x k convolution stays dense, no
    sparse kernel exists for it here), dense_ms, sparse_ms, algorithm. Without cuSPARSELt the
    graph is left untouched. The replacement's output has the shape and strides of the layer it
    replaces, so nothing downstream changes.
    """
    if mode not in MODES:
        raise ValueError(f"sparsity mode must be one of {list(MODES)}, got {mode!r}")
    placeholders = placeholder_nodes(gm)
    if not len(placeholders) == len(real_inputs) == len(weight_flags):
        raise ValueError(
            f"need one real input and one weight flag per placeholder: {len(placeholders)} placeholders, "
            f"{len(real_inputs)} inputs, {len(weight_flags)} flags"
        )
    weights = {
        p: x for p, x, flag in zip(placeholders, real_inputs, weight_flags) if flag and isinstance(x, torch.Tensor)
    }
    # aot_autograd calls its compilers with its fake mode active; the analysis needs real tensors.
    with _compat.unset_fake_temporarily():
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        layers = sorted([*_find_linears(gm, weights), *_find_convs(gm, weights)], key=lambda layer: order[layer.node])
        records, chosen = _decide(layers, weights, mode, cudagraphs, cache_dir)
        for layer, w, algorithm in chosen:
            (_replace if isinstance(layer, _Linear) else _replace_conv)(gm, layer, w, algorithm)
    if chosen:
        gm.graph.lint()
        gm.recompile()
    return records


def _decide(
    layers: list[_Linear | _Conv], weights: dict, mode: str, cudagraphs: bool, cache_dir: Any
) -> tuple[list[dict[str, Any]], list[tuple[_Linear | _Conv, torch.Tensor, int]]]:
    records, chosen = [], []
    for lin in layers:
        w = weights[lin.weight]
        if isinstance(lin, _Linear):
            kind, m, reason = "linear", lin.x.meta["val"].shape[0], _ineligible_reason(lin, w)
        else:  # the rows of the (implicit) matrix product: every output position of every image
            out = lin.node.meta["val"]
            kind, m, reason = "conv", out.numel() // out.shape[1], _conv_ineligible_reason(lin, w)
        rec = {
            "layer": _layer_name(lin.node),
            "kind": kind,
            "shape": list(w.shape),
            "M": m if isinstance(m, int) else str(m),
            "eligible": False,
            "sparse": False,
            "reason": reason,
            "dense_ms": None,
            "sparse_ms": None,
            "algorithm": None,
        }
        records.append(rec)
        rec["eligible"] = rec["reason"] is None
        if not rec["eligible"]:
            continue
        args = (m, _matrix(w).shape[1], w.shape[0], w.dtype, w.device, lin.bias is not None, cudagraphs)
        if kind == "conv":  # timed against the convolution itself
            out = lin.node.meta["val"]
            args += ((out.shape[0], *out.shape[2:]),)
        if mode == "off":
            rec["reason"] = "sparsity off"
        elif (why := unavailable_reason(w.device)) is not None:
            rec["reason"] = why
        elif mode == "on":  # the measured fastest algorithm; cuSPARSELt's default when unmeasured
            rec["sparse"] = not (isinstance(m, int) and w.is_cuda) or _measured(rec, args, cache_dir)
        elif not isinstance(m, int):
            rec["reason"] = "dynamic batch size (measured per static shape)"
        elif _measured(rec, args, cache_dir):
            needed = MIN_CONV_SPEEDUP if kind == "conv" else MIN_SPEEDUP
            rec["sparse"] = rec["dense_ms"] >= needed * rec["sparse_ms"]
            if not rec["sparse"]:
                where = "" if cudagraphs else ", timed without CUDA graphs"
                rec["reason"] = f"measured not faster (needs {needed:.2f}x{where})"
        if rec["sparse"]:
            if rec["algorithm"] is not None:
                algorithm = rec["algorithm"]
            elif isinstance(m, int):
                algorithm = 0  # a CPU weight: never measured, never run by cuSPARSELt
            else:  # a dynamic M: chosen per M at run time
                algorithm = PER_SHAPE if cudagraphs else PER_SHAPE_EAGER
            chosen.append((lin, w, algorithm))
    return records, chosen


def _algorithm_for(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, bias: bool, graphed: bool) -> int:
    """The fastest algorithm at this M (for a dynamic M), measured at its first call in this
    process; cuSPARSELt's default where that call is inside a CUDA graph capture (no
    measurement can run there) or the measurement fails, with a warning."""
    key = _decision_key(m, k, n, dtype, device, bias, graphed)
    if key in _DECISIONS:
        return _DECISIONS[key]["algorithm"]
    if key in _UNMEASURED:
        return 0
    if torch.cuda.is_current_stream_capturing():
        warn_once(
            log,
            ("unmeasured in capture", key),
            "trt_subgraph: 2:4 linear M%d K%d N%d first runs inside a CUDA graph capture; "
            "cuSPARSELt's default algorithm runs there",
            m,
            k,
            n,
        )
        return 0
    try:
        return _timing(key, lambda: measure(m, k, n, dtype, device, bias, graphed), None)["algorithm"]
    except RuntimeError as exc:
        warn_once(log, ("unmeasured", key), "trt_subgraph: 2:4 linear %s: measurement failed (%s)", key, exc)
        _UNMEASURED.add(key)
        return 0


def _measured(rec: dict[str, Any], args: tuple, cache_dir: Any) -> bool:
    """Add the shape's timings and fastest algorithm to `rec`; False (and why) if measuring fails."""
    try:
        rec.update(_timing(_decision_key(*args), lambda: measure(*args), cache_dir))
    except RuntimeError as exc:  # the layer stays dense; the model still compiles
        rec["reason"] = f"measurement failed ({exc})"
        return False
    return True


def _replace(gm: torch.fx.GraphModule, lin: _Linear, w: torch.Tensor, algorithm: int) -> None:
    # Read x and bias now: an earlier replacement may have rewired them (chained linears).
    bias, x = lin.node.args[:2] if lin.bias is not None else (None, lin.node.args[0])
    with gm.graph.inserting_before(lin.node):
        new = gm.graph.call_function(torch.ops.trt_subgraph.sparse_linear.default, (x, lin.weight, bias, algorithm))
    new.meta = dict(lin.node.meta)  # nn_module_stack, and "val": same shape and strides
    lin.node.replace_all_uses_with(new)
    gm.graph.erase_node(lin.node)
    if not lin.transpose.users:
        gm.graph.erase_node(lin.transpose)
    if w.is_cuda:
        SPARSE_WEIGHTS.get(w)  # compress now, not in the first (timed) call


def _replace_conv(gm: torch.fx.GraphModule, conv: _Conv, w: torch.Tensor, algorithm: int) -> None:
    """``permute(sparse_linear(permute(x, (0, 2, 3, 1)), w, b), (0, 3, 1, 2))`` for a 2-D
    convolution (likewise for 1-D and 3-D): on a channels-last input both permutes are views."""
    node = conv.node
    x, bias = node.args[0], node.args[2]  # read now: an earlier replacement may have rewired them
    xv = x.meta["val"]
    last, first = [0, *range(2, xv.dim()), 1], [0, xv.dim() - 1, *range(1, xv.dim() - 1)]
    with gm.graph.inserting_before(node):
        rows = gm.graph.call_function(aten.permute.default, (x, last))
        product = gm.graph.call_function(
            torch.ops.trt_subgraph.sparse_linear.default, (rows, conv.weight, bias, algorithm)
        )
        out = gm.graph.call_function(aten.permute.default, (product, first))
    rows_val = xv.permute(last)
    product_val = rows_val.new_empty((*rows_val.shape[:-1], w.shape[0]))
    for new, val in ((rows, rows_val), (product, product_val), (out, product_val.permute(first))):
        new.meta = {key: value for key, value in node.meta.items() if key not in ("val", "tensor_meta")}
        new.meta["val"] = val  # the output's: the convolution's shape and channels-last strides
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    if w.is_cuda:
        SPARSE_WEIGHTS.get(w)  # compress now, not in the first (timed) call
