"""A structural fingerprint: xxh3-128 over topology, arguments, shapes, dtypes and strides.

Hashed: op targets, argument wiring by position, normalised literals, each input's kind,
dtype, shape, stride and device, symbolic sizes as canonical tokens (``d0``, ``d1``, in order
of first appearance) with their value ranges. Never hashed: node names, module paths, weight
values. Everything is rendered to text first, so the hash does not depend on the process.

A callable is named only when its name is the callable (an op, or a function its module and
qualified name resolve to). Closures, bound methods, ``functools.partial`` objects and callable
instances share a name across objects that compute differently, so a persistent fingerprint
refuses them (:class:`UnhashableArgument`) and an in-process key gives each object its own token.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import sympy
import torch
import torch.fx
import xxhash

from ._compat import (
    HigherOrderOperator,
    OpOverload,
    OpOverloadPacket,
    is_user_triton_kernel_call,
    symbol_range,
    user_triton_kernel,
)
from .engines.base import op_name


class UnhashableArgument(TypeError):
    """A literal whose identity we cannot render deterministically; the piece runs in PyTorch."""


def fingerprint(gm: torch.fx.GraphModule, input_kinds: list[str] | tuple[str, ...]) -> str:
    return xxhash.xxh3_128_hexdigest(describe(gm, input_kinds).encode())


def describe(
    gm: torch.fx.GraphModule, input_kinds, meta_key: str = "val", opaque: Callable[[Any], str] | None = None
) -> str:
    """The exact text that is hashed (useful to see why two pieces differ).

    `meta_key`: where nodes keep their fake values (``val`` in ATen graphs, ``example_value`` in
    Dynamo's). `opaque`: the token of a callable that no name identifies (see
    :func:`callable_name`); None raises :class:`UnhashableArgument` for such a callable."""
    symbols = _Symbols(opaque)
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
            if is_user_triton_kernel_call(node.target):
                kwargs = _user_triton_kernel_kwargs(kwargs, symbols)
            lines.append(
                f"{node.op} {_target(node.target, symbols)} {_arg(node.args, position, symbols)} "
                f"{_arg(kwargs, position, symbols)} -> {_value(node.meta.get(meta_key), symbols)}"
            )
    lines.append("symbols " + symbols.ranges())
    return "\n".join(lines)


def _user_triton_kernel_kwargs(kwargs: dict[str, Any], symbols: _Symbols) -> dict[str, Any]:
    """A user Triton kernel call's arguments with its kernel and constants in place of their
    indices into a table of the process: the same index names different kernels in two
    processes, and an edited kernel keeps its index."""
    kernel, code, constants = user_triton_kernel(kwargs["kernel_idx"], kwargs["constant_args_idx"])
    if code is None:
        if symbols.opaque is None:
            raise UnhashableArgument(
                f"cannot fingerprint the user Triton kernel {kernel!r}: only a triton.jit function, "
                "alone or under triton.autotune, has a hash of its code"
            )
        code = symbols.opaque(kernel)
    return {**kwargs, "kernel_idx": f"triton {code}", "constant_args_idx": {k: constants[k] for k in sorted(constants)}}


def callable_name(target: Any) -> str | None:
    """The name of a callable when that name is the callable, else None.

    Ops (``aten.mm.default``, higher-order ops) and functions reachable from their module by
    their own name (``torch._C._nn.linear``, ``operator.getitem``, ``torch.relu``, a method of a
    class) are the same object wherever the name appears. Closures (``<locals>``), bound methods
    of instances, ``functools.partial`` objects and callable instances are not: two blocks can
    hold different ones under one name.
    """
    if isinstance(target, (OpOverload, OpOverloadPacket, HigherOrderOperator)):
        return op_name(target)
    name = getattr(target, "__name__", None)
    qualname = getattr(target, "__qualname__", None)
    owner = getattr(target, "__objclass__", None)  # a method descriptor: TensorBase.add
    if owner is not None and name and getattr(owner, name, None) is target:
        return f"{owner.__module__}.{owner.__qualname__}.{name}"
    module = sys.modules.get(getattr(target, "__module__", None) or "")
    if module is None or not qualname or "<locals>" in qualname:
        return None
    if getattr(module, name or "", None) is target:
        return f"{module.__name__}.{qualname}"
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"{module.__name__}.{qualname}" if found is target else None


class _Symbols:
    """Tokens for size symbols and opaque callables, in order of first appearance."""

    def __init__(self, opaque: Callable[[Any], str] | None = None) -> None:
        self.opaque = opaque
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
    if callable(arg):
        return _target(arg, symbols)
    raise UnhashableArgument(f"cannot fingerprint argument of type {type(arg).__name__}: {arg!r}")


def _target(target: Any, symbols: _Symbols) -> str:
    """A node's target or a callable argument: its name, or the opaque token for it."""
    if isinstance(target, str):  # call_method, get_attr
        return target
    name = callable_name(target)
    if name is not None:
        return name
    if symbols.opaque is None:
        raise UnhashableArgument(
            f"cannot fingerprint callable {target!r}: no name identifies it (closure, bound method, "
            "partial or callable instance)"
        )
    return symbols.opaque(target)
