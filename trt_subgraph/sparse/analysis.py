"""2:4 structured sparsity: which conv/linear weights can use sparse tensor cores, and why not.

TensorRT's rule (Developer Guide 8.5 section 6.8, "Sparsity"): for a conv weight of shape
(K, C, R, S) with C % 4 == 0, every group of 4 consecutive input channels at each (k, r, s) holds at
most 2 non-zeros; fully-connected weights follow the same rule with the input features as C.
TensorRT ignores grouped and depthwise convs for sparse kernels (NVIDIA/TensorRT#4054) and needs
the layer to run in FP16 or INT8 (BF16 is accepted by NVIDIA's pruning tools).

Everything here works on raw weight tensors (`analyze_weight`, `mask_2_4`) so the backend can call
it on the ATen weights it sees; `check`, `prune_2_4` and `check_onnx` wrap it for an
`nn.Module` and an ONNX file (``trt-subgraph sparsity MODEL.onnx`` runs `check_onnx`).
"""

from __future__ import annotations

import ast
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "LayerSparsity",
    "PruneReport",
    "SparsityTable",
    "analyze_weight",
    "check",
    "check_onnx",
    "mask_2_4",
    "prune_2_4",
]

log = logging.getLogger(__name__)

KINDS = ("conv", "linear", "matmul", "gemm")
SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.int8)

# "Likely to help": NVIDIA's TensorRT engineers report that sparse conv kernels beat dense ones only
# when C and K are large enough (>= ~256), a 3x3 kernel multiplying the effective C by 9
# (nvpohanh, NVIDIA/TensorRT#3849 and #4065); a 64->64 3x3 conv was eligible but never picked
# (NVIDIA/TensorRT#1403). We apply the same bound to the reduction length (C*R*S, or in_features)
# and to the output channels of every kind. For linears run through cuSPARSELt the real break-even
# is larger still (GEMMs of about 8192x4096x4096 on an H200), which the
# backend decides by measuring, not here.
MIN_CHANNELS_TO_HELP = 256


@dataclass(frozen=True)
class LayerSparsity:
    """One weight's 2:4 verdict.

    `pattern_ok` says whether the 2:4 pattern holds along the reduction axis regardless of dtype
    (users check fp32 models before casting). `eligible` is TensorRT's full rule. `large_enough` is
    the shape-only size judgement; `likely_to_help` = eligible and large enough. `in_features` is
    the reduction length per output (C/groups * prod(kernel) for convs), `out_features` the
    number of outputs (K). `violating_groups` counts groups of 4 with more than 2 non-zeros (when C
    is not a multiple of 4 the last group is counted as if zero-padded).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    groups: int
    in_features: int
    out_features: int
    pattern_ok: bool
    violating_groups: int
    total_groups: int
    eligible: bool
    large_enough: bool
    likely_to_help: bool
    reason: str | None
    # Set by `check` and `prune_2_4` for a module's layer: the other parameters and buffers of
    # the model that share this weight's memory (tied weights), and whether the weight is
    # computed from others (weight_norm, a torch.nn.utils.parametrize parametrization).
    shared_with: tuple[str, ...] = ()
    computed: bool = False

    @property
    def violating_fraction(self) -> float:
        """Fraction (0..1) of the groups of 4 holding more than 2 non-zeros."""
        return self.violating_groups / self.total_groups if self.total_groups else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["shared_with"] = list(self.shared_with)
        d["violating_fraction"] = self.violating_fraction
        return d


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _reduction_last(weight: torch.Tensor, kind: str, trans_b: bool) -> torch.Tensor:
    """View of `weight` with the reduction (input-channel) axis last, other axes flattened first."""
    if kind == "conv":
        return weight.movedim(1, -1).reshape(-1, weight.shape[1])
    return weight if _in_last(kind, trans_b) else weight.t()


def _in_last(kind: str, trans_b: bool) -> bool:
    """True when a 2-D weight is (out, in); ONNX MatMul B and Gemm B without transB are (in, out)."""
    return kind == "linear" or (kind == "gemm" and trans_b)


def _validate(weight: Any, kind: str, groups: int, trans_b: bool) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if kind == "conv":
        if not 3 <= weight.dim() <= 5:
            raise ValueError(
                f"a conv weight must be 3-D to 5-D (K, C/groups, *kernel); got shape {tuple(weight.shape)}"
            )
        if weight.shape[0] % groups:
            raise ValueError(f"conv weight has {weight.shape[0]} output channels, not divisible by groups={groups}")
    else:
        if weight.dim() != 2:
            raise ValueError(f"a {kind} weight must be 2-D; got shape {tuple(weight.shape)}")
        if groups != 1:
            raise ValueError(f"groups applies to convs only; got groups={groups} for kind {kind!r}")
    if trans_b and kind != "gemm":
        raise ValueError("trans_b applies to kind 'gemm' only")


def _grouped_reason(groups: int, c_per_group: int) -> str:
    # TensorRT does not consider sparse kernels for grouped convs (NVIDIA/TensorRT#4054).
    return f"{'depthwise' if c_per_group == 1 else 'grouped'} conv (groups={groups})"


def _channels_reason(c: int, groups: int) -> str:
    per = " per group" if groups > 1 else ""
    return f"input channels{per} {c} not a multiple of 4"


def _fmt_pct(fraction: float) -> str:
    if 0 < fraction < 5e-5:
        return "<0.01%"
    if 0.99995 <= fraction < 1:
        return ">99.99%"
    return f"{100 * fraction:.2f}".rstrip("0").rstrip(".") + "%"


def analyze_weight(
    weight: torch.Tensor,
    *,
    kind: str,
    name: str = "",
    groups: int = 1,
    trans_b: bool = False,
) -> LayerSparsity:
    """Apply TensorRT's 2:4 rule to one weight, vectorised, on the weight's own device.

    kind: "conv" (K, C/groups, *kernel), "linear" (out, in), "matmul" (ONNX MatMul B operand,
    (in, out): reduction along dim 0) or "gemm" (ONNX Gemm B: (out, in) when `trans_b`, else
    (in, out)). The check uses exact zeros in the weight's own dtype, so check the dtype the
    engine will run.
    """
    _validate(weight, kind, groups, trans_b)
    rows = _reduction_last(weight.detach(), kind, trans_b)
    n_out = weight.shape[0] if kind == "conv" else rows.shape[0]
    c = rows.shape[1]
    in_features = math.prod(weight.shape[1:]) if kind == "conv" else c

    nonzero = rows != 0
    if c % 4:
        nonzero = torch.nn.functional.pad(nonzero, (0, 4 - c % 4))
    per_group = nonzero.reshape(nonzero.shape[0], -1, 4).sum(-1, dtype=torch.int32)
    violating = int((per_group > 2).sum().item())
    total = per_group.numel()
    pattern_ok = c % 4 == 0 and violating == 0

    large_enough = in_features >= MIN_CHANNELS_TO_HELP and n_out >= MIN_CHANNELS_TO_HELP
    dtype_ok = weight.dtype in SPARSE_DTYPES

    reasons = []  # most important first: structural, then pruning, then dtype, then size
    if groups > 1:
        reasons.append(_grouped_reason(groups, weight.shape[1]))
    if c % 4:
        reasons.append(_channels_reason(c, groups))
    if violating:
        reasons.append(f"pattern violated in {_fmt_pct(violating / total)} of groups ({violating} of {total})")
    if not dtype_ok:
        reasons.append(f"dtype {_dtype_name(weight.dtype)} (TensorRT sparse kernels need fp16, bf16 or int8)")
    if not large_enough:
        reasons.append(f"too small (in={in_features}, out={n_out} < {MIN_CHANNELS_TO_HELP})")
    eligible = groups == 1 and pattern_ok and dtype_ok
    return LayerSparsity(
        name=name,
        kind=kind,
        shape=tuple(weight.shape),
        dtype=_dtype_name(weight.dtype),
        groups=groups,
        in_features=in_features,
        out_features=n_out,
        pattern_ok=pattern_ok,
        violating_groups=violating,
        total_groups=total,
        eligible=eligible,
        large_enough=large_enough,
        likely_to_help=eligible and large_enough,
        reason="; ".join(reasons) or None,
    )


def mask_2_4(weight: torch.Tensor, *, kind: str, trans_b: bool = False) -> torch.Tensor:
    """Boolean keep-mask (same shape as `weight`) of the 2 largest |w| in each group of 4 along the
    reduction axis; ties go to the lower channel index, so the result is deterministic.

    This is apex ASP's `m4n2_1d` mask, which is exactly the layout TensorRT checks.
    """
    _validate(weight, kind, 1, trans_b)
    rows = _reduction_last(weight.detach(), kind, trans_b)
    c = rows.shape[1]
    if c % 4:
        raise ValueError(f"cannot prune 2:4: input channels {c} not a multiple of 4")
    cols = rows.abs().reshape(rows.shape[0], -1, 4).unbind(-1)
    ranks = []  # rank of entry i = how many entries of its group beat it (12 whole-tensor compares)
    for i in range(4):
        beaten_by = [cols[j] >= cols[i] if j < i else cols[j] > cols[i] for j in range(4) if j != i]
        ranks.append(torch.stack(beaten_by).sum(0, dtype=torch.uint8))  # 0..3: int64 would be 8x the size
        del beaten_by
    keep = (torch.stack(ranks, -1) < 2).reshape(rows.shape)
    if kind == "conv":
        return keep.reshape(weight.shape[0], *weight.shape[2:], c).movedim(-1, 1)
    return keep if _in_last(kind, trans_b) else keep.t()


class SparsityTable:
    """Per-layer 2:4 verdicts: printable, JSON-able (`to_dict`), iterable over `rows`."""

    def __init__(self, rows: Iterable[LayerSparsity]) -> None:
        self.rows: tuple[LayerSparsity, ...] = tuple(rows)
        for r in self.rows:
            if not isinstance(r, LayerSparsity):
                raise TypeError(f"SparsityTable rows must be LayerSparsity, got {type(r).__name__}")

    def __iter__(self) -> Iterator[LayerSparsity]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def eligible(self) -> list[str]:
        return [r.name for r in self.rows if r.eligible]

    @property
    def likely_to_help(self) -> list[str]:
        return [r.name for r in self.rows if r.likely_to_help]

    def summary(self) -> str:
        return f"{len(self.rows)} layers, {len(self.eligible)} eligible, {len(self.likely_to_help)} likely to help"

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [r.to_dict() for r in self.rows],
            "summary": {
                "layers": len(self.rows),
                "eligible": len(self.eligible),
                "likely_to_help": len(self.likely_to_help),
            },
        }

    def __str__(self) -> str:
        header = ("layer", "kind", "shape", "dtype", "2:4", "violating", "eligible", "helps", "reason")
        yes = {True: "yes", False: "no"}
        body = [
            (
                r.name or "-",
                r.kind if r.groups == 1 else f"{r.kind}/g{r.groups}",
                "x".join(map(str, r.shape)),
                r.dtype,
                yes[r.pattern_ok],
                _fmt_pct(r.violating_fraction),
                yes[r.eligible],
                yes[r.likely_to_help],
                "; ".join(filter(None, [r.reason, *_notes(r)])),
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header) - 1)]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in [header, *body]
        ]
        lines.append(self.summary())
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self) -> str:
        return f"SparsityTable({self.summary()})"


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, (*_CONVS, nn.Linear)):
            if isinstance(mod.weight, nn.parameter.UninitializedParameter):
                raise ValueError(f"layer {name!r} is lazy and not initialized yet; run one forward pass first")
            found.append((name, mod))
    return found


def _analyze_module(name: str, mod: nn.Module, tensors: dict[str, torch.Tensor]) -> LayerSparsity:
    if isinstance(mod, _CONVS):
        row = analyze_weight(mod.weight, kind="conv", name=name, groups=mod.groups)
    else:
        row = analyze_weight(mod.weight, kind="linear", name=name)
    return replace(row, shared_with=_shared_with(_weight_name(name), mod.weight, tensors), computed=_computed(mod))


def _notes(row: LayerSparsity) -> list[str]:
    notes = [f"weight shared with {', '.join(row.shared_with)}"] if row.shared_with else []
    return notes + (["weight computed by a parametrization"] if row.computed else [])


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` by name, a tied one under each of its names."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: t for name, t in named if t is not None}


def _weight_name(layer: str) -> str:
    """The parameter name of a layer's weight: ``layers.0.fc.weight``, and ``weight`` for the
    model itself (a bare ``nn.Linear``, whose module path is empty)."""
    return f"{layer}.weight" if layer else "weight"


def _shared_with(name: str, weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """The names in `tensors` other than `name` whose memory overlaps `weight`'s."""
    return tuple(other for other, t in tensors.items() if other != name and _overlap(weight, t))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.device != b.device or not a.numel() or not b.numel() or a.layout != torch.strided or b.layout != torch.strided:
        return False
    try:
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return False
    except RuntimeError:  # no storage (a tensor subclass): only the same object is shared
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        start = t.storage_offset() * t.element_size()
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
        return start, start + extent * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _computed(mod: nn.Module) -> bool:
    """Whether the module's weight is computed from other tensors (a parametrization, or a hook
    such as ``weight_norm``'s) rather than held as its own parameter: pruning it would not last."""
    return mod._parameters.get("weight") is not mod.weight


def check(model: nn.Module) -> SparsityTable:
    """2:4 verdict for every Conv1d/2d/3d and Linear of `model` (named by module path), without
    compiling, so users can see which layers TensorRT could run sparse and why the others cannot.
    Rows follow `named_modules()` order. Each row also names the model's other parameters and
    buffers that share the layer's weight (``shared_with``: tied weights, such as an output
    head tied to an embedding) and says whether the weight is computed by a parametrization
    (``computed``: ``weight_norm``, ``torch.nn.utils.parametrize``); :func:`prune_2_4` skips
    such layers."""
    layers = _layers(model)
    tensors = _tensors(model)
    return SparsityTable(_analyze_module(name, mod, tensors) for name, mod in layers)


@dataclass(frozen=True)
class PruneReport:
    """What `prune_2_4` did: layers pruned, layers skipped (name -> reason), and the verdicts of
    all considered layers after pruning."""

    pruned: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    table: SparsityTable = field(default_factory=lambda: SparsityTable(()))

    def __str__(self) -> str:
        lines = [f"pruned {len(self.pruned)} layers, skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join([*lines, str(self.table)])


def prune_2_4(model: nn.Module, *, layers: Iterable[str] | None = None) -> PruneReport:
    """Magnitude-prune conv/linear weights in place to TensorRT's 2:4 pattern (opt-in).

    Keeps the 2 largest |w| of each group of 4 consecutive input channels at each (k, r, s), ties
    to the lower channel, like apex ASP's `m4n2_1d`. `layers` restricts pruning to those module
    paths (default: every Conv1d/2d/3d and Linear). Skipped and listed, with one warning: layers
    TensorRT cannot run sparse (grouped or depthwise convs, input channels not a multiple of 4);
    layers whose weight shares memory with a tensor that is not the weight of another layer being
    pruned (an output head tied to an embedding table: pruning would zero half of the table);
    layers whose weight is computed by a parametrization (``weight_norm``,
    ``torch.nn.utils.parametrize``: pruning the computed tensor would not last; remove the
    parametrization first); and any layer that is still not 2:4 after pruning. Layers that share
    one weight and are all pruned get one mask. Dtype, device and requires_grad are unchanged.
    Raises ValueError for a name in `layers` that is not a Conv1d/2d/3d or Linear of `model`.

    Pruning a trained model loses accuracy: follow apex ASP's recipe (train dense, prune once,
    fine-tune with the original schedule while keeping the zeros, e.g. by multiplying each weight
    by its mask `weight != 0` after every optimizer step). Without fine-tuning, use this for
    performance studies only.
    """
    available = _layers(model)
    if layers is not None:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        by_name = dict(available)
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ValueError(
                f"not a Conv1d/2d/3d or Linear module of the model: {', '.join(map(repr, unknown))}; "
                f"available: {', '.join(by_name) or '(none)'}"
            )
        available = [(n, by_name[n]) for n in dict.fromkeys(wanted)]

    pruned: list[str] = []
    skipped: dict[str, str] = {}
    tensors = _tensors(model)
    targets = {_weight_name(name) for name, _ in available}
    masked: set[int] = set()
    with torch.no_grad():
        for name, mod in available:
            w = mod.weight
            is_conv = isinstance(mod, _CONVS)
            shared = _shared_with(_weight_name(name), w, tensors)
            outside = [other for other in shared if other not in targets or tensors[other] is not w]
            if is_conv and mod.groups > 1:
                skipped[name] = _grouped_reason(mod.groups, w.shape[1])
            elif w.shape[1] % 4:
                skipped[name] = _channels_reason(w.shape[1], 1)
            elif _computed(mod):
                skipped[name] = (
                    "weight computed by a parametrization (weight_norm, torch.nn.utils.parametrize); "
                    "remove it first (torch.nn.utils.parametrize.remove_parametrizations)"
                )
            elif outside:
                skipped[name] = (
                    f"weight shared with {', '.join(outside)} (tied weights), which pruning would change too"
                )
            else:
                if id(w) not in masked:  # layers sharing one weight: one mask
                    w.mul_(mask_2_4(w, kind="conv" if is_conv else "linear"))
                    masked.add(id(w))
                pruned.append(name)
    table = SparsityTable(_analyze_module(n, m, tensors) for n, m in available)
    for row in table:
        if row.name in pruned and not row.pattern_ok:
            pruned.remove(row.name)
            skipped[row.name] = f"still not 2:4 after pruning ({row.reason})"
    if skipped:
        log.warning(
            "prune_2_4 skipped %d layer(s) it cannot prune to 2:4: %s",
            len(skipped),
            "; ".join(f"{n} ({r})" for n, r in skipped.items()),
        )
    return PruneReport(pruned=tuple(pruned), skipped=skipped, table=table)


# ---------------------------------------------------------------------------------------------
# ONNX


def _onnx_to_torch_dtypes() -> dict[int, torch.dtype]:
    from onnx import TensorProto as T

    return {
        T.FLOAT: torch.float32,
        T.FLOAT16: torch.float16,
        T.BFLOAT16: torch.bfloat16,
        T.DOUBLE: torch.float64,
        T.INT8: torch.int8,
        T.UINT8: torch.uint8,
        T.INT32: torch.int32,
        T.INT64: torch.int64,
        T.FLOAT8E4M3FN: torch.float8_e4m3fn,
        T.FLOAT8E5M2: torch.float8_e5m2,
    }


def _tensor_to_torch(name: str, tensor: Any, dtypes: dict[int, torch.dtype]) -> torch.Tensor | None:
    """TensorProto -> torch tensor; None (and a warning) for element types torch cannot hold."""
    import numpy as np
    from onnx import numpy_helper

    dtype = dtypes.get(tensor.data_type)
    if dtype is None:
        log.warning("skipped ONNX weight %r: element type %d not supported", name, tensor.data_type)
        return None
    arr = numpy_helper.to_array(tensor)
    if arr.dtype.kind == "V" or arr.dtype.type.__module__ != "numpy":  # ml_dtypes (bf16, fp8)
        bits = {1: np.uint8, 2: np.uint16}[arr.dtype.itemsize]
        arr = np.ascontiguousarray(arr).view(bits)
        return torch.from_numpy(arr.copy()).view(dtype)
    return torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)


def _load_onnx(path_or_model: Any) -> Any:
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    if not isinstance(path_or_model, (str, os.PathLike)):
        raise TypeError(f"expected a path to an .onnx file or an onnx.ModelProto, got {type(path_or_model).__name__}")
    path = os.fspath(path_or_model)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such ONNX file: {path}")
    try:
        model = onnx.load(path)
    except OSError:
        raise
    except Exception as e:  # protobuf DecodeError and friends
        raise ValueError(f"{path} is not a valid ONNX model: {e}") from e
    if not model.ir_version or not model.HasField("graph"):
        raise ValueError(f"{path} is not a valid ONNX model (no IR version or graph)")
    return model


def check_onnx(path_or_model: Any) -> SparsityTable:
    """2:4 verdict for the constant weights of an ONNX model's top-level graph, the form users hand
    to TensorRT.

    Covers Conv W (axis 1 = C, `group` attribute), Gemm B (reduction axis 1 when transB, else 0)
    and 2-D MatMul B (reduction axis 0), when that input is an initializer or Constant, the
    output of a DequantizeLinear of one (Q/DQ INT8 models: the integer weights are checked), or
    a 2-D Transpose of either (as ATen's ``t`` exports a linear's weight, trt_subgraph's
    ``export_onnx`` included: the constant is then checked in its own layout).
    Rows follow the graph's node order; a weight shared by several nodes is reported once. A row
    is named after the weight's source: a constant that torch.onnx's optimizer folded (the
    transposed weight of a MatMul, named ``val_N``) is traced back to the initializer it was
    folded from, and a trailing ``.weight`` is dropped, so a file exported from PyTorch names its
    rows by module path, as :func:`check` does.
    """
    from onnx import helper

    model = _load_onnx(path_or_model)
    graph = model.graph
    sources = _folded_sources(model)
    consts: dict[str, Any] = {t.name: t for t in graph.initializer}
    dequant: dict[str, str] = {}
    transposed: dict[str, str] = {}  # output of a 2-D Transpose -> its input
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = helper.get_attribute_value(a)
        elif node.op_type == "DequantizeLinear" and node.input:
            dequant[node.output[0]] = node.input[0]
        elif node.op_type == "Transpose" and node.input:
            perm = [list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"]
            if perm in ([], [[1, 0]]):  # no perm: the axes reversed (of a 2-D tensor, [1, 0])
                transposed[node.output[0]] = node.input[0]

    dtypes = _onnx_to_torch_dtypes()
    seen: set[str] = set()
    rows = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        flip = node.input[1] in transposed and node.op_type != "Conv"
        weight_input = transposed[node.input[1]] if flip else node.input[1]
        src = dequant.get(weight_input, weight_input)
        if src not in consts or src in seen:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        tensor = consts[src]
        if (node.op_type == "MatMul" or flip) and len(tensor.dims) != 2:
            log.debug("skipped %s weight %r: %d-D, not 2-D", node.op_type, src, len(tensor.dims))
            continue
        if 0 in tensor.dims:
            log.debug("skipped %s weight %r: no elements (dims %s)", node.op_type, src, list(tensor.dims))
            continue
        weight = _tensor_to_torch(src, tensor, dtypes)
        if weight is None:
            continue
        seen.add(src)
        name = _layer_name(sources.get(src, src))
        if node.op_type == "Conv":
            rows.append(analyze_weight(weight, kind="conv", name=name, groups=int(attrs.get("group", 1))))
        elif node.op_type == "Gemm":  # B = W^T with transB is B = W without it
            rows.append(analyze_weight(weight, kind="gemm", name=name, trans_b=bool(attrs.get("transB", 0)) != flip))
        else:  # MatMul B = W^T: W is (out, in), a linear's weight
            rows.append(analyze_weight(weight, kind="linear" if flip else "matmul", name=name))
    return SparsityTable(rows)


# onnxscript's constant folder (torch.onnx's optimizer) records on every folded value the names
# of the values it was computed from, as the repr of a sorted list.
_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
_SIGNATURE = "pkg.torch.export.ExportedProgram.graph_signature"


def _folded_sources(model: Any) -> dict[str, str]:
    """Folded value name -> the one original value it was folded from (where that is clear).

    The record also lists intermediate folded values and helper constants (a Reshape's shape);
    the original is the one listed value not folded itself, or, when several are, the one that is
    a parameter or buffer in the exported program's graph signature.
    """
    folded: dict[str, list[str]] = {}
    for value in [*model.graph.value_info, *model.graph.initializer]:
        for prop in getattr(value, "metadata_props", ()):
            if prop.key == _FOLDED_FROM:
                try:
                    folded[value.name] = [str(n) for n in ast.literal_eval(prop.value)]
                except (ValueError, SyntaxError, TypeError):
                    log.debug("unreadable %s on %r: %r", _FOLDED_FROM, value.name, prop.value)
    signature = next((p.value for p in model.metadata_props if p.key == _SIGNATURE), "")
    parameters = set(re.findall(r"target='([^']+)'", signature))
    sources = {}
    for name, names in folded.items():
        originals = [n for n in names if n not in folded]
        if len(originals) > 1:
            originals = [n for n in originals if n in parameters]
        if len(originals) == 1:
            sources[name] = originals[0]
    return sources


def _layer_name(weight_name: str) -> str:
    """``blocks.0.fc.weight`` -> ``blocks.0.fc``: PyTorch names a layer's weight after its module."""
    return weight_name.removesuffix(".weight") or weight_name
