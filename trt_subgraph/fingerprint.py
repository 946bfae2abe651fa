"""A structural fingerprint: xxh3-128 over topology, arguments, shapes, dtypes and strides.

Hashed: op targets, argument wiring by position, normalised literals, each input's kind,
dtype, shape, stride and device, symbolic sizes as canonical tokens (``d0``, ``d1``, in order
of first appearance) with their value ranges. Never hashed: node names, module paths, weight
values. Everything is rendered to text first, so the hash does not depend on the process.
"""
from __future__ import annotations

import math
from typing import Any

import sympy
import torch
import torch.fx
import xxhash

from ._compat import symbol_range
from .engines.base import op_name


class UnhashableArgument(TypeError):
    """A literal whose identity we cannot render deterministically; the piece runs in PyTorch."""


def fingerprint(gm: torch.fx.GraphModule, input_kinds: list[str] | tuple[str, ...]) -> str:
    return xxhash.xxh3_128_hexdigest(describe(gm, input_kinds).encode())


def describe(gm: torch.fx.GraphModule, input_kinds, meta_key: str = "val") -> str:
    """The exact text that is hashed (useful to see why two pieces differ).

    `meta_key`: where nodes keep their fake values (``val`` in ATen graphs, ``example_value`` in
    Dynamo's)."""
    symbols = _Symbols()
    position: dict[torch.fx.Node, int] = {}
    lines = []
    kinds = iter(input_kinds)
    for node in gm.graph.nodes:
        position[node] = len(position)
        if node.op == "placeholder":
            lines.append(f"in {next(kinds)} {_value(node.meta.get(meta_key), symbols)}")
        elif node.op == "output":
            lines.append(f"out {_arg(node.args[0], position, symbols)}")
        else:
            kwargs = {k: node.kwargs[k] for k in sorted(node.kwargs)}
            lines.append(
                f"{node.op} {op_name(node.target)} {_arg(node.args, position, symbols)} "
                f"{_arg(kwargs, position, symbols)} -> {_value(node.meta.get(meta_key), symbols)}"
            )
    lines.append("symbols " + symbols.ranges())
    return "\n".join(lines)


class _Symbols:
    def __init__(self) -> None:
        self.names: dict[sympy.Symbol, str] = {}
        self.bounds: dict[str, tuple[int, int | None]] = {}

    def render(self, value: Any) -> str:
        if isinstance(value, torch.SymInt):
            expr = value.node.expr
            for sym in sorted(expr.free_symbols, key=lambda s: str(s)):
                if sym not in self.names:
                    token = f"d{len(self.names)}"
                    self.names[sym] = token
                    self.bounds[token] = symbol_range(value.node.shape_env, sym)
            if expr.is_number:
                return str(int(expr))
            renamed = expr.xreplace({s: sympy.Symbol(self.names[s]) for s in expr.free_symbols})
            return f"<{renamed}>"
        return str(int(value))

    def ranges(self) -> str:
        return " ".join(f"{token}:{lo}..{hi}" for token, (lo, hi) in self.bounds.items())


def _value(val: Any, symbols: _Symbols) -> str:
    if isinstance(val, torch.Tensor):
        shape = ",".join(symbols.render(s) for s in val.shape)
        stride = ",".join(symbols.render(s) for s in val.stride())
        return f"T[{val.dtype} ({shape}) ({stride}) {val.device.type}]"
    if isinstance(val, (list, tuple)):
        return "(" + ",".join(_value(v, symbols) for v in val) + ")"
    if isinstance(val, torch.SymInt):
        return f"S[{symbols.render(val)}]"
    if val is None or isinstance(val, (int, float, bool)):
        return repr(val)
    return type(val).__name__


def _arg(arg: Any, position: dict, symbols: _Symbols) -> str:
    if isinstance(arg, torch.fx.Node):
        return f"%{position[arg]}"
    if isinstance(arg, (list, tuple)):
        inner = ",".join(_arg(a, position, symbols) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner})"
    if isinstance(arg, dict):
        return "{" + ",".join(f"{k}={_arg(v, position, symbols)}" for k, v in arg.items()) + "}"
    if isinstance(arg, bool) or arg is None or isinstance(arg, (int, str)):
        return repr(arg)
    if isinstance(arg, float):
        return "nan" if math.isnan(arg) else float.hex(arg)
    if isinstance(arg, torch.SymInt):
        return symbols.render(arg)
    if isinstance(arg, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(arg)
    if isinstance(arg, slice):
        return f"slice({_arg((arg.start, arg.stop, arg.step), position, symbols)})"
    if arg is Ellipsis:
        return "..."
    if callable(arg) and hasattr(arg, "__qualname__"):
        return op_name(arg)
    raise UnhashableArgument(f"cannot fingerprint argument of type {type(arg).__name__}: {arg!r}")
