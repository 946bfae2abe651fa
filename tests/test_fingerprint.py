"""Fingerprints: equal for identical blocks in any process, different for any structural change."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trt_subgraph
from trt_subgraph.fingerprint import describe


class Block(nn.Module):
    def __init__(self, width=8, act="relu", slope=0.1, swap=False):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act, self.slope, self.swap = act, slope, swap

    def forward(self, x):
        y = self.fc(x)
        y = F.leaky_relu(y, self.slope) if self.act == "leaky" else getattr(torch, self.act)(y)
        return y + x if self.swap else x + y


class Stack(nn.Module):
    def __init__(self, depth=3, **block):
        super().__init__()
        self.layers = nn.ModuleList([Block(**block) for _ in range(depth)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def block_fingerprints(x=None, dtype=torch.float32, **block):
    torch.manual_seed(0)
    width = block.get("width", 8)
    model = Stack(**block).eval().to(dtype)
    x = torch.randn(4, width, dtype=dtype) if x is None else x
    unique = trt_subgraph.capture(model, x).unique
    return {u.sub.fingerprint: len(u.instance_weights) for u in unique}


def the_block(fingerprints):
    (fp,) = [fp for fp, n in fingerprints.items() if n == 3]
    return fp


def test_identical_blocks_share_one_fingerprint_and_weights_stay_per_instance():
    torch.manual_seed(0)
    model = Stack().eval()
    unique = trt_subgraph.capture(model, torch.randn(4, 8)).unique
    (block,) = [u for u in unique if len(u.instance_weights) == 3]
    weights = [w for ws in block.instance_weights for w in ws]
    assert len({w.data_ptr() for w in weights}) == len(weights)
    assert block.instance_weights[1][0] is model.layers[1].fc.weight
    text = describe(block.sub.gm, block.sub.input_kinds)
    assert "layers" not in text and "fc" not in text, "no module paths in what is hashed"


BASE = {}
CHANGES = {
    "shape": dict(width=12),
    "dtype": dict(dtype=torch.float64),
    "op": dict(act="tanh"),
    "argument": dict(act="leaky", slope=0.2),
    "wiring": dict(swap=True),
}


def test_each_kind_of_change_changes_the_fingerprint():
    base = the_block(block_fingerprints())
    leaky = the_block(block_fingerprints(act="leaky", slope=0.1))
    seen = {"base": base, "leaky": leaky}
    for name, change in CHANGES.items():
        seen[name] = the_block(block_fingerprints(**change))
    assert len(set(seen.values())) == len(seen), seen


def test_stride_changes_the_fingerprint():
    contiguous = the_block(block_fingerprints(x=torch.randn(4, 8)))
    transposed = the_block(block_fingerprints(x=torch.randn(8, 4).t()))
    assert contiguous != transposed


def test_weight_values_do_not_change_the_fingerprint():
    first = the_block(block_fingerprints())
    torch.manual_seed(123)
    model = Stack().eval()
    other = {u.sub.fingerprint for u in trt_subgraph.capture(model, torch.randn(4, 8)).unique}
    assert first in other


SCRIPT = """
import torch, trt_subgraph, sys
sys.path.insert(0, {tests!r})
from test_fingerprint import block_fingerprints
print(sorted(block_fingerprints()))
"""


@pytest.mark.parametrize("seeds", [("0", "12345")])
def test_fingerprints_are_stable_across_processes(seeds):
    outputs = []
    for seed in seeds:
        env = dict(os.environ, PYTHONHASHSEED=seed)
        code = SCRIPT.format(tests=os.path.dirname(__file__))
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.append(result.stdout.strip().splitlines()[-1])
    assert outputs[0] == outputs[1]
    assert sorted(block_fingerprints()) == eval(outputs[0])


def _user_triton_call(kernel_idx: int, constant_args_idx: int) -> torch.fx.GraphModule:
    """An ATen graph that calls a user Triton kernel, as Dynamo records it: by indices."""
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(64)
    call = graph.call_function(
        triton_kernel_wrapper_functional,
        kwargs={
            "kernel_idx": kernel_idx,
            "constant_args_idx": constant_args_idx,
            "grid": [(4, 1, 1)],
            "tma_descriptor_metadata": {},
            "kwargs": {"x_ptr": x},
            "tensors_to_clone": ["x_ptr"],
        },
    )
    graph.output(call)
    return torch.fx.GraphModule(nn.Module(), graph)


def test_a_user_triton_kernel_is_fingerprinted_by_its_code_and_constants_not_its_index(monkeypatch):
    """Dynamo names a user Triton kernel and its constants by indices into a table of the process:
    the same index holds another kernel in another process (an edited kernel keeps its index), so
    an index in the engine-cache fingerprint would load a stale engine. Stood-in kernels here:
    ``cache_key`` as ``triton.jit`` functions have it, ``configs``/``fn`` as ``triton.autotune``."""
    import types

    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    from trt_subgraph.fingerprint import UnhashableArgument, fingerprint

    def process(kernel, block=128):  # this process's table: the kernel at index 0
        monkeypatch.setattr(kernel_side_table, "id_to_kernel", {0: kernel})
        monkeypatch.setattr(kernel_side_table, "constant_args", {0: {"BLOCK": block, "n": 64}})
        return fingerprint(_user_triton_call(0, 0), ["activation"])

    def jit(code):
        return types.SimpleNamespace(cache_key=code)

    def autotuned(code, warps):
        config = types.SimpleNamespace(all_kwargs=lambda: {"BLOCK": 64, "num_warps": warps})
        return types.SimpleNamespace(configs=[config], fn=jit(code))

    original = process(jit("add_one v1"))
    assert process(jit("add_one v1")) == original  # another process, another object: the same code
    assert process(jit("add_one v2")) != original  # the kernel was edited: same index, other code
    assert process(jit("add_one v1"), block=256) != original
    assert process(autotuned("add_one v1", 4)) == process(autotuned("add_one v1", 4)) != original
    assert process(autotuned("add_one v1", 4)) != process(autotuned("add_one v1", 8))
    heuristics = types.SimpleNamespace(fn=jit("add_one v1"), values={"BLOCK": lambda args: 64})
    with pytest.raises(UnhashableArgument, match="user Triton kernel"):
        process(heuristics)  # no hash covers the Python functions it calls: the piece runs in PyTorch
    text = describe(_user_triton_call(0, 0), ["activation"], opaque=lambda k: f"<opaque {id(k):x}>")
    assert f"<opaque {id(heuristics):x}>" in text  # within one process, the object itself
