"""Whether a dynamic graph's batch may be padded, decided from its ATen graph.

With ``cudagraph_sizes``, a batch of 3 runs the CUDA graph recorded for 4, as vLLM's capture
sizes do: the batch inputs grow by repeated rows and the outputs are cut back. That is right
only when no row of the output depends on another row of the input. The rule, checked on every
node with the graph's symbolic sizes:

- The batch ``B`` is dim 0 of every activation input, a size symbol that is in no other input
  size (an integer input may equal ``B``). Dynamo gives each input a symbol of its own
  (``input_ids`` and ``attention_mask`` of one batch): those symbols are taken for one, and the
  runtime pads only calls where they are equal.
- Every value either has ``B`` nowhere in its shape ("free": it holds no batch data) or has
  ``B`` only in dim 0, as the outermost factor (``B``, ``B*S``: "batched", rows in batch order).
  A tensor computed from batched values is batched (a sum over the batch is not).
- An op on batched values must keep rows apart: pointwise ops; reshapes that keep ``B``
  outermost in dim 0; permutes, slices, concatenations and reductions over other dims only;
  matrix products and convolutions whose weights are free; attention over dim 0 as the batch;
  normalisations over trailing dims or with running statistics; indexing that reads row r of
  a batched value at row r (its own ``arange(B)``, as attention masks do) or a free table by
  batched indices. Anything else (a reduction over dim 0, a sort, an index into the batch, an
  op this list does not know) rules padding out.
- Every output is free or batched.

A free value computed from sizes only (``zeros(B, 4)``, ``arange(B)``) is allowed where its rows
do not depend on ``B``'s value (factories with constant fill and step).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.fx

from ._compat import OpOverload, symbol_range
from .runtime import BatchPadding

__all__ = ["batch_symbols", "blocker", "padding_for", "plan"]

aten = torch.ops.aten
FREE, BATCHED = "free", "batched"


def batch_symbols(inputs: Sequence[Any], weight_flags: Sequence[bool]) -> tuple[frozenset | None, str | None]:
    """(the batch, None), or (None, why there is none) for a graph's fake inputs. The batch is
    the set of size symbols that are dim 0 of the activation inputs: Dynamo gives each input a
    symbol of its own (``input_ids`` and ``attention_mask`` of one batch), and the runtime pads
    only calls where they are all equal, so the analysis may take them for one."""
    found = set()
    for x, weight in zip(inputs, weight_flags):
        if not isinstance(x, torch.Tensor) or weight:
            continue
        first = x.shape[0] if x.dim() else None
        if not isinstance(first, torch.SymInt) or not isinstance(first.node.expr, sympy.Symbol):
            return None, "an activation input whose dim 0 is not a dynamic size"
        found.add(first.node.expr)
    if not found:
        return None, "no activation input"
    return frozenset(found), None


def _is_activation(x: Any, weight: bool) -> bool:
    return isinstance(x, torch.Tensor) and not weight


def padding_for(
    sizes: Sequence[int], inputs: Sequence[Any], weight_flags: Sequence[bool], outputs: Sequence[Any], batch: Any
) -> tuple[BatchPadding | None, str | None]:
    """The runtime's :class:`BatchPadding` for a forward whose fake `inputs` and `outputs` (in
    the order it takes and returns them) have the batch symbols `batch`, or (None, why not).
    Only sizes in every batch symbol's value range are padded to: the graph was compiled for
    those ranges."""
    shape_env = next(x.shape[0].node.shape_env for x, w in zip(inputs, weight_flags) if _is_activation(x, w))
    ranges = [symbol_range(shape_env, s) for s in batch]
    low = max(lo for lo, _ in ranges)
    high = min((hi for _, hi in ranges if hi is not None), default=None)
    sizes = [n for n in sizes if n >= low and (high is None or n <= high)]
    if not sizes:
        return None, f"no listed size is in the batch's range {low}..{high if high is not None else 'inf'}"
    batch_inputs, sizes_at = [], []
    for i, (x, weight) in enumerate(zip(inputs, weight_flags)):
        kind = _classify(x, batch)
        if kind not in (FREE, BATCHED):
            return None, f"input {i}: {kind}"
        if isinstance(x, torch.Tensor) and not weight:
            if x.shape[0].node.expr not in batch or kind != BATCHED:  # batch_symbols made dim 0 a SymInt
                return None, f"input {i}: dim 0 is not the batch"
            batch_inputs.append(i)
        elif isinstance(x, torch.SymInt) and x.node.expr in batch:
            sizes_at.append(i)
        elif isinstance(x, torch.Tensor) and kind != FREE:
            return None, f"weight input {i} has the batch in its shape"
    batch_outputs = []
    for i, y in enumerate(outputs):
        if isinstance(y, torch.SymInt) and y.node.expr.free_symbols & batch:
            return None, f"output {i} is a size computed from the batch"
        kind = _classify(y, batch)
        if kind == BATCHED and isinstance(y, torch.Tensor):
            batch_outputs.append(i)
        elif kind != FREE:
            return None, f"output {i}: {kind}"
    return BatchPadding(tuple(sorted(sizes)), tuple(batch_inputs), tuple(sizes_at), tuple(batch_outputs)), None


def blocker(gm: torch.fx.GraphModule, batch: Any, meta_key: str = "val") -> str | None:
    """Why padding the batch (`batch`: its size symbols, see :func:`batch_symbols`) could change
    a row of `gm`'s outputs (an ATen graph, fake values in ``meta[meta_key]``), or None when no op
    mixes rows (see the module's rule)."""
    kinds: dict[torch.fx.Node, Any] = {}
    rows: set[torch.fx.Node] = set()  # values whose element at row r is r (arange(B) and views)
    for node in gm.graph.nodes:
        value = node.meta.get(meta_key)
        if node.op == "placeholder" or node.op == "get_attr":
            kinds[node] = _classify(value, batch)
        elif node.op == "call_function":
            args = [kinds.get(a) for a in node.all_input_nodes]
            if any(a not in (FREE, BATCHED) and not isinstance(a, tuple) for a in args):
                return f"{node.name} reads a value with the batch in another dim"
            kind = _classify(value, batch)
            if kind not in (FREE, BATCHED) and not isinstance(kind, tuple):
                return f"{node.name} ({_name(node.target)}): {kind}"
            if node.target is operator.getitem:
                source = kinds.get(node.args[0])
                kinds[node] = source[node.args[1]] if isinstance(source, tuple) else kind
                continue
            if any(_has_batch(a) for a in args) or _has_batch(kind):
                reason = _index(node, kinds, rows) if node.target is aten.index.Tensor else _rule(node, batch)
                if reason is None and kind == FREE and isinstance(value, torch.Tensor):
                    reason = "reads batch data into a value without the batch"
                if reason is not None:
                    return f"{node.name} ({_name(node.target)}): {reason}"
            kinds[node] = kind
            if _is_row_index(node, batch, rows):
                rows.add(node)
        elif node.op == "output":
            for out in node.all_input_nodes:
                if not (kinds.get(out) == FREE or kinds.get(out) == BATCHED):
                    return f"output {out.name} is not batch-major"
        else:
            return f"{node.op} node {node.name}"
    return None


def _is_row_index(node: torch.fx.Node, batch: Any, rows: set[torch.fx.Node]) -> bool:
    """Whether `node`'s value at row r is r: ``arange(B)``, then only ops that add dims of size 1
    after dim 0, broadcast them or change the dtype (masks index their batch so)."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return False
    if node.target in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        end, start = (node.args[0], 0) if node.target is aten.arange.default else (node.args[1], node.args[0])
        step = node.args[2] if node.target is aten.arange.start_step else 1
        end = end.meta.get("val") if isinstance(end, torch.fx.Node) else end
        return start == 0 and step == 1 and isinstance(end, torch.SymInt) and end.node.expr in batch
    source, packet = node.args[0] if node.args else None, getattr(node.target, "overloadpacket", None)
    if source not in rows or packet not in _ROW_INDEX_OPS or (packet is aten.slice and _slice(node, batch)):
        return False
    first = value.shape[0] if value.dim() else None
    return isinstance(first, torch.SymInt) and first.node.expr in batch


def _index(node: torch.fx.Node, kinds: dict[torch.fx.Node, Any], rows: set[torch.fx.Node]) -> str | None:
    """``x[i0, i1, ...]`` keeps rows apart when x holds no batch data and the indices carry the
    batch in dim 0 or not at all (a row of the output reads one row of the indices), or when
    dim 0 of a batched x is not indexed or indexed by its own row numbers (``arange(B)``) and
    the other indices hold no batch data."""
    x, indices = node.args[0], list(node.args[1])
    if kinds.get(x) == FREE:
        ndims = [i.meta["val"].dim() for i in indices if isinstance(i, torch.fx.Node)]
        batched = [i for i in indices if isinstance(i, torch.fx.Node) and kinds.get(i) == BATCHED]
        if indices and indices[0] is not None and all(i.meta["val"].dim() == max(ndims) for i in batched):
            return None
        return "indexes with batch data not aligned to dim 0"
    first, rest = indices[0] if indices else None, indices[1:]
    if (first is None or first in rows) and all(i is None or kinds.get(i) == FREE for i in rest):
        return None
    return "indexes across the batch"


def _has_batch(kind: Any) -> bool:
    return kind == BATCHED or (isinstance(kind, tuple) and BATCHED in kind)


def _classify(value: Any, batch: Any) -> Any:
    """FREE, BATCHED, a tuple of those for a tuple value, or a reason string."""
    if isinstance(value, (tuple, list)):
        kinds = tuple(_classify(v, batch) for v in value)
        return next((k for k in kinds if k not in (FREE, BATCHED)), kinds)
    if isinstance(value, torch.SymInt) or not isinstance(value, torch.Tensor):
        return FREE  # sizes may hold the batch: they are read from the (padded) inputs at run time
    dims = [i for i, s in enumerate(value.shape) if isinstance(s, torch.SymInt) and s.node.expr.free_symbols & batch]
    if not dims:
        return FREE
    if dims != [0]:
        return f"the batch is in dim {dims[-1]} of a {tuple(value.shape)} value"
    one = min(batch, key=str)  # every batch symbol stands for the same size
    rest = sympy.simplify(value.shape[0].node.expr.xreplace(dict.fromkeys(batch, one)) / one)
    if one in rest.free_symbols or not rest.is_polynomial():
        return f"dim 0 of a {tuple(value.shape)} value is not a multiple of the batch"
    return BATCHED


def _name(target: Any) -> str:
    return str(target) if isinstance(target, OpOverload) else getattr(target, "__name__", repr(target))


def _dim(node: torch.fx.Node, dim: Any, tensor_arg: int = 0) -> int:
    ndim = node.args[tensor_arg].meta["val"].dim()
    return dim % max(ndim, 1)


def _dims_exclude_0(node: torch.fx.Node, position: int, name: str, default_all: bool = True) -> str | None:
    dims = node.args[position] if len(node.args) > position else node.kwargs.get(name)
    if dims is None or dims == []:
        return "reduces over every dim, the batch too" if default_all else None
    dims = [dims] if isinstance(dims, int) else dims
    if any(_dim(node, d) == 0 for d in dims):
        return "works across dim 0 (the batch)"
    return None


def _free_args(node: torch.fx.Node, positions: Sequence[int], batch: Any) -> str | None:
    for p in positions:
        if len(node.args) > p and isinstance(node.args[p], torch.fx.Node):
            if _classify(node.args[p].meta.get("val"), batch) != FREE:
                return f"argument {p} holds batch data (rows would mix)"
    return None


def _rule(node: torch.fx.Node, batch: Any) -> str | None:
    """None when `node` keeps batch rows apart (its inputs and output classify already), else why not."""
    target = node.target
    if isinstance(target, OpOverload) and torch.Tag.pointwise in target.tags:
        return None
    packet = getattr(target, "overloadpacket", None)
    check = _RULES.get(packet) if packet is not None else None
    if check is None:
        return "not known to keep batch rows apart"
    return check(node, batch)


def _always(node: torch.fx.Node, batch: Any) -> str | None:
    return None


def _reduction(position: int, name: str = "dim", default_all: bool = True) -> Callable[..., str | None]:
    return lambda node, batch: _dims_exclude_0(node, position, name, default_all)


def _dim_arg(position: int, name: str = "dim", default: int | None = None) -> Callable[..., str | None]:
    def check(node: torch.fx.Node, batch: Any) -> str | None:
        dim = node.args[position] if len(node.args) > position else node.kwargs.get(name, default)
        if not isinstance(dim, int):
            return "works across every dim" if dim is None else "takes a dim that is not a constant"
        return "works across dim 0 (the batch)" if _dim(node, dim) == 0 else None

    return check


def _cat(node: torch.fx.Node, batch: Any) -> str | None:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return "concatenates along dim 0 (the batch)" if dim % max(node.meta["val"].dim(), 1) == 0 else None


def _slice(node: torch.fx.Node, batch: Any) -> str | None:
    """A slice of dim 0 is allowed only when it keeps every row (``x[:, 1]`` traces one)."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if _dim(node, dim) != 0:
        return None
    start, end, step = [*node.args[2:5], None, None, None][:3]
    if isinstance(end, torch.fx.Node):
        end = end.meta.get("val")
    whole = node.args[0].meta["val"].shape[0]
    if isinstance(end, torch.SymInt) and isinstance(whole, torch.SymInt):
        end_is_whole = end.node.expr == whole.node.expr
    else:
        end_is_whole = end is None or (isinstance(end, int) and end >= sys.maxsize)
    if start in (None, 0) and step in (None, 1) and end_is_whole:
        return None
    return "slices dim 0 (the batch)"


def _arange(node: torch.fx.Node, batch: Any) -> str | None:
    """``arange(end)`` counts 0, 1, ...; with a start or step, those must not depend on the batch."""
    if node.target is aten.arange.default:
        return None
    return _factory([0, 2])(node, batch)


def _permute(node: torch.fx.Node, batch: Any) -> str | None:
    dims = node.args[1]
    return None if _dim(node, dims[0]) == 0 else "moves the batch off dim 0"


def _transpose(node: torch.fx.Node, batch: Any) -> str | None:
    return "moves the batch off dim 0" if 0 in (_dim(node, node.args[1]), _dim(node, node.args[2])) else None


def _first_only(*free: int) -> Callable[..., str | None]:
    """Row-wise in argument 0; the arguments at `free` (weights) must hold no batch data."""
    return lambda node, batch: _free_args(node, free, batch)


def _layer_norm(node: torch.fx.Node, batch: Any) -> str | None:
    ndim = node.args[0].meta["val"].dim()
    if len(node.args[1]) >= ndim:
        return "normalizes across dim 0 (the batch)"
    return _free_args(node, (2, 3), batch)


def _batch_norm_training(node: torch.fx.Node, batch: Any) -> str | None:
    training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training")
    return "batch statistics mix rows" if training else _free_args(node, (1, 2, 3, 4), batch)


def _factory(value_args: Sequence[int]) -> Callable[..., str | None]:
    """A factory whose element values are constants or start + index * step: rows do not depend
    on the batch's value as long as those arguments do not."""

    def check(node: torch.fx.Node, batch: Any) -> str | None:
        for p in value_args:
            if len(node.args) > p:
                v = node.args[p]
                if isinstance(v, torch.fx.Node) or (isinstance(v, torch.SymInt) and v.node.expr.free_symbols & batch):
                    return "its values depend on the batch size"
        return None

    return check


def _constant_pad(node: torch.fx.Node, batch: Any) -> str | None:
    pads, ndim = node.args[1], node.args[0].meta["val"].dim()
    return "pads dim 0 (the batch)" if len(pads) >= 2 * ndim and any(p != 0 for p in pads[-2:]) else None


def _mm(node: torch.fx.Node, batch: Any) -> str | None:
    """Rows of argument `x` times a free matrix (addmm's bias is free or batched per row)."""
    x_at, w_at = (1, 2) if node.target.overloadpacket in (aten.addmm,) else (0, 1)
    return _free_args(node, (w_at,), batch) or (_free_args(node, (0,), batch) if x_at == 1 else None)


def _embedding(node: torch.fx.Node, batch: Any) -> str | None:
    return _free_args(node, (0,), batch)


def _index_select(node: torch.fx.Node, batch: Any) -> str | None:
    if _dim(node, node.args[1]) == 0 and _classify(node.args[0].meta["val"], batch) == BATCHED:
        return "selects rows of the batch"
    return None


_RULES: dict[Any, Callable[[torch.fx.Node, Any], str | None]] = {}
_ROW_INDEX_OPS = {
    aten.unsqueeze,
    aten.expand,
    aten._to_copy,
    aten.clone,
    aten.alias,
    aten.view,
    aten._unsafe_view,
    aten.slice,  # whole dim 0 only
}


def _register(names: Sequence[str], check: Callable[[torch.fx.Node, Any], str | None]) -> None:
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            _RULES[packet] = check


# Shape ops whose output classifies as batched keep rows in batch order (view and reshape keep
# the row-major order, so B stays the outermost factor of dim 0, which _classify checks).
_register(
    [
        "view",
        "_unsafe_view",
        "reshape",
        "clone",
        "_to_copy",
        "alias",
        "detach",
        "expand",
        "unsqueeze",
        "squeeze",
        "contiguous",
        "lift_fresh_copy",
        "empty_like",
        "zeros_like",
        "ones_like",
        "full_like",
        "rand_like",
        "randn_like",
        "masked_fill",
        "copy",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "native_dropout",
        "_native_batch_norm_legit_no_training",
        "upsample_nearest2d",
        "upsample_bilinear2d",
        "upsample_nearest1d",
        "avg_pool2d",
        "max_pool2d_with_indices",
        "_adaptive_avg_pool2d",
        "adaptive_avg_pool2d",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
        "bmm",
        "baddbmm",
    ],
    _always,
)
_register(["permute"], _permute)
_register(["transpose"], _transpose)
_register(["select", "narrow", "split", "split_with_sizes", "unbind", "chunk"], _dim_arg(1, default=0))
_register(["slice"], _slice)
_register(["cat", "stack"], _cat)
_register(
    ["sum", "mean", "amax", "amin", "prod", "any", "all", "logsumexp", "var", "std", "var_mean", "std_mean"],
    _reduction(1),
)
_register(["linalg_vector_norm"], _reduction(2))
_register(["max", "min", "argmax", "argmin"], _dim_arg(1, default=None))
_register(["_softmax", "_log_softmax", "softmax", "log_softmax", "cumsum", "cumprod"], _dim_arg(1))
_register(["sort"], _dim_arg(1, default=-1))
_register(["topk"], _dim_arg(2, default=-1))
_register(["mm", "addmm"], _mm)
_register(["convolution", "_convolution"], _first_only(1, 2))
_register(["native_layer_norm"], _layer_norm)
_register(["native_group_norm"], _first_only(1, 2))
_register(["native_batch_norm", "_native_batch_norm_legit"], _batch_norm_training)
_register(["embedding"], _embedding)
_register(["index_select"], _index_select)
_register(["constant_pad_nd"], _constant_pad)
_register(["zeros", "ones", "empty", "empty_strided", "new_empty", "new_zeros", "new_ones"], _always)
_register(["full"], _factory([1]))
_register(["new_full"], _factory([2]))
_register(["arange"], _arange)


def plan(
    sizes: Sequence[int],
    inputs: Sequence[Any],
    weight_flags: Sequence[bool],
    outputs: Sequence[Any],
    rows_mixed: dict[Any, str | None],
) -> tuple[BatchPadding | None, str | None]:
    """(the padding, None), or (None, why the batch is not padded), for a forward with these fake
    `inputs` and `outputs`. `rows_mixed`: the :func:`blocker` of the forward's graphs, keyed by
    the batch it was run for (:func:`batch_symbols` of `inputs`)."""
    batch, why = batch_symbols(inputs, weight_flags)
    if batch is None:
        return None, why
    if batch not in rows_mixed:
        return None, "the graph was not analyzed for this batch"
    if rows_mixed[batch] is not None:
        return None, rows_mixed[batch]
    return padding_for(sizes, inputs, weight_flags, outputs, batch)
