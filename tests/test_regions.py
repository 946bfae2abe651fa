"""Region-by-region lowering: one aot_autograd trace per unique region, same answers as eager."""

from __future__ import annotations

import contextlib

import hf_models
import pytest
import torch
import torch.nn as nn

import trt_subgraph
from trt_subgraph import _compat, backend, engines, regions
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
    assert report.regions == {  # embeddings, 12 blocks, head
        "path": "regions",
        "reason": "repeated blocks found by nn_module_stack",
        "regions": 14,
        "lowered": 3,
        "plan": "off (disk cache off)",
    }
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
    regions = trt_subgraph.last_report().regions
    assert regions["path"] == "whole graph"
    assert "global-state or side-effect node" in regions["reason"] and "_set_grad_enabled" in regions["reason"]


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
        monkeypatch.setattr(backend, "compile_regions", lambda *args, **kwargs: (None, "forced by the test"))
    model, inputs = models.build("encoder", depth=4, width=32, batch=2, seq=8)
    prune_2_4(model.layers[1])
    _, actual, expected = compile_and_run(model, inputs)
    torch.testing.assert_close(actual, expected, **TIGHT)
    report = trt_subgraph.last_report()
    assert report.regions["path"] == path
    if path == "regions":
        assert (report.regions["regions"], report.regions["lowered"]) == (6, 4)
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
    assert report.regions["path"] == "regions"
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
    assert report.regions["path"] == "whole graph" and "split exploded" in report.regions["reason"]
    assert report.totals["reuses"] == 2


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


# ---------------------------------------------------------------------------------------------
# Real models: global-state calls, vmap, nested_compile_region


def _hf_llama(layers=4):
    torch.manual_seed(0)
    return hf_models.llama(
        vocab_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=None,
    ).eval()


def test_hugging_face_llama_takes_the_region_path(monkeypatch):
    sizes = count_aot_traces(monkeypatch)
    model = _hf_llama()
    fn = torch.compile(model, backend="trt_subgraph", options={"engine": "eager", "cache_dir": None})
    with torch.no_grad():
        for _ in range(2):  # the second input is fresh: the compiled code is not tied to the first
            ids = torch.randint(0, 128, (2, 8))
            torch.testing.assert_close(fn(ids).last_hidden_state, model(ids).last_hidden_state, **TIGHT)
    report = trt_subgraph.last_report()
    assert report.regions["path"] == "regions", report.regions
    assert report.blocks == 4 and len(sizes) == report.regions["lowered"] < report.regions["regions"]
    assert max(s.instances for s in report.subgraphs) == 4  # one lowering serves the four layers


def test_the_llama_like_benchmark_model_takes_the_region_path():
    model, inputs = models.build("decoder", depth=4, width=32, batch=2, seq=8)
    _, actual, expected = compile_and_run(model, inputs)
    torch.testing.assert_close(actual, expected, **TIGHT)
    report = trt_subgraph.last_report()
    assert report.regions["path"] == "regions" and report.blocks == 4
    assert report.regions["lowered"] < report.regions["regions"]


class _StateBlock(nn.Module):
    """A block that runs its linear under `context()`."""

    def __init__(self, width, context):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.context = context

    def forward(self, x):
        with self.context():
            y = self.fc(x)
        return x + torch.tanh(y.float())


class _Stack(nn.Module):
    """Blocks between an input and an output projection; `around`: a context for all blocks;
    `sliced`: iterate over a slice of the ModuleList (a new ModuleList each forward)."""

    def __init__(self, block_context, depth=3, width=16, around=None, sliced=False, vmap_mask=False):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.layers = nn.ModuleList(_StateBlock(width, block_context) for _ in range(depth))
        self.out = nn.Linear(width, width)
        self.around, self.sliced, self.vmap_mask = around, sliced, vmap_mask

    def forward(self, x):
        x = self.inp(x)
        if self.vmap_mask:  # a causal mask built by vmap, as transformers 4.x builds its masks
            idx = torch.arange(x.shape[-1], device=x.device)
            mask = torch.vmap(lambda i: (idx <= i).to(x.dtype))(idx)
            x = x @ mask
        layers = self.layers[: len(self.layers)] if self.sliced else self.layers
        with self.around() if self.around else contextlib.nullcontext():
            for layer in layers:
                x = layer(x)
        return self.out(x)


def _autocast_off():
    return torch.autocast("cpu", enabled=False)


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "case",
    ["autocast off in each block", "bf16 autocast in each block", "sliced module list", "vmap in the glue"],
)
def test_global_state_that_stays_inside_a_block_takes_the_region_path(case):
    torch.manual_seed(0)
    context = _bf16 if case.startswith("bf16") else _autocast_off
    model = _Stack(context, sliced=case == "sliced module list", vmap_mask=case == "vmap in the glue").eval()
    x = torch.randn(4, 16)
    _, actual, expected = compile_and_run(model, (x,))
    # bf16 autocast: both sides round the linear's inputs to bf16; the compiled graph casts in
    # other places than eager's autocast does (8 bits of mantissa: 1e-2)
    tolerance = dict(rtol=1e-2, atol=1e-2) if case.startswith("bf16") else TIGHT
    torch.testing.assert_close(actual, expected, **tolerance)
    report = trt_subgraph.last_report()
    assert report.regions["path"] == "regions", report.regions
    assert report.regions["lowered"] < report.regions["regions"]


def test_autocast_around_every_block_takes_the_whole_graph_path_and_says_why():
    torch.manual_seed(0)
    model = _Stack(_autocast_off, around=_bf16).eval()
    x = torch.randn(4, 16)
    _, actual, expected = compile_and_run(model, (x,))
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2)  # bf16, as above
    regions = trt_subgraph.last_report().regions
    assert regions["path"] == "whole graph" and "spans blocks" in regions["reason"], regions


def test_autocast_blocks_that_change_nothing_are_removed_from_the_graph():
    def traced(enabled):
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        enter, leave = _compat.autocast_calls()
        ctx = graph.call_function(enter, ("cpu", None, enabled, None))
        y = graph.call_function(torch.relu, (x,))
        graph.call_function(leave, (ctx,))
        graph.output(y)
        return torch.fx.GraphModule(nn.Module(), graph)

    assert regions.remove_no_op_state(traced(False)) == 2  # autocast is off on the CPU already
    kept = traced(True)
    assert regions.remove_no_op_state(kept) == 0
    assert sum(n.op == "call_function" for n in kept.graph.nodes) == 3


@pytest.mark.skipif(not hasattr(torch.compiler, "nested_compile_region"), reason="torch without nested_compile_region")
def test_nested_compile_region_blocks_are_the_regions(monkeypatch):
    class Marked(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

        @torch.compiler.nested_compile_region
        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    class Model(nn.Module):
        def __init__(self, width=16, depth=4):
            super().__init__()
            self.inp, self.out = nn.Linear(width, width), nn.Linear(width, 3)
            self.layers = nn.ModuleList(Marked(width) for _ in range(depth))

        def forward(self, x):
            x = self.inp(x)
            for layer in self.layers:
                x = layer(x)
            return self.out(x).softmax(-1)

    sizes = count_aot_traces(monkeypatch)
    torch.manual_seed(0)
    model = Model().eval()
    _, actual, expected = compile_and_run(model, (torch.randn(4, 16),))
    torch.testing.assert_close(actual, expected, **TIGHT)
    report = trt_subgraph.last_report()
    assert report.block_method == "invoke_subgraph" and report.blocks == 4
    assert report.regions["path"] == "regions" and report.regions["regions"] == 6
    assert len(sizes) == report.regions["lowered"] == 3  # input projection, one block, head
