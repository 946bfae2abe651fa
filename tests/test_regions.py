"""Region-by-region lowering: one aot_autograd trace per unique region, same answers as eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trt_subgraph
from trt_subgraph import backend, engines, regions
from trt_subgraph.bench import models
from trt_subgraph.engines.eager import EagerEngine
from trt_subgraph.engines.inductor import InductorEngine
from trt_subgraph.sparse import runtime as sr
from trt_subgraph.sparsity import analyze_weight, mask_2_4, prune_2_4

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


def test_region_key_sees_aliasing_offsets_and_the_engines_weight_variants(monkeypatch):
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    base = torch.randn(5, 8)
    gm = _region_inputs(a, b)
    eager = EagerEngine()
    key = regions.region_key(gm, [a, b], [False, False], eager)
    assert key == regions.region_key(gm, [torch.randn(4, 8), torch.randn(4, 8)], [False, False], eager)
    assert key != regions.region_key(gm, [a, a], [False, False], eager)  # aliasing inputs
    assert key != regions.region_key(gm, [base[1:], b], [False, False], eager)  # storage offset

    dense = torch.randn(16, 16, dtype=torch.float16)
    pruned = dense * mask_2_4(dense, kind="linear")
    flags = [True, False]

    def differ(engine):
        return regions.region_key(gm, [dense, b], flags, engine) != regions.region_key(gm, [pruned, b], flags, engine)

    monkeypatch.setattr(sr, "unavailable_reason", lambda device: None)  # as if cuSPARSELt ran here
    assert differ(InductorEngine(sparse=True))
    assert not differ(InductorEngine(sparse=False)) and not differ(eager)
    monkeypatch.setattr(sr, "unavailable_reason", lambda device: "no cuSPARSELt")
    assert not differ(InductorEngine(sparse=True))  # no sparse kernel can run: no reason to split


class TwoFourEagerEngine(EagerEngine):
    """The eager engine, made to depend on 2:4-ness as inductor (with cuSPARSELt) and TensorRT do."""

    def weight_variant(self, weight):
        return "2:4" if weight.dim() == 2 and analyze_weight(weight, kind="linear").pattern_ok else "dense"


@pytest.fixture
def two_four_engine(monkeypatch):
    real = engines.engine_class
    monkeypatch.setattr(engines, "engine_class", lambda name: TwoFourEagerEngine if name == "eager" else real(name))


@pytest.mark.parametrize("path", ["regions", "whole graph"])
def test_blocks_pruned_differently_never_share_code(two_four_engine, monkeypatch, path):
    if path == "whole graph":
        monkeypatch.setattr(backend, "compile_regions", lambda *args, **kwargs: None)
    model, inputs = models.build("encoder", depth=4, width=32, batch=2, seq=8)
    prune_2_4(model.layers[1])
    _, actual, expected = compile_and_run(model, inputs)
    torch.testing.assert_close(actual, expected, **TIGHT)
    report = trt_subgraph.last_report()
    if path == "regions":
        assert report.regions == {"regions": 6, "lowered": 4}
    blocks = [s for s in report.subgraphs if s.instances in (1, 3) and s.nodes > 10]
    assert sorted(s.instances for s in blocks) == [1, 3]  # the pruned block alone, the others shared
    assert blocks[0].fingerprint == blocks[1].fingerprint and blocks[0].variant != blocks[1].variant


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("vit", dict(depth=3, width=32, batch=2, image=32)),
        ("decoder", dict(depth=3, width=32, batch=2, seq=8)),
    ],
)
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


def _scale_closure(scale):
    def act(x):
        return x * scale

    return torch.compiler.allow_in_graph(act)


class _Scaler:
    """Per-instance state behind one qualified name (a bound method, or the instance itself)."""

    def __init__(self, scale):
        self.scale = scale

    def __call__(self, x):
        return x * self.scale

    def apply(self, x):
        return x * self.scale


def _scaled(x, scale):
    return x * scale


def _opaque_callables(kind, scales):
    """One opaque callable per block, all under one qualified name, each with its own state."""
    import functools

    if kind == "closure":
        return [_scale_closure(s) for s in scales]
    if kind == "bound method":
        return [torch.compiler.allow_in_graph(_Scaler(s).apply) for s in scales]
    return [torch.compiler.allow_in_graph(functools.partial(_scaled, scale=s)) for s in scales]


class _OpaqueBlock(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.act = act

    def forward(self, x):
        return self.act(self.lin(x))


@pytest.mark.parametrize("kind", ["closure", "bound method", "partial"])
def test_blocks_calling_different_opaque_callables_keep_their_own_state(kind):
    """Region keys name a callable only when the name is the callable: blocks whose opaque
    callables share a qualified name but hold different state must not share compiled code."""
    torch.manual_seed(0)
    acts = _opaque_callables(kind, (1.0, -3.0, 10.0))
    model = nn.Sequential(*[_OpaqueBlock(a) for a in acts]).eval()
    _, got, ref = compile_and_run(model, [torch.randn(4, 16)])
    torch.testing.assert_close(got, ref, **TIGHT)


def test_blocks_sharing_one_opaque_callable_still_share_a_region():
    act = _scale_closure(2.0)
    model = nn.Sequential(*[_OpaqueBlock(act) for _ in range(3)]).eval()
    _, got, ref = compile_and_run(model, [torch.randn(4, 16)])
    torch.testing.assert_close(got, ref, **TIGHT)
    assert trt_subgraph.last_report().regions["lowered"] < trt_subgraph.last_report().regions["regions"]


def test_fingerprint_names_only_callables_whose_name_is_the_callable():
    import functools
    import operator

    from trt_subgraph.fingerprint import callable_name

    assert callable_name(torch.ops.aten.mm.default) == "aten.mm.default"
    for named in (operator.getitem, torch.relu, torch.nn.functional.gelu, torch.Tensor.add, _scaled):
        assert callable_name(named) is not None, named
    for opaque in (_scale_closure(1.0), _Scaler(1.0), _Scaler(1.0).apply, functools.partial(_scaled, scale=1.0)):
        assert callable_name(opaque) is None, opaque
