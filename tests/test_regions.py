"""Region-by-region lowering: one aot_autograd trace per unique region, same answers as eager."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trt_subgraph
from trt_subgraph import regions
from trt_subgraph.bench import models
from trt_subgraph.sparsity import prune_2_4

TIGHT = dict(rtol=1e-5, atol=1e-5)


def compile_and_run(model, inputs, **options):
    options = {"engine": "eager", "cache_dir": None, **options}
    fn = torch.compile(model, backend="trt_subgraph", options=options)
    with torch.no_grad():
        return fn, fn(*inputs), model(*inputs)


def count_aot_traces(monkeypatch):
    """How many graphs went through aot_autograd, and how many nodes each had."""
    sizes = []
    real = regions.aot_autograd

    def counting(**kwargs):
        compile_fn = real(**kwargs)

        def traced(gm, inputs):
            sizes.append(sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method")))
            return compile_fn(gm, inputs)

        return traced

    monkeypatch.setattr(regions, "aot_autograd", counting)
    return sizes


def test_encoder_traces_one_block_not_twelve(monkeypatch):
    sizes = count_aot_traces(monkeypatch)
    model, inputs = models.build("encoder", depth=12, width=32, batch=2, seq=8)
    _, actual, expected = compile_and_run(model, inputs)
    torch.testing.assert_close(actual, expected, **TIGHT)
    report = trt_subgraph.last_report()
    assert report.regions == {"regions": 14, "lowered": 3}  # embeddings, 12 blocks, head
    assert len(sizes) == 3
    assert report.totals["builds"] == 3 and report.totals["reuses"] == 11


def test_every_block_keeps_its_own_weights():
    model, inputs = models.build("encoder", depth=6, width=32, batch=2, seq=8)
    fn, actual, expected = compile_and_run(model, inputs)
    torch.testing.assert_close(actual, expected, **TIGHT)
    with torch.no_grad():
        for p in model.layers[4].parameters():  # a block that reuses the first block's code
            p.mul_(1.5).add_(0.1)
        torch.testing.assert_close(fn(*inputs), model(*inputs), **TIGHT)


class MutatingBlock(nn.Module):
    """Mutates its input in place: the caller sees the change (aot_autograd writes it back)."""

    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        x.mul_(0.5)
        return torch.tanh(self.fc(x)) + x


class MutatingModel(nn.Module):
    def __init__(self, width=16, depth=4):
        super().__init__()
        self.layers = nn.ModuleList(MutatingBlock(width) for _ in range(depth))

    def forward(self, x):
        saved = []
        for layer in self.layers:
            y = layer(x)
            saved.append(x)  # the mutated input, read after the block ran
            x = y
        return x + sum(s.sum() for s in saved)


def test_input_mutation_inside_a_shared_region_is_seen_by_the_caller():
    torch.manual_seed(0)
    model = MutatingModel().eval()
    x = torch.randn(4, 16)
    fn = torch.compile(model, backend="trt_subgraph", options={"engine": "eager", "cache_dir": None})
    with torch.no_grad():
        actual, expected = fn(x.clone()), model(x.clone())
    torch.testing.assert_close(actual, expected, **TIGHT)
    assert trt_subgraph.last_report().regions["lowered"] < trt_subgraph.last_report().regions["regions"]


class GradModeInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            with torch.enable_grad():
                x = torch.relu(layer(x))
        return x


def test_global_state_changes_take_the_whole_graph_path():
    torch.manual_seed(0)
    model = GradModeInside().eval()
    x = torch.randn(2, 8)
    _, actual, expected = compile_and_run(model, (x,))
    torch.testing.assert_close(actual, expected, **TIGHT)
    assert trt_subgraph.last_report().regions == {}


def _region_inputs(*inputs):
    gm = torch.fx.symbolic_trace(lambda a, b: a + b)
    for node, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs):
        node.meta["example_value"] = x
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.meta["example_value"] = inputs[0] + inputs[1]
    return gm


def test_region_key_sees_aliasing_offsets_and_2_4_weights():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    base = torch.randn(5, 8)
    gm = _region_inputs(a, b)
    key = regions.region_key(gm, [a, b], [False, False], check_sparsity=False)
    assert key == regions.region_key(gm, [torch.randn(4, 8), torch.randn(4, 8)], [False, False], False)
    assert key != regions.region_key(gm, [a, a], [False, False], False)  # aliasing inputs
    assert key != regions.region_key(gm, [base[1:], b], [False, False], False)  # storage offset
    dense, pruned = torch.randn(16, 16), torch.randn(16, 16)
    with torch.no_grad():
        layer = nn.Linear(16, 16)
        layer.weight.copy_(pruned)
        prune_2_4(layer)
        pruned = layer.weight.detach().clone()
    flags = [True, False]
    assert regions.region_key(gm, [dense, b], flags, True) != regions.region_key(gm, [pruned, b], flags, True)
    assert regions.region_key(gm, [dense, b], flags, False) == regions.region_key(gm, [pruned, b], flags, False)


def test_blocks_pruned_differently_are_not_shared():
    model, inputs = models.build("encoder", depth=4, width=32, batch=2, seq=8)
    prune_2_4(model.layers[1])
    _, actual, expected = compile_and_run(model, inputs, sparsity="on")
    torch.testing.assert_close(actual, expected, **TIGHT)
    assert trt_subgraph.last_report().regions == {"regions": 6, "lowered": 4}


@pytest.mark.parametrize("name,kwargs", [
    ("vit", dict(depth=3, width=32, batch=2, image=32)),
    ("decoder", dict(depth=3, width=32, batch=2, seq=8)),
])
def test_other_models_lower_one_block(name, kwargs):
    model, inputs = models.build(name, **kwargs)
    _, actual, expected = compile_and_run(model, inputs)
    torch.testing.assert_close(actual, expected, **TIGHT)
    report = trt_subgraph.last_report()
    assert report.regions["regions"] == 5 and report.regions["lowered"] == 3


def test_a_failure_while_splitting_falls_back_to_the_whole_graph(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("split exploded")

    monkeypatch.setattr(regions, "split_module", broken)
    model, inputs = models.build("encoder", depth=3, width=32, batch=2, seq=8)
    with caplog.at_level("WARNING", logger="trt_subgraph"):
        _, actual, expected = compile_and_run(model, inputs)
    torch.testing.assert_close(actual, expected, **TIGHT)
    assert "split exploded" in caplog.text and "lowering the whole graph" in caplog.text
    report = trt_subgraph.last_report()
    assert report.regions == {} and report.totals["reuses"] == 2
