"""Size symbols of a piece, detached from Dynamo's ShapeEnv, and what a build assumed about them.

A piece of a dynamic graph carries Dynamo's size symbols (``s77``). They belong to Dynamo's
ShapeEnv, where a separate compile cannot reason about them (``vr must not be None for symbol
s77``). :func:`detach` gives the piece a ShapeEnv of its own: one fresh symbol per Dynamo symbol,
with the same value range and hint, and example inputs whose sizes and strides are the same
expressions over the fresh symbols. Relations survive: ``s0*s1`` stays a product, and two inputs
that share ``s0`` share its fresh symbol. Ranges and relations are what the fingerprint holds;
the hints (the sizes of the call that compiled) only steer choices that hold for every size,
such as tile sizes.

A compiled piece reads its symbols' values from its inputs, so each must be some input's size,
stride or SymInt by itself. Behind a strided convolution, for one, the piece's input is
``(s0 - 1)//2 + 1`` high and ``s0`` is no input's size; inductor then fails (``expected [s0] to
have been codegen-ed``). Such an expression becomes a fresh symbol of its own, with the range
the expression has: the piece is compiled for every size in that range, which holds the sizes
the expression can take.

A compile may still assume more than that, by guarding on a size: inductor's C++ code, for one,
picks its summation for reductions of at most 4096 elements and guards on it. Such conditions
are not in the fingerprint, so :meth:`Detached.added_guards` hands them back as a Python
expression over the piece's inputs, for the engine to check on every call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import sympy
import torch

from . import _compat

__all__ = ["Detached", "detach", "is_symbolic"]


def is_symbolic(values: Iterable[Any]) -> bool:
    """Whether any of `values` is a SymInt or a tensor with a symbolic size or stride."""
    for v in values:
        if isinstance(v, torch.SymInt):
            return True
        if isinstance(v, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in (*v.shape, *v.stride())):
            return True
    return False


@dataclasses.dataclass
class Detached:
    """Example inputs on a ShapeEnv of their own (see :func:`detach`)."""

    fake_mode: Any
    shape_env: Any
    inputs: list[Any]
    _ranges: dict[Any, Any]

    def added_guards(self) -> str | None:
        """What a compile on these inputs assumed about their sizes beyond their ranges and
        relations, as a Python expression over ``L['t0']``, ``L['t1']``, ... (the real inputs in
        order; it restates the ranges and relations too), or None when it assumed nothing more.

        Raises RuntimeError when the assumptions cannot be written over the inputs (a symbol that
        no input size or SymInt input holds by itself)."""
        env = self.shape_env
        narrowed = any(env.var_to_range.get(symbol) != bounds for symbol, bounds in self._ranges.items())
        if not env.guards and not env.replacements and not narrowed:
            return None
        try:
            return _compat.guards_expression(env, self.inputs)
        except Exception as exc:
            raise RuntimeError(
                f"the compiled code assumes sizes the inputs cannot be checked for ({type(exc).__name__}: {exc})"
            ) from exc


def detach(example_inputs: list[Any]) -> Detached:
    """Copies of `example_inputs` (fake tensors and SymInts of Dynamo's ShapeEnv, or plain
    values) on a fresh ShapeEnv: each size symbol becomes a new one (``d0``, ``d1``, ... in order
    of first appearance) with the same value range and hint; sizes, strides and SymInt inputs
    become the same expressions over the new symbols. A size or SymInt input over a symbol that
    no input holds by itself becomes a new symbol of its own, with the expression's range and
    value (equal expressions share it). Tensors keep dtype and device (storage offset 0). Raises
    ValueError for a symbol without a hint (an unbacked, data-dependent size).
    """
    fake_mode, shape_env = _compat.fresh_shape_env()
    fresh: dict[sympy.Symbol, sympy.Symbol] = {}  # Dynamo's symbols
    standalone: dict[sympy.Expr, sympy.Symbol] = {}  # expressions over symbols no input holds
    hints: dict[sympy.Symbol, sympy.Integer] = {}
    sizes = [
        s
        for value in example_inputs
        for s in ((*value.shape, *value.stride()) if isinstance(value, torch.Tensor) else (value,))
        if isinstance(s, torch.SymInt)
    ]
    bound = {s.node.expr for s in sizes if s.node.expr.is_Symbol}

    def new_symbol(expr: Any, source_env: Any, bounds: Any) -> sympy.Symbol:
        values = {}
        for symbol in expr.free_symbols:
            if (hint := _compat.symbol_hint(source_env, symbol)) is None:
                raise ValueError(f"size symbol {symbol} has no hint (an unbacked, data-dependent size)")
            values[symbol] = hint
        hint = int(expr.xreplace(values))
        new = _compat.create_size_symbol(shape_env, f"d{len(hints)}", hint, bounds)
        hints[new] = sympy.Integer(hint)
        return new

    def convert(size: Any) -> Any:
        if not isinstance(size, torch.SymInt):
            return size
        expr, source_env = size.node.expr, size.node.shape_env
        # Dynamo's symbols outside the standalone sizes it holds (a stride over a standalone
        # size keeps the relation)
        rest = expr.xreplace(dict.fromkeys(standalone, sympy.Integer(1))).free_symbols
        if not rest <= bound:
            standalone[expr] = new_symbol(expr, source_env, _compat.expression_range(expr, source_env))
        else:
            for symbol in sorted(rest - set(fresh), key=str):
                fresh[symbol] = new_symbol(symbol, source_env, source_env.var_to_range[symbol])
        new_expr = expr.xreplace({**standalone, **fresh})  # at once: both sides' names may coincide
        return shape_env.create_symintnode(new_expr, hint=int(new_expr.xreplace(hints)))

    inputs: list[Any] = []
    with fake_mode:
        for value in example_inputs:
            if isinstance(value, torch.Tensor):
                shape = [convert(s) for s in value.shape]
                stride = [convert(s) for s in value.stride()]
                inputs.append(torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device))
            else:
                inputs.append(convert(value))
    return Detached(fake_mode, shape_env, inputs, dict(shape_env.var_to_range))
