"""Graphs as users bring them: tensor-subclass (quantized) weights, aliased inputs, errors in the
user's data, op names as torch_tensorrt users spell them, Python numbers read from tensors, and
pruning through tied or computed weights. Each is compared with eager PyTorch."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import trt_subgraph
from trt_subgraph import backend, inputs, sparsity
from trt_subgraph.engines.eager import EagerEngine
from trt_subgraph.options import Options
from trt_subgraph.runtime import PieceRunner

TIGHT = dict(rtol=1e-5, atol=1e-5)


def compiled(model, **options):
    options.setdefault("engine", "eager")
    return torch.compile(model, backend="trt_subgraph", options=options)


def warnings_of(caplog):
    return [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("trt_subgraph")
    ]


# --- tensor-subclass weights (torchao-style quantization) and aliased inputs -------------------


class Int8RowWise(torch.Tensor):
    """int8 weight with one fp32 scale per output row, flattened by tracing into its two inner
    tensors; every op sees the dequantized weight."""

    @staticmethod
    def __new__(cls, qdata, scale):
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=scale.dtype, device=qdata.device)

    def __init__(self, qdata, scale):
        self.qdata, self.scale = qdata, scale

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"Int8RowWise(shape={tuple(self.shape)})"

    def __tensor_flatten__(self):
        return ["qdata", "scale"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Int8RowWise(inner["qdata"], inner["scale"])

    @classmethod
    def quantize(cls, w):
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        return cls(torch.round(w / scale[:, None]).to(torch.int8), scale)

    def dequantize(self):
        return self.qdata.to(self.scale.dtype) * self.scale[:, None]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.detach.default:
            return Int8RowWise(args[0].qdata.detach(), args[0].scale.detach())
        plain = lambda t: t.dequantize() if isinstance(t, Int8RowWise) else t  # noqa: E731
        return func(*pytree.tree_map(plain, args), **pytree.tree_map(plain, kwargs))


class MLPBlock(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, depth=3, d=32):
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(d) for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def quantize_(module):
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight = nn.Parameter(Int8RowWise.quantize(m.weight.detach()), requires_grad=False)
    return module


def test_quantized_weights_bind_per_instance_and_share_one_build(caplog):
    torch.manual_seed(0)
    model = quantize_(Stack()).eval()
    fn = compiled(model)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="trt_subgraph"):
        x = torch.randn(4, 32)
        torch.testing.assert_close(fn(x), model(x), **TIGHT)
        report = trt_subgraph.last_report()
        # one lowered block serves all three: the int8 data and the scales are weights, per instance
        assert report.regions["path"] == "regions" and report.regions["lowered"] == 1
        assert report.totals["builds"] == 1 and report.totals["reuses"] == 2
        block = model.blocks[1].up.weight
        block.qdata.copy_(torch.randint_like(block.qdata, -127, 128))  # new weights, same compiled code
        x = torch.randn(4, 32)
        torch.testing.assert_close(fn(x), model(x), **TIGHT)
    assert warnings_of(caplog) == []


def test_quantized_inner_tensors_are_the_pieces_weights():
    torch.manual_seed(0)
    model = quantize_(Stack(depth=2)).eval()
    captured = trt_subgraph.capture(model, torch.randn(4, 32))
    (unit,) = [u for u in captured.unique if len(u.instance_weights) == 2]
    for instance, block in zip(unit.instance_weights, model.blocks):
        held = {id(t) for t in instance}
        assert {id(block.up.weight.qdata), id(block.up.weight.scale), id(block.down.weight.qdata)} <= held


def test_quantized_and_plain_blocks_never_share_code():
    torch.manual_seed(0)
    model = Stack().eval()
    quantize_(model.blocks[0])
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(model)(x), model(x), **TIGHT)
    assert trt_subgraph.last_report().regions["lowered"] == 2


def test_quantized_weights_on_the_whole_graph_path():
    torch.manual_seed(0)
    model = quantize_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(model)(x), model(x), **TIGHT)
    report = trt_subgraph.last_report()
    assert report.regions["path"] == "whole graph" and report.totals["fallbacks"] == 0


@pytest.mark.parametrize("engine", ["eager", "inductor"])
def test_quantized_weights_with_each_engine(engine):
    torch.manual_seed(0)
    model = quantize_(Stack(depth=2)).eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(model, engine=engine, cache_dir=None)(x), model(x), **TIGHT)
    assert trt_subgraph.last_report().totals["fallbacks"] == 0


class ViewsBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, a, b):
        a.mul_(0.5)
        return torch.tanh(self.fc(b)) + a


class ViewsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(ViewsBlock() for _ in range(3))

    def forward(self, a, b):
        out = 0
        for blk in self.blocks:
            out = out + blk(a, b)
        return out


@pytest.mark.parametrize("engine", ["eager", "inductor"])
def test_overlapping_views_mutated_in_place_match_eager(engine):
    torch.manual_seed(0)
    model = ViewsNet().eval()
    fn = compiled(model, engine=engine, cache_dir=None)
    with torch.no_grad():
        for _ in range(2):  # the second call runs the compiled code again on new views
            base = torch.randn(6, 8)
            expected_base = base.clone()
            expected = model(expected_base[0:4], expected_base[2:6])
            torch.testing.assert_close(fn(base[0:4], base[2:6]), expected, **TIGHT)
            torch.testing.assert_close(base, expected_base, **TIGHT)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, a, b):
        for blk in self.blocks:
            a = blk(a) * b
        return a


def test_one_tensor_passed_twice():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(model)(x, x), model(x, x), **TIGHT)


def test_without_descriptors_inputs_match_by_position_or_count_as_activations(monkeypatch):
    """torch 2.8's aot_autograd describes no placeholder: positions are trusted only where every
    placeholder agrees with its input; a quantized model then runs with all inputs as activations."""
    monkeypatch.setattr(inputs, "has_aot_input_descriptors", lambda gm: False)
    torch.manual_seed(0)
    for model in (Stack(depth=2).eval(), quantize_(Stack(depth=2)).eval()):
        torch.compiler.reset()
        x = torch.randn(4, 32)
        with torch.no_grad():
            torch.testing.assert_close(compiled(model)(x), model(x), **TIGHT)


def sources_of(f, *real):
    """What `inputs.input_sources` says of aot_autograd's graph of `f` called with `real`."""
    from trt_subgraph._compat import aot_autograd

    seen = []

    def compiler(gm, example_inputs):
        seen.append(inputs.input_sources(gm, real))
        return gm.forward

    with torch.no_grad():
        torch.compile(f, backend=aot_autograd(fw_compiler=compiler, inference_compiler=compiler))(*real)
    (sources,) = seen
    return sources


def test_input_sources_follow_aot_autograds_descriptors():
    weight = Int8RowWise.quantize(torch.randn(8, 8))
    x = torch.randn(4, 8)
    sources = sources_of(lambda x, w: torch.nn.functional.linear(x, w), x, weight)
    assert sources == [inputs.InputSource(0), inputs.InputSource(1, ("qdata",)), inputs.InputSource(1, ("scale",))]
    assert sources[1].value([x, weight]) is weight.qdata

    def mutate_views(a, b, w):
        a.mul_(2)
        return torch.nn.functional.linear(b, w) + a

    base, w = torch.randn(6, 8), torch.randn(8, 8)
    sources = sources_of(mutate_views, base[0:4], base[2:6], w)
    assert sources == [None, inputs.InputSource(2)]  # the base aot_autograd made of the two views, w


# --- errors in the user's data are not engine faults ------------------------------------------

VOCAB = 10


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2))

    def forward(self, ids):
        x = self.emb(ids) * 2
        for layer in self.layers:
            x = layer(x)
        return x


class StrictEngine(EagerEngine):
    """An engine that rejects out-of-range indices with its own error type, as a compiled kernel
    would (a device assert), and otherwise runs the subgraph."""

    name = "strict"

    def bind(self, artifact, sub):
        def run(*args):
            if any(isinstance(a, torch.Tensor) and not a.is_floating_point() and (a >= VOCAB).any() for a in args):
                raise RuntimeError("engine: index out of bounds")
            return sub.gm(*args)

        return run


@pytest.fixture
def engine_pieces(monkeypatch):
    """Every engine piece created while the test runs."""
    created = []
    init = PieceRunner.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(PieceRunner, "__init__", record)
    return created


@pytest.mark.parametrize("engine", ["strict", "inductor"])
def test_bad_token_raises_like_eager_and_the_engine_stays(engine, monkeypatch, caplog, engine_pieces):
    if engine == "strict":
        monkeypatch.setattr(trt_subgraph.engines, "engine_class", lambda name: StrictEngine)
    torch.manual_seed(0)
    model = Embedder().eval()
    good = torch.randint(0, VOCAB, (2, 5))
    bad = good.clone()
    bad[0, 0] = VOCAB + 2
    fn = compiled(model, engine="eager" if engine == "strict" else engine, cache_dir=None)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        torch.testing.assert_close(fn(good), model(good), **TIGHT)
        with pytest.raises(IndexError) as eager_error:
            model(bad)
        with pytest.raises(IndexError) as compiled_error:
            fn(bad)
        assert str(compiled_error.value) == str(eager_error.value)
        good = torch.randint(0, VOCAB, (2, 5))
        torch.testing.assert_close(fn(good), model(good), **TIGHT)
    assert warnings_of(caplog) == []
    assert trt_subgraph.last_report().totals["demotions"] == 0
    assert engine_pieces and all(p.runner is not p.canonical for p in engine_pieces)


def test_an_engine_fault_demotes_the_piece_and_the_report_shows_it(monkeypatch, caplog):
    calls = []

    def bind(self, artifact, sub):
        def run(*args):
            calls.append(1)
            raise RuntimeError("engine crashed")

        return run

    monkeypatch.setattr(EagerEngine, "bind", bind)
    torch.manual_seed(0)
    model = Stack(depth=2).eval()
    fn = compiled(model)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        for _ in range(2):
            x = torch.randn(4, 32)
            torch.testing.assert_close(fn(x), model(x), **TIGHT)
    report = trt_subgraph.last_report()
    assert report.totals["demotions"] >= 1 and report.totals["fallbacks"] == 0
    assert "engine crashed" in report.subgraphs[0].demotions[0]
    assert "demoted at run time" in str(report)
    assert any("engine crashed" in m and "PyTorch from now on" in m for m in warnings_of(caplog))
    calls_after_first = len(calls)
    with torch.no_grad():
        fn(torch.randn(4, 32))
    assert len(calls) == calls_after_first  # demoted for good: the engine is not tried again


# --- torch_executed_ops: the spellings users write ---------------------------------------------


class GeluStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize(
    "spelling",
    [
        "aten.gelu",
        "aten.gelu.default",
        "torch.ops.aten.gelu.default",
        "torch.ops.aten.gelu",
        "aten::gelu",
        torch.ops.aten.gelu.default,
        torch.ops.aten.gelu,
    ],
    ids=str,
)
def test_torch_executed_ops_spellings_keep_the_op_in_pytorch(spelling):
    torch.manual_seed(0)
    model = GeluStack().eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(model, torch_executed_ops=[spelling])(x), model(x), **TIGHT)
    report = trt_subgraph.last_report()
    assert report.fallback_ops == {"aten.gelu.default": 2}
    assert report.torch_executed == [
        {"layer": "layers.0.1", "op": "aten.gelu.default"},
        {"layer": "layers.1.1", "op": "aten.gelu.default"},
    ]
    assert "kept in PyTorch by torch_executed_ops: layers.0.1 aten.gelu.default" in str(report)


def test_an_op_that_tracing_decomposes_keeps_what_it_becomes_in_pytorch(caplog):
    torch.manual_seed(0)
    model = GeluStack().eval()
    x = torch.randn(2, 8)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="trt_subgraph"):
        torch.testing.assert_close(compiled(model, torch_executed_ops={"aten.linear"})(x), model(x), **TIGHT)
    report = trt_subgraph.last_report()
    kept = {(n["layer"], n["op"]) for n in report.torch_executed}
    assert ("layers.0.0", "aten.addmm.default") in kept and ("layers.1.0", "aten.addmm.default") in kept
    assert all(layer.endswith(".0") for layer, _ in kept)  # the gelus still run in the engine
    assert "aten.gelu.default" not in report.fallback_ops
    assert "decomposes" in caplog.text and warnings_of(caplog) == []


def test_a_decomposed_op_warns_where_torch_cannot_carry_the_mark(monkeypatch, caplog):
    monkeypatch.setattr(backend, "custom_meta_reaches_aten_nodes", lambda: False)
    model = GeluStack().eval()
    x = torch.randn(2, 8)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        torch.testing.assert_close(compiled(model, torch_executed_ops={"aten.linear"})(x), model(x), **TIGHT)
    assert any("aten.linear" in m and "never reaches the engine" in m for m in warnings_of(caplog))


@pytest.mark.parametrize(
    "ops, message",
    [
        ({"aten.gelu.defualt"}, "aten.gelu has no overload 'defualt'"),
        ({"aten.gelux"}, "no op aten.gelux is registered"),
        ({"torch.nn.functional.gelu"}, "is not an op name"),
        ({"gelu"}, "is not an op name"),
        ({3}, "holds 3"),
        ("aten.gelu", "must be a collection"),
        (torch.ops.aten.gelu, "must be a collection"),
    ],
)
def test_torch_executed_ops_that_name_no_op_raise(ops, message):
    with pytest.raises(ValueError, match="torch_executed_ops") as info:
        Options.from_user({"torch_executed_ops": ops})
    assert message in str(info.value)


def test_torch_executed_ops_none_is_empty_and_options_must_be_a_dict():
    assert Options.from_user({"torch_executed_ops": None}).torch_executed_ops == frozenset()
    with pytest.raises(ValueError, match="options must be a dict such as"):
        Options.from_user("engine=eager")
    with pytest.raises(ValueError, match="options must be a dict"):
        Options.from_user([("engine", "eager")])


# --- Python numbers read from tensors ----------------------------------------------------------


class ScaledBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x, scale):
        return x + self.fc(self.norm(x)) * scale


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(ScaledBlock() for _ in range(3))

    def forward(self, x, scale):
        for b in self.blocks:
            x = b(x, scale)
        return x


def test_a_float_argument_that_changes_takes_the_whole_graph_quietly(caplog):
    torch.manual_seed(0)
    model = ScaledNet().eval()
    fn = compiled(model)
    x = torch.randn(4, 16)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="trt_subgraph"):
        for scale in (0.5, 0.25, 1.5, -2.0):
            torch.testing.assert_close(fn(x, scale), model(x, scale), **TIGHT)
    assert warnings_of(caplog) == []
    report = trt_subgraph.last_report()
    assert report.regions["path"] == "whole graph"
    assert "Python number read from a tensor" in report.regions["reason"]
    assert "lowering the whole graph (Python number read from a tensor" in caplog.text
    assert report.totals["fallbacks"] == 0 and report.totals["instances"] >= 3


class DataDependentBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(x) * x.abs().max().item()


def test_item_of_an_activation_in_every_block(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(*[DataDependentBlock() for _ in range(3)]).eval()
    fn = compiled(model)
    with (
        torch._dynamo.config.patch(capture_scalar_outputs=True),  # .item() in the graph, no graph break
        torch.no_grad(),
        caplog.at_level(logging.WARNING, logger="trt_subgraph"),
    ):
        for _ in range(2):
            x = torch.randn(4, 16)
            torch.testing.assert_close(fn(x), model(x), **TIGHT)
    assert warnings_of(caplog) == []
    assert "Python number read from a tensor" in trt_subgraph.last_report().regions["reason"]


# --- pruning through tied and computed weights -------------------------------------------------


class TiedLM(nn.Module):
    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.mlp(self.embed(ids)))


def test_prune_skips_a_head_tied_to_the_embedding(caplog):
    torch.manual_seed(0)
    model = TiedLM()
    table = model.embed.weight.detach().clone()
    row = {r.name: r for r in sparsity.check(model)}["head"]
    assert row.shared_with == ("embed.weight",) and "weight shared with embed.weight" in str(sparsity.check(model))
    with caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        report = sparsity.prune_2_4(model)
    torch.testing.assert_close(model.embed.weight, table, rtol=0, atol=0)
    assert report.pruned == ("mlp.0", "mlp.2")
    assert "embed.weight" in report.skipped["head"] and "tied" in report.skipped["head"]
    assert "head" in caplog.text and "embed.weight" in caplog.text


def test_layers_sharing_one_weight_are_pruned_with_one_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    model[2].weight = model[0].weight
    report = sparsity.prune_2_4(model)
    assert report.pruned == ("0", "2") and not report.skipped
    assert all(r.pattern_ok for r in report.table)
    assert (model[0].weight != 0).sum().item() == 16 * 16 // 2


def test_a_weight_shared_with_a_layer_left_out_is_skipped():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    model[2].weight = model[0].weight
    before = model[0].weight.detach().clone()
    report = sparsity.prune_2_4(model, layers=["2"])
    assert report.pruned == () and "0.weight" in report.skipped["2"]
    torch.testing.assert_close(model[0].weight, before, rtol=0, atol=0)


def test_views_of_one_tensor_count_as_shared():
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(16, 8))
    fused = nn.Parameter(torch.randn(16, 16))
    model.register_parameter("fused", fused)
    model[0].weight = nn.Parameter(fused.data[:8])  # a view of the fused weight (a split qkv)
    report = sparsity.prune_2_4(model)
    assert "fused" in report.skipped["0"] and report.pruned == ("1",)


def test_computed_weights_are_skipped():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based weight_norm still in use
        old_style = torch.nn.utils.weight_norm(nn.Linear(16, 16))
    model = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(16, 16)), old_style, nn.Linear(16, 16))
    x = torch.randn(3, 16)
    expected_0 = model[0](x).detach()
    assert [r.computed for r in sparsity.check(model)] == [True, True, False]
    report = sparsity.prune_2_4(model)
    assert report.pruned == ("2",)
    assert all("parametrization" in report.skipped[name] for name in ("0", "1"))
    torch.testing.assert_close(model[0](x), expected_0, **TIGHT)


def test_a_layer_still_not_2_4_after_pruning_is_listed_as_skipped():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # nan * 0 stays nan: the group keeps 3 non-zeros
    report = sparsity.prune_2_4(model)
    assert report.pruned == ("1",)
    assert report.skipped["0"].startswith("still not 2:4 after pruning")


# --- compute inside higher-order ops ------------------------------------------------------------


class CountingBlock(nn.Module):
    """A ``nested_compile_region`` body that updates a buffer in place."""

    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.register_buffer("calls", torch.zeros(d))

    @torch.compiler.nested_compile_region
    def body(self, x):
        self.calls.add_(1)
        return torch.relu(self.fc(x)) + self.calls

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("engine", ["eager", "inductor"])
def test_marked_blocks_that_write_a_buffer_run_in_the_engine(engine):
    torch.manual_seed(0)
    model = nn.Sequential(*[CountingBlock() for _ in range(3)]).eval()
    reference = copy.deepcopy(model)
    fn = compiled(model, engine=engine, cache_dir=None)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 8)
            torch.testing.assert_close(fn(x), reference(x), **TIGHT)
            for got, expected in zip(model.buffers(), reference.buffers()):
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
    report = trt_subgraph.last_report()
    assert report.block_method == "invoke_subgraph" and report.regions["lowered"] == 1
    assert (report.totals["builds"], report.totals["reuses"]) == (1, 2)
    assert report.fallback_ops == {} and report.totals["fallbacks"] == 0


class CondBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc, self.g = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: torch.relu(self.fc(x)), lambda x: torch.tanh(self.g(x)), (x,))


@pytest.mark.parametrize("engine", ["eager", "inductor"])
def test_cond_branches_run_in_the_engine_with_each_blocks_weights(engine, engine_pieces):
    torch.manual_seed(0)
    model = nn.Sequential(*[CondBlock() for _ in range(3)]).eval()
    fn = compiled(model, engine=engine, cache_dir=None)
    with torch.no_grad():
        for sign in (1, -1, 1):  # both branches, then the first again
            x = sign * (torch.rand(2, 8) + 0.1)
            torch.testing.assert_close(fn(x), model(x), **TIGHT)
    report = trt_subgraph.last_report()
    # per block: the predicate, the relu branch and the tanh branch; one build each, reused twice
    assert (report.totals["builds"], report.totals["reuses"]) == (3, 6)
    assert report.fallback_ops == {"torch.ops.higher_order.cond": 3} and report.totals["fallbacks"] == 0
    assert len(engine_pieces) == 9


@pytest.mark.skipif(not hasattr(torch.compiler, "load_compiled_function"), reason="torch without aot_compile")
def test_a_plan_with_pieces_inside_cond_branches_is_not_saved(tmp_path):
    import torch._dynamo.config as dynamo_config

    model = nn.Sequential(*[CondBlock() for _ in range(2)]).eval()

    def forward(model, x):
        return model(x)

    with dynamo_config.patch(enable_aot_compile=True), torch.no_grad():
        fn = torch.compile(forward, fullgraph=True, backend="trt_subgraph", options={"engine": "eager"})
        fn = fn.aot_compile(((model, torch.randn(2, 8)), {}))
        with pytest.raises(RuntimeError, match=r"torch\.cond branches"):
            trt_subgraph.save(fn, tmp_path / "plan.bin")
