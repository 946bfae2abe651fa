"""The backends the benchmark compares, each turned into a callable from an eager model.

Every compile is lazy: the returned callable compiles on its first call, so the benchmark's
first-call time is compile + first run for all of them.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trt_subgraph._compat import aot_compile_enabled, raise_recompile_limit

BACKENDS: tuple[str, ...] = ("eager", "inductor", "reduce-overhead", "regional", "trt_subgraph", "torch_tensorrt")
# `compile:<name>` runs torch.compile(model, backend=<name>): any registered dynamo backend.
COMPILE_PREFIX = "compile:"


def check_backend(name: str) -> str:
    """Validate a backend name; returns it."""
    if name in BACKENDS or (name.startswith(COMPILE_PREFIX) and len(name) > len(COMPILE_PREFIX)):
        return name
    raise ValueError(
        f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}, or {COMPILE_PREFIX}<torch.compile backend name>"
    )


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, found generically.

    Candidates are the children of every nn.ModuleList / nn.Sequential whose children all share
    one class (e.g. `layers` of a transformer, `layer1..layer4` of a ResNet). The class with
    the most such children in total wins, and all its children are the blocks (a depth-1 stack
    gives one block); blocks nested inside another block are left out. Returns [] when there is
    no such container.
    """
    groups: dict[type, list[nn.Module]] = {}
    for mod in model.modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(mod.children())
        if children and len({type(c) for c in children}) == 1:
            groups.setdefault(type(children[0]), []).extend(children)
    if not groups:
        return []
    cls = Counter({cls: len(mods) for cls, mods in groups.items()}).most_common(1)[0][0]
    blocks = groups[cls]
    inner = {id(m) for b in blocks for m in b.modules() if m is not b}
    return [b for b in blocks if id(b) not in inner]


def prepare(
    backend: str,
    model: nn.Module,
    *,
    dtype: torch.dtype,
    trt_options: dict[str, Any],
    tt_options: dict[str, Any],
    dynamic: bool = False,
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Return (callable, info) for `backend`; info holds facts worth reporting (e.g. blocks).

    `dynamic`: every torch.compile call gets ``dynamic=True`` (symbolic sizes from the first
    compile on); otherwise torch.compile's default (static first, automatic dynamic on a
    recompile). Eager ignores it."""
    check_backend(backend)
    raise_recompile_limit(64)
    info: dict[str, Any] = {}
    dyn = True if dynamic else None
    if backend == "eager":
        return model, info
    if backend == "inductor":
        return torch.compile(model, backend="inductor", dynamic=dyn), info
    if backend == "reduce-overhead":
        return torch.compile(model, backend="inductor", mode="reduce-overhead", dynamic=dyn), info
    if backend == "regional":
        blocks = find_blocks(model)
        if not blocks:
            raise ValueError(
                "regional: found no repeated blocks (children of an nn.ModuleList or "
                "nn.Sequential that share one class)"
            )
        for block in blocks:
            block.compile(backend="inductor", dynamic=dyn)
        info["regional_blocks"] = len(blocks)
        return model, info
    if backend == "trt_subgraph":
        return torch.compile(model, backend="trt_subgraph", options=dict(trt_options), dynamic=dyn), info
    if backend == "torch_tensorrt":
        if importlib.util.find_spec("torch_tensorrt") is None:
            raise RuntimeError("torch_tensorrt is not installed (pip install 'trt_subgraph[tensorrt]')")
        import torch_tensorrt  # noqa: F401  (registers the dynamo backend)

        options = {"enabled_precisions": {dtype}, **tt_options}
        return torch.compile(model, backend="torch_tensorrt", options=options, dynamic=dyn), info
    return torch.compile(model, backend=backend[len(COMPILE_PREFIX) :], dynamic=dyn), info


def _forward(model: nn.Module, *inputs: Any) -> Any:
    """What a saved function runs: the model, passed as an argument (modules are not saved)."""
    return model(*inputs)


def saved_function(
    role: str, folder: str, model: nn.Module, trt_options: dict[str, Any]
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """(callable, info) for trt_subgraph's saved function (README, *Save and load*), lazy like
    :func:`prepare`: its first call compiles or loads.

    `role` ``"write"``: the first call compiles ahead of time (``aot_compile``, torch >= 2.9), runs
    and saves the function to `folder` (authenticated with a key file there); ``"load"``: the
    first call loads that file (`trt_subgraph.load`) and runs it, with nothing traced or split.
    Raises ValueError for another `role`; the first call raises what saving or loading raises
    (RuntimeError on torch < 2.9, which cannot save functions)."""
    import trt_subgraph

    if role not in ("write", "load"):
        raise ValueError(f"saved_function: role must be 'write' or 'load', got {role!r}")
    path, key_file = os.path.join(folder, "function.pt2"), os.path.join(folder, "key")
    loaded: list[Callable[..., Any]] = []

    def call(*inputs: Any) -> Any:
        if loaded:
            return loaded[0](*inputs)
        if role == "load":
            loaded.append(trt_subgraph.load(path, model, key_file=key_file))
            return loaded[0](*inputs)
        if not hasattr(torch.compiler, "load_compiled_function"):
            raise RuntimeError(f"saving a compiled function needs torch >= 2.9, this is {torch.__version__}")
        with aot_compile_enabled():
            compiled = torch.compile(_forward, fullgraph=True, backend="trt_subgraph", options=dict(trt_options))
            function = compiled.aot_compile(((model, *inputs), {}))
        out = function(model, *inputs)
        trt_subgraph.save(function, path, key_file=key_file)
        loaded.append(lambda *x: function(model, *x))
        return out

    return call, {}
