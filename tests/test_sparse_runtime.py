"""2:4 linears through cuSPARSELt: the graph rewrite, the decisions, the op and its compressed weights.

CPU tests pretend cuSPARSELt is available (``unavailable_reason`` patched) so the rewrite happens;
the op's CPU path is a dense reference (``F.linear``). CUDA tests run the
real kernels and are skipped without a GPU.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trt_subgraph
from trt_subgraph import _compat
from trt_subgraph.backend import _is_weight
from trt_subgraph.bench import models
from trt_subgraph.runtime import CUDAGraphForward
from trt_subgraph.sparse import cusparselt
from trt_subgraph.sparse import runtime as sr
from trt_subgraph.sparsity import analyze_weight, check, mask_2_4, prune_2_4

FP16 = dict(rtol=2e-2, atol=2e-2)
CL = torch.channels_last
OP = torch.ops.trt_subgraph.sparse_linear.default


def on_cuda(test):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@pytest.fixture(autouse=True)
def fresh_registry():
    sr.SPARSE_WEIGHTS.clear()
    sr._DECISIONS.clear()
    sr._UNMEASURED.clear()
    yield
    sr.SPARSE_WEIGHTS.clear()
    sr._DECISIONS.clear()
    sr._UNMEASURED.clear()


@pytest.fixture
def available(monkeypatch):
    """Pretend cuSPARSELt runs here, so the CPU tests see the rewrite."""
    monkeypatch.setattr(sr, "unavailable_reason", lambda device: None)


class Three(nn.Module):
    """2:4 linear with bias on a 3-D input, 2:4 linear without bias, dense linear."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.a = nn.Linear(width, 32)
        self.b = nn.Linear(32, 48, bias=False)
        self.c = nn.Linear(48, 16)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x))))


def three(dtype=torch.float16, device="cpu") -> Three:
    torch.manual_seed(0)
    model = Three().to(device, dtype).eval()
    prune_2_4(model, layers=["a", "b"])
    return model


def compile_with_rewrite(model, mode, *, cudagraphs=True, engine="eager", cache_dir=None, graphed=False):
    """torch.compile through aot_autograd with `rewrite_linears` on the inference graph, as the
    pipeline calls it. Returns (compiled model, info) with the records and the rewritten graph."""
    info = {}

    def backend(gm, example_inputs):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        flags = [_is_weight(p, x) for p, x in zip(placeholders, example_inputs)]

        def inference(aot_gm, fake_inputs):
            info["code_before"] = aot_gm.code
            info["records"] = sr.rewrite_linears(
                aot_gm, list(example_inputs), flags, mode, cudagraphs, cache_dir=cache_dir
            )
            info["gm"] = aot_gm
            if engine == "inductor":
                artifact = _compat.standalone_compile(aot_gm, fake_inputs)
                forward = lambda args: artifact(*args)  # noqa: E731
            else:
                forward = lambda args: aot_gm(*args)  # noqa: E731
            if graphed:  # as the pipeline does: a weight update re-records, recompressing it
                static = [i for i, f in enumerate(flags) if f]
                forward = info["cudagraph"] = CUDAGraphForward(forward, static)
            return boxed(forward)

        return _compat.aot_autograd(fw_compiler=inference, inference_compiler=inference)(gm, example_inputs)

    return torch.compile(model, backend=backend, dynamic=False), info


def boxed(forward):
    """aot_autograd calls compiled forwards with one list of arguments when so marked."""

    def call(args):
        return forward(args)

    call._boxed_call = True
    return call


def ops(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def by_layer(records) -> dict:
    return {r["layer"]: r for r in records}


# ---------------------------------------------------------------------------------------------
# CPU: pattern matching and decisions


def test_on_rewrites_only_2_4_half_linears_and_matches_eager(available):
    model = three()
    compiled, info = compile_with_rewrite(model, "on")
    x = torch.randn(2, 8, 64, dtype=torch.float16)
    with torch.no_grad():
        compiled(x)
        fresh = torch.randn(2, 8, 64, dtype=torch.float16)
        actual = compiled(fresh)
        expected = model.float()(fresh.float())
    torch.testing.assert_close(actual.float(), expected, **FP16)

    records = by_layer(info["records"])
    assert set(records) == {"a", "b", "c"}
    assert records["a"] == {
        "layer": "a",
        "kind": "linear",
        "shape": [32, 64],
        "M": 16,
        "eligible": True,
        "sparse": True,
        "reason": None,
        "dense_ms": None,
        "sparse_ms": None,
        "algorithm": None,
    }
    assert records["b"]["sparse"] and records["b"]["shape"] == [48, 32]
    assert not records["c"]["eligible"] and not records["c"]["sparse"]
    assert records["c"]["reason"].startswith("not 2:4 sparse")

    gm = info["gm"]
    assert ops(gm).count(OP) == 2
    assert ops(gm).count(torch.ops.aten.addmm.default) == 1  # c
    assert torch.ops.aten.mm.default not in ops(gm)  # b was the only mm
    for node in (n for n in gm.graph.nodes if n.target is OP):
        weight = node.args[1]
        assert weight.op == "placeholder"
        assert list(node.meta["nn_module_stack"].values())[-1][1] is nn.Linear
        val, n = node.meta["val"], weight.meta["val"].shape[0]
        assert val.shape == (16, n) and val.stride() == (n, 1)  # F.linear's layout
        assert node.args[3] == 0  # CPU weights are not measured: cuSPARSELt's default algorithm


@pytest.mark.parametrize("engine", ["eager", "inductor"])
def test_a_sparse_linear_at_the_output_gives_eager_strides(available, engine):
    """The op's output has eager's layout: user code may ``view`` it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 48)).half().eval()
    prune_2_4(model)
    compiled, info = compile_with_rewrite(model, "on", engine=engine)
    x = torch.randn(2, 8, 64, dtype=torch.float16)
    with torch.no_grad():
        actual, expected = compiled(x), model(x)
    assert ops(info["gm"]).count(OP) == 2
    assert actual.shape == expected.shape and actual.stride() == expected.stride()
    torch.testing.assert_close(actual.float(), model.float()(x.float()), **FP16)


def test_fp32_and_unpruned_weights_are_not_rewritten(available):
    model = three(dtype=torch.float32)
    compiled, info = compile_with_rewrite(model, "on")
    with torch.no_grad():
        compiled(torch.randn(2, 8, 64))
    records = by_layer(info["records"])
    assert [r["eligible"] for r in records.values()] == [False, False, False]
    assert "dtype float32" in records["a"]["reason"] and "not 2:4" not in records["a"]["reason"]
    assert "dtype float32" in records["c"]["reason"] and "not 2:4" in records["c"]["reason"]
    assert OP not in ops(info["gm"]) and info["gm"].code == info["code_before"]


def test_shape_cusparselt_cannot_take_is_not_eligible(available):
    torch.manual_seed(0)
    model = nn.Linear(64, 40).half()  # N = 40 is not a multiple of 16
    prune_2_4(model)
    compiled, info = compile_with_rewrite(model, "on")
    with torch.no_grad():
        compiled(torch.randn(16, 64, dtype=torch.float16))
    (record,) = info["records"]
    assert not record["eligible"] and "multiples of 16" in record["reason"]
    assert OP not in ops(info["gm"])


def test_without_cusparselt_the_graph_is_untouched():
    compiled, info = compile_with_rewrite(three(), "on")  # real availability: CPU tensors
    with torch.no_grad():
        compiled(torch.randn(2, 8, 64, dtype=torch.float16))
    records = by_layer(info["records"])
    assert records["a"]["eligible"] and records["b"]["eligible"] and not records["c"]["eligible"]
    assert not any(r["sparse"] for r in records.values())
    assert records["a"]["reason"].startswith("cuSPARSELt unavailable")
    assert info["gm"].code == info["code_before"]


def test_off_reports_eligibility_and_rewrites_nothing(available):
    compiled, info = compile_with_rewrite(three(), "off")
    with torch.no_grad():
        compiled(torch.randn(2, 8, 64, dtype=torch.float16))
    records = by_layer(info["records"])
    assert records["a"]["eligible"] and records["a"]["reason"] == "sparsity off"
    assert info["gm"].code == info["code_before"]


class Twins(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(64, 64)
        self.second = nn.Linear(64, 64)

    def forward(self, x):
        return self.second(self.first(x))


def twins() -> Twins:
    torch.manual_seed(0)
    model = Twins().half().eval()
    prune_2_4(model)
    return model


def test_auto_measures_each_shape_once_and_keeps_it_on_disk(available, monkeypatch, tmp_path):
    calls = []

    def fake_measure(m, k, n, dtype, device, bias, graphed):
        calls.append((m, k, n, dtype, bias, graphed))
        return 1.0, 0.5, 7

    monkeypatch.setattr(sr, "measure", fake_measure)
    compiled, info = compile_with_rewrite(twins(), "auto", cache_dir=tmp_path)
    with torch.no_grad():
        compiled(torch.randn(32, 64, dtype=torch.float16))
    assert calls == [(32, 64, 64, torch.float16, True, True)]  # two layers, one shape, in a CUDA graph
    assert [(r["sparse"], r["dense_ms"], r["sparse_ms"], r["algorithm"]) for r in info["records"]] == [
        (True, 1.0, 0.5, 7)
    ] * 2
    assert [n.args[3] for n in info["gm"].graph.nodes if n.target is OP] == [7, 7]  # the measured algorithm
    saved = json.loads((tmp_path / sr.DECISIONS_FILE).read_text())
    assert list(saved.values()) == [{"dense_ms": 1.0, "sparse_ms": 0.5, "algorithm": 7}]

    # A new process: nothing in memory, the file answers.
    sr._DECISIONS.clear()
    torch.compiler.reset()
    monkeypatch.setattr(sr, "measure", lambda *a: pytest.fail("measured again despite the decisions file"))
    compiled, info = compile_with_rewrite(twins(), "auto", cache_dir=tmp_path)
    with torch.no_grad():
        compiled(torch.randn(32, 64, dtype=torch.float16))
    assert all(r["sparse"] for r in info["records"])


@pytest.mark.parametrize("dense_ms", [1.04, 0.8])
def test_auto_keeps_dense_unless_sparse_is_clearly_faster(available, monkeypatch, dense_ms):
    monkeypatch.setattr(sr, "measure", lambda *a: (dense_ms, 1.0, 0))
    compiled, info = compile_with_rewrite(twins(), "auto")
    with torch.no_grad():
        compiled(torch.randn(32, 64, dtype=torch.float16))
    assert [r["sparse"] for r in info["records"]] == [False, False]
    assert info["records"][0]["reason"].startswith("measured not faster")
    assert OP not in ops(info["gm"])


def test_a_failed_measurement_keeps_the_layer_dense_and_says_why(available, monkeypatch):
    def fail(*args):
        raise RuntimeError("no cuSPARSELt algorithm runs")

    monkeypatch.setattr(sr, "measure", fail)
    compiled, info = compile_with_rewrite(twins(), "auto")
    x = torch.randn(32, 64, dtype=torch.float16)
    with torch.no_grad():
        compiled(x)
    assert [(r["sparse"], r["reason"]) for r in info["records"]] == [
        (False, "measurement failed (no cuSPARSELt algorithm runs)")
    ] * 2
    assert OP not in ops(info["gm"])


@pytest.mark.parametrize("bias", [True, False])
def test_auto_records_the_timings_of_a_bare_pruned_linear(available, monkeypatch, tmp_path, bias):
    """The model is the layer itself (module path ''): `prune_2_4` prunes it, and "auto" measures
    it and puts both times in its record (the CUDA test's contract, with a fake timer)."""
    monkeypatch.setattr(sr, "measure", lambda *args: (2.0, 1.0, 5))
    torch.manual_seed(0)
    model = nn.Linear(64, 32, bias=bias).half().eval()
    assert prune_2_4(model).pruned == ("",)
    for m, cudagraphs in [(32, True), (16, False)]:
        torch.compiler.reset()
        compiled, info = compile_with_rewrite(model, "auto", cudagraphs=cudagraphs, cache_dir=tmp_path)
        with torch.no_grad():
            x = torch.randn(m, 64, dtype=torch.float16)
            expected = F.linear(x.float(), model.weight.float(), model.bias.float() if bias else None)
            torch.testing.assert_close(compiled(x).float(), expected, **FP16)
        (record,) = info["records"]
        assert record["eligible"], record
        assert (record["dense_ms"], record["sparse_ms"], record["algorithm"], record["sparse"]) == (2.0, 1.0, 5, True)
    assert len(json.loads((tmp_path / sr.DECISIONS_FILE).read_text())) == 2


def test_a_failed_run_time_measurement_does_not_answer_for_auto(available, monkeypatch):
    """The op's per-M measurement (dynamic M) failing keeps cuSPARSELt's default for that M, and a
    later "auto" compile at that M measures rather than reading timings that do not exist."""

    def fail(*args):
        raise RuntimeError("no cuSPARSELt algorithm runs")

    monkeypatch.setattr(sr, "measure", fail)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # CPU-only torch raises
    assert sr._algorithm_for(32, 64, 64, torch.float16, torch.device("cpu"), True, True) == 0
    assert sr._algorithm_for(32, 64, 64, torch.float16, torch.device("cpu"), True, True) == 0  # not retried
    monkeypatch.setattr(sr, "measure", lambda *args: (1.0, 0.5, 7))
    compiled, info = compile_with_rewrite(twins(), "auto")
    with torch.no_grad():
        compiled(torch.randn(32, 64, dtype=torch.float16))
    assert [(r["sparse"], r["dense_ms"], r["sparse_ms"], r["algorithm"]) for r in info["records"]] == [
        (True, 1.0, 0.5, 7)
    ] * 2


@pytest.mark.parametrize(
    "entry",
    [
        {"dense_ms": None, "sparse_ms": None, "algorithm": 0},
        {"dense_ms": 1.0, "sparse_ms": 0.0, "algorithm": 0},
        {"dense_ms": 1.0, "sparse_ms": 0.5, "algorithm": True},
        {"dense_ms": "1", "sparse_ms": 0.5, "algorithm": 0},
    ],
)
def test_a_decisions_file_entry_without_measured_times_is_measured_again(available, monkeypatch, tmp_path, entry):
    calls = []
    monkeypatch.setattr(sr, "measure", lambda *args: calls.append(args) or (1.0, 0.5, 7))
    key = sr._decision_key(32, 64, 64, torch.float16, torch.device("cpu"), True, True)
    (tmp_path / sr.DECISIONS_FILE).write_text(json.dumps({key: entry}))
    compiled, info = compile_with_rewrite(twins(), "auto", cache_dir=tmp_path)
    with torch.no_grad():
        compiled(torch.randn(32, 64, dtype=torch.float16))
    assert len(calls) == 1
    assert [r["dense_ms"] for r in info["records"]] == [1.0, 1.0]
    saved = json.loads((tmp_path / sr.DECISIONS_FILE).read_text())
    assert saved[key] == {"dense_ms": 1.0, "sparse_ms": 0.5, "algorithm": 7}


@pytest.mark.parametrize("dense_ms, sparse", [(1.0, True), (0.5, False)])
def test_auto_without_cudagraphs_times_eagerly_and_keeps_that_apart(available, monkeypatch, tmp_path, dense_ms, sparse):
    """Outside a CUDA graph the op's host work counts, so its timings never stand in for graphed ones."""
    graphed = []
    monkeypatch.setattr(sr, "measure", lambda *args: graphed.append(args[-1]) or (dense_ms, 0.5, 3))
    for cudagraphs in (False, True):
        torch.compiler.reset()
        compiled, info = compile_with_rewrite(twins(), "auto", cudagraphs=cudagraphs, cache_dir=tmp_path)
        with torch.no_grad():
            compiled(torch.randn(32, 64, dtype=torch.float16))
        assert [r["sparse"] for r in info["records"]] == [sparse, sparse]
        assert (OP in ops(info["gm"])) is sparse
    assert graphed == [False, True]  # one measurement each: the first did not answer for the second
    keys = json.loads((tmp_path / sr.DECISIONS_FILE).read_text())
    assert sorted(key.endswith(" eager") for key in keys) == [False, True]
    if not sparse:
        compiled, info = compile_with_rewrite(twins(), "auto", cudagraphs=False, cache_dir=tmp_path)
        with torch.no_grad():
            compiled(torch.randn(32, 64, dtype=torch.float16))
        assert info["records"][0]["reason"] == "measured not faster (needs 1.05x, timed without CUDA graphs)"


class Flatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 32)

    def forward(self, x):  # (B, S, 64) -> (B, S*32): a view that needs F.linear's layout
        h = self.lin(x)
        return torch.relu(h).flatten(1), h.sum(-1)


def _pruned_flatten_matches_eager(**compile_options):
    """Compile a pruned `Flatten` with the rewrite on, check it against fp32 eager; the rewrite info."""
    torch.manual_seed(0)
    model = Flatten().half().eval()
    prune_2_4(model)
    compiled, info = compile_with_rewrite(model, "on", **compile_options)
    x = torch.randn(2, 8, 64, dtype=torch.float16)
    with torch.no_grad():
        actual = compiled(x)
        expected = model.float()(x.float())
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.float(), e, **FP16)
    return info


def test_views_of_a_sparse_output_need_no_copy(available):
    info = _pruned_flatten_matches_eager()
    assert ops(info["gm"]).count(OP) == 1 and torch.ops.aten.clone.default not in ops(info["gm"])


def test_inductor_compiles_the_rewritten_graph_with_the_declared_layout(available):
    """Inductor trusts the fake impl's strides: a wrong declaration gives wrong numbers here."""
    info = _pruned_flatten_matches_eager(engine="inductor")
    assert OP in ops(info["gm"])


def test_rewrite_rejects_bad_arguments():
    gm = torch.fx.symbolic_trace(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="one of"):
        sr.rewrite_linears(gm, [torch.randn(4)], [False], "sometimes", True)
    with pytest.raises(ValueError, match="one real input and one weight flag per placeholder"):
        sr.rewrite_linears(gm, [], [], "on", True)


class Convs(nn.Module):
    """Convolutions of every kind the rewrite tells apart: a 1x1 (`pw`), a 3x3 (`k3`), a depthwise
    3x3 (`dw`), a 1x1 of stride 2 (`down`), all but `dw` pruned 2:4, and an unpruned 1x1 (`dense`)."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(32, 64, 1)
        self.k3 = nn.Conv2d(64, 64, 3, padding=1)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.down = nn.Conv2d(64, 32, 1, stride=2, bias=False)
        self.dense = nn.Conv2d(32, 48, 1)

    def forward(self, x):
        return self.dense(self.down(self.dw(torch.relu(self.k3(self.pw(x))))))


def convs() -> Convs:
    torch.manual_seed(0)
    model = Convs().half().eval()
    prune_2_4(model, layers=["pw", "k3", "down"])
    return model


STAYS_DENSE = {  # layer: the reason it begins with
    "k3": "3x3 kernel: no sparse implicit-GEMM convolution without TensorRT",
    "dw": "depthwise convolution (groups=64); 3x3 kernel",
    "down": "stride (2, 2): not a plain matrix product",
    "dense": "not 2:4 sparse (384 of 384 groups of 4 hold more than 2 non-zeros)",
}


def test_1x1_convs_of_channels_last_inputs_run_as_sparse_linears_without_copies(available):
    model = convs()
    compiled, info = compile_with_rewrite(model, "on")
    with torch.no_grad():
        compiled(torch.randn(2, 32, 8, 8, dtype=torch.float16).to(memory_format=CL))
        x = torch.randn(2, 32, 8, 8, dtype=torch.float16).to(memory_format=CL)
        actual, expected = compiled(x), model(x)
        reference = model.float()(x.float())
    torch.testing.assert_close(actual.float(), reference, **FP16)
    assert actual.stride() == expected.stride()

    records = by_layer(info["records"])
    assert records["pw"] == {
        "layer": "pw",
        "kind": "conv",
        "shape": [64, 32, 1, 1],
        "M": 128,  # 2 images x 8 x 8 positions
        "eligible": True,
        "sparse": True,
        "reason": None,
        "dense_ms": None,
        "sparse_ms": None,
        "algorithm": None,
    }
    for layer, reason in STAYS_DENSE.items():
        assert records[layer]["kind"] == "conv" and not records[layer]["eligible"], layer
        assert records[layer]["reason"].startswith(reason), records[layer]["reason"]
    assert "not 2:4" not in records["k3"]["reason"]  # its weight is 2:4: only the kernel is missing

    gm = info["gm"]
    (op,) = [n for n in gm.graph.nodes if n.target is OP]
    permute = torch.ops.aten.permute.default
    assert op.args[0].target is permute and list(op.args[0].args[1]) == [0, 2, 3, 1]
    assert op.args[1].op == "placeholder" and op.args[1].meta["val"].dim() == 4  # the conv's own weight
    (back,) = op.users
    assert back.target is permute
    assert back.meta["val"].stride() == back.meta["val"].contiguous(memory_format=CL).stride()
    assert list(back.meta["nn_module_stack"].values())[-1][1] is nn.Conv2d
    copies = {torch.ops.aten.clone.default, torch.ops.aten._to_copy.default, torch.ops.aten.copy.default}
    assert not copies & set(ops(gm)) and ops(gm).count(torch.ops.aten.convolution.default) == 4


def test_inductor_compiles_a_rewritten_conv_with_channels_last_strides(available):
    """Inductor trusts the declared strides of the op and the permutes around it."""
    model = convs()
    compiled, info = compile_with_rewrite(model, "on", engine="inductor")
    x = torch.randn(2, 32, 8, 8, dtype=torch.float16).to(memory_format=CL)
    with torch.no_grad():
        actual, expected = compiled(x), model(x)
        reference = model.float()(x.float())
    assert OP in ops(info["gm"])
    torch.testing.assert_close(actual.float(), reference, **FP16)
    assert actual.stride() == expected.stride()


def test_auto_times_a_1x1_conv_against_the_convolution_itself(available, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(sr, "measure", lambda *args: calls.append(args) or (1.0, 0.5, 3))
    compiled, info = compile_with_rewrite(convs(), "auto", cache_dir=tmp_path)
    with torch.no_grad():
        compiled(torch.randn(2, 32, 8, 8, dtype=torch.float16).to(memory_format=CL))
    # M = 2 x 8 x 8 rows, K = 32, N = 64, bias, in a CUDA graph, the output's (N, H, W)
    assert calls == [(128, 32, 64, torch.float16, torch.device("cpu"), True, True, (2, 8, 8))]
    record = by_layer(info["records"])["pw"]
    assert (record["sparse"], record["dense_ms"], record["sparse_ms"], record["algorithm"]) == (True, 1.0, 0.5, 3)
    (key,) = json.loads((tmp_path / sr.DECISIONS_FILE).read_text())
    assert key.startswith("M128xK32xN64 float16 bias=1") and key.endswith(" conv 2x8x8")


@pytest.mark.parametrize("dense_ms, sparse", [(1.09, False), (1.3, True)])
def test_auto_runs_a_1x1_conv_sparse_only_where_it_pays_for_the_layout_around_it(
    available, monkeypatch, dense_ms, sparse
):
    """A linear needs 1.05x; a convolution 1.25x, which pays for the pointwise kernels around it
    that the rewrite moves to the permuted layout (`MIN_CONV_SPEEDUP`)."""
    monkeypatch.setattr(sr, "measure", lambda *args: (dense_ms, 1.0, 3))
    compiled, info = compile_with_rewrite(convs(), "auto")
    with torch.no_grad():
        compiled(torch.randn(2, 32, 8, 8, dtype=torch.float16).to(memory_format=CL))
    record = by_layer(info["records"])["pw"]
    assert record["sparse"] is sparse and (OP in ops(info["gm"])) is sparse
    if not sparse:
        assert record["reason"] == "measured not faster (needs 1.25x)"


def test_a_1x1_conv_of_a_contiguous_input_stays_dense_and_says_why(available):
    compiled, info = compile_with_rewrite(convs(), "on")
    with torch.no_grad():
        compiled(torch.randn(2, 32, 8, 8, dtype=torch.float16))
    record = by_layer(info["records"])["pw"]
    assert not record["eligible"] and record["reason"].startswith("input not channels-last")
    assert OP not in ops(info["gm"])


def test_sparsity_check_and_the_report_agree_on_which_convs_are_eligible():
    """Through the backend on CPU: the rewrite is a no-op (no cuSPARSELt) and the report says so.
    `check` applies TensorRT's rule; the report says which convolutions cuSPARSELt can take, so it
    never claims one that `check` refuses, and says why a 2:4 convolution still stays dense."""
    model = convs()
    compiled = torch.compile(
        model,
        backend="trt_subgraph",
        options={"engine": "inductor", "sparsity": "on", "memory_format": "channels_last", "cache_dir": None},
    )
    x = torch.randn(2, 32, 8, 8, dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).float(), model.float()(x.float()), **FP16)
    model.half()
    sparsity = trt_subgraph.last_report().sparsity
    records = {r["layer"]: r for r in sparsity["layers"]}
    table = {row.name: row for row in check(model)}
    assert set(records) == set(table) and {r["kind"] for r in records.values()} == {"conv"}
    assert [name for name, row in table.items() if row.eligible] == ["pw", "k3", "down"]
    assert sparsity["eligible"] == ["pw"] and sparsity["sparse"] == []
    assert records["pw"]["reason"] == "cuSPARSELt unavailable (device cpu)"
    for name, row in table.items():
        assert records[name]["eligible"] <= row.eligible, name
        if row.eligible and not records[name]["eligible"]:  # the layer's structure, not its weight
            assert records[name]["reason"].startswith(STAYS_DENSE[name])
            assert "not 2:4" not in records[name]["reason"]
    for name in ("dw", "dense"):
        assert records[name]["reason"].startswith(STAYS_DENSE[name])


# ---------------------------------------------------------------------------------------------
# CPU: the op and the registry


@pytest.mark.parametrize("shape", [(2, 5, 64), (7, 64), (0, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_op_cpu_reference_is_linear_with_the_declared_layout(shape, bias):
    x, w = torch.randn(*shape), torch.randn(32, 64)
    b = torch.randn(32) if bias else None
    y = sr.sparse_linear(x, w, b, 0)
    torch.testing.assert_close(y, F.linear(x, w, b))
    meta = sr.sparse_linear(x.to("meta"), w.to("meta"), b.to("meta") if bias else None, 0)
    assert meta.shape == y.shape and meta.stride() == y.stride()
    assert torch.library.opcheck(sr.sparse_linear, (x, w, b, 0))["test_faketensor"] == "SUCCESS"


@pytest.mark.parametrize("bias", [True, False])
def test_op_takes_a_1x1_conv_weight_and_computes_the_conv_on_channels_last_rows(bias):
    x = torch.randn(2, 64, 5, 7).to(memory_format=CL)
    w, b = torch.randn(32, 64, 1, 1), torch.randn(32) if bias else None
    y = sr.sparse_linear(x.permute(0, 2, 3, 1), w, b, 0).permute(0, 3, 1, 2)
    expected = F.conv2d(x, w, b)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert y.stride() == expected.stride()
    assert torch.library.opcheck(sr.sparse_linear, (x.permute(0, 2, 3, 1), w, b, 0))["test_faketensor"] == "SUCCESS"


def counting_registry():
    compressions = []

    def compress(w):
        compressions.append(w.data_ptr())
        return w * 2  # stands in for cuSPARSELt's packed form

    return sr.SparseWeights(compress), compressions


def test_registry_compresses_once_per_weight_value():
    registry, compressions = counting_registry()
    w = nn.Parameter(torch.randn(16, 16), requires_grad=False)
    first = registry.get(w)
    assert registry.get(w) is first and len(compressions) == 1
    assert registry.get(w.detach()) is first  # an alias of the same memory
    with torch.no_grad():
        w.mul_(0.5)
    again = registry.get(w)
    assert again is first and len(compressions) == 2  # same buffer, new contents
    torch.testing.assert_close(again, w * 2)


def test_registry_compresses_a_conv_weight_as_its_matrix_and_follows_updates():
    registry, compressions = counting_registry()
    w = nn.Parameter(torch.randn(16, 32, 1, 1), requires_grad=False)
    first = registry.get(w)
    assert first.shape == (16, 32) and len(compressions) == 1
    torch.testing.assert_close(first, w.reshape(16, 32) * 2)
    with torch.no_grad():
        w.mul_(0.5)
    assert registry.get(w) is first and len(compressions) == 2
    torch.testing.assert_close(first, w.reshape(16, 32) * 2)


def test_refresh_all_updates_in_place_and_drops_freed_weights():
    registry, compressions = counting_registry()
    keep = nn.Parameter(torch.randn(16, 16), requires_grad=False)
    gone = torch.randn(16, 16)
    buffer, _ = registry.get(keep), registry.get(gone)
    ptr = buffer.data_ptr()
    assert registry.refresh_all() is False and len(compressions) == 2  # nothing changed
    with torch.no_grad():
        keep.add_(1)
    del gone
    gc.collect()
    assert registry.refresh_all() is True  # `gone` was freed: graphs using it must re-record
    assert len(registry) == 1 and len(compressions) == 3
    assert buffer.data_ptr() == ptr
    torch.testing.assert_close(buffer, keep * 2)


def test_data_copy_is_invisible_until_a_forced_refresh():
    registry, _ = counting_registry()
    w = nn.Parameter(torch.randn(16, 16), requires_grad=False)
    buffer = registry.get(w)
    w.data.copy_(torch.ones(16, 16))  # .data has its own version counter
    registry.refresh_all()
    assert not torch.equal(buffer, w * 2)
    registry.refresh_all(force=True)
    torch.testing.assert_close(buffer, w * 2)


def test_new_address_gets_a_new_buffer():
    registry, _ = counting_registry()
    lin = nn.Linear(16, 16)
    old = registry.get(lin.weight)
    lin.weight = nn.Parameter(torch.randn(16, 16))
    new = registry.get(lin.weight)
    assert new is not old
    torch.testing.assert_close(new, lin.weight.detach() * 2)
    assert registry.refresh_all() is False  # the old source is alive and unmoved: kept
    assert len(registry) == 2


def test_discard_drops_only_that_weights_copy():
    registry, _ = counting_registry()
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    registry.get(a), registry.get(b)
    registry.discard(a[:8])  # another tensor at the same address is not the source
    assert len(registry) == 2
    registry.discard(a)
    assert len(registry) == 1 and registry.get(b) is registry.get(b)


# ---------------------------------------------------------------------------------------------
# CUDA: real kernels


def pruned_half_weight(n, k):
    w = torch.randn(n, k, device="cuda", dtype=torch.float16)
    return nn.Parameter(w * mask_2_4(w, kind="linear"), requires_grad=False)


@pytest.mark.parametrize("rows", [(4, 128), (8,), (10,), (1,)])
@pytest.mark.parametrize("bias", [True, False])
@on_cuda
def test_op_matches_dense_on_cuda(rows, bias):
    w = pruned_half_weight(256, 512)
    assert analyze_weight(w, kind="linear").eligible
    x = torch.randn(*rows, 512, device="cuda", dtype=torch.float16)
    b = torch.randn(256, device="cuda", dtype=torch.float16) if bias else None
    expected = F.linear(x, w, b)
    last = 0  # rows not a multiple of 8: the op computes densely
    if x.numel() // 512 % 8 == 0:
        last = min(cusparselt.selection(x.reshape(-1, 512), 256, 512).max_algorithm, sr.ALGORITHMS[-1])
    for algorithm in sorted({0, last}):
        y = sr.sparse_linear(x, w, b, algorithm)
        torch.testing.assert_close(y, expected, **FP16)
        assert y.stride() == expected.stride()
        column_major = x.reshape(-1, 512).t().contiguous().t()  # e.g. a transposed activation
        torch.testing.assert_close(sr.sparse_linear(column_major, w, b, algorithm), y.reshape(-1, 256), **FP16)
    meta = sr.sparse_linear(x.to("meta"), w.to("meta"), b.to("meta") if bias else None, 0)
    assert meta.stride() == expected.stride()


@on_cuda
def test_cached_plans_give_torchs_own_result_bit_for_bit():
    """Same descriptors as ``torch._cslt_sparse_mm(..., transpose_result=True)``, built once."""
    w = pruned_half_weight(256, 512)
    compressed = torch._cslt_compress(w)
    for x2 in (
        torch.randn(64, 512, device="cuda", dtype=torch.float16),
        torch.randn(512, 64, device="cuda", dtype=torch.float16).t(),
    ):
        ours = cusparselt.linear(compressed, (256, 512), x2, 0)
        assert torch.equal(ours, torch._cslt_sparse_mm(compressed, x2.t(), transpose_result=True))
        assert ours.is_contiguous()
    selection = cusparselt.selection(x2, 256, 512)
    assert set(selection.plans) == {0}  # the plan is kept; later calls reuse it
    cusparselt.linear(compressed, (256, 512), x2, 0)
    assert set(selection.plans) == {0}


@on_cuda
def test_cuda_graph_replay_sees_in_place_update_after_refresh():
    w = pruned_half_weight(256, 512)
    x = torch.randn(1024, 512, device="cuda", dtype=torch.float16)
    sr.sparse_linear(x, w, None, 0)  # compress and plan outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sr.sparse_linear(x, w, None, 0)
    with torch.no_grad():
        w.mul_(0.5)  # keeps the 2:4 pattern
    sr.SPARSE_WEIGHTS.refresh_all()
    graph.replay()
    torch.testing.assert_close(out, F.linear(x, w), **FP16)


@on_cuda
def test_inductor_in_a_cuda_graph_matches_and_follows_weight_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512)).cuda().half().eval()
    prune_2_4(model)
    compiled, info = compile_with_rewrite(model, "on", engine="inductor", graphed=True)
    x = torch.randn(8, 256, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        compiled(x)
        torch.testing.assert_close(compiled(x), model(x), **FP16)
        assert info["cudagraph"].graphs
        assert ops(info["gm"]).count(OP) == 2
        model[0].weight.mul_(0.5)  # in place: same address, replay must see it
        torch.testing.assert_close(compiled(x), model(x), **FP16)
        model[2].weight = nn.Parameter(model[2].weight * -1)  # new address: a new compressed buffer
        torch.testing.assert_close(compiled(x), model(x), **FP16)


@on_cuda
@pytest.mark.parametrize("graphed", [True, False])
def test_measure_leaves_no_compressed_copy_behind(graphed):
    before = len(sr.SPARSE_WEIGHTS)
    dense_ms, sparse_ms, algorithm = sr.measure(256, 512, 256, torch.float16, torch.device("cuda"), True, graphed)
    assert dense_ms > 0 and sparse_ms > 0 and algorithm in sr.ALGORITHMS
    assert len(sr.SPARSE_WEIGHTS) == before


@on_cuda
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0), reason="timings asserted for Hopper"
)
@pytest.mark.parametrize("cudagraphs", [True, False], ids=["in-graph", "eager"])
def test_auto_picks_sparse_for_a_large_gemm_and_dense_for_a_small_one(tmp_path, cudagraphs):
    torch.manual_seed(0)
    model = nn.Linear(2048, 5632, bias=False).cuda().half().eval()
    prune_2_4(model)
    for m, expect in [(8192, True), (512, False)]:
        torch.compiler.reset()
        compiled, info = compile_with_rewrite(model, "auto", cudagraphs=cudagraphs, cache_dir=tmp_path)
        with torch.no_grad():
            compiled(torch.randn(m, 2048, device="cuda", dtype=torch.float16))
        (record,) = info["records"]
        assert record["dense_ms"] > 0 and record["sparse_ms"] > 0
        assert record["sparse"] is expect, record
    assert len(json.loads((tmp_path / sr.DECISIONS_FILE).read_text())) == 2


@on_cuda
def test_measure_times_a_1x1_conv_against_cudnn():
    dense_ms, sparse_ms, algorithm = sr.measure(
        8192, 512, 256, torch.float16, torch.device("cuda"), True, True, image=(8, 32, 32)
    )
    assert dense_ms > 0 and sparse_ms > 0 and algorithm in sr.ALGORITHMS


@on_cuda
def test_op_runs_a_1x1_conv_through_cusparselt_like_the_dense_conv():
    w = nn.Parameter(pruned_half_weight(256, 512).reshape(256, 512, 1, 1), requires_grad=False)
    b = torch.randn(256, device="cuda", dtype=torch.float16)
    x = torch.randn(8, 512, 32, 32, device="cuda", dtype=torch.float16).to(memory_format=CL)
    expected = F.conv2d(x, w, b)
    y = sr.sparse_linear(x.permute(0, 2, 3, 1), w, b, 0).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, expected, **FP16)
    assert y.stride() == expected.stride()


@on_cuda
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_backend_runs_pruned_1x1_convs_through_cusparselt_and_follows_updates(tmp_path, mode):
    """M = 8 x 32 x 32 = 8192 rows: "auto" keeps what it measured; "on" runs both sparse."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(512, 1024, 1), nn.ReLU(), nn.Conv2d(1024, 512, 1)).cuda().half().eval()
    prune_2_4(model)
    options = {"engine": "inductor", "sparsity": mode, "memory_format": "channels_last", "cache_dir": str(tmp_path)}
    compiled = torch.compile(model, backend="trt_subgraph", options=options)
    x = torch.randn(8, 512, 32, 32, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        compiled(x)
        torch.testing.assert_close(compiled(x), model(x), **FP16)
        layers = trt_subgraph.last_report().sparsity["layers"]
        assert [(r["layer"], r["kind"], r["eligible"]) for r in layers] == [("0", "conv", True), ("2", "conv", True)]
        if mode == "on":
            assert all(r["sparse"] for r in layers), layers
        model[0].weight.mul_(0.5)  # in place: same address, the CUDA graph re-records and recompresses
        torch.testing.assert_close(compiled(x), model(x), **FP16)
        model[2].weight = nn.Parameter(model[2].weight * -1, requires_grad=False)  # new address: new buffer
        torch.testing.assert_close(compiled(x), model(x), **FP16)


@on_cuda
def test_backend_runs_pruned_decoder_sparse_and_follows_updates():
    """Through the real backend (needs the pipeline to call `rewrite_linears` and `refresh_all`)."""
    from trt_subgraph.bench import models

    model, inputs = models.build("decoder", depth=2, width=512, batch=4, seq=512, dtype=torch.float16, device="cuda")
    prune_2_4(model)
    compiled = torch.compile(
        model, backend="trt_subgraph", options={"engine": "inductor", "sparsity": "on", "cache_dir": None}
    )
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), **FP16)
        report = trt_subgraph.last_report()
        assert report.sparsity, "the report should say which linears ran sparse"
        assert any(r["sparse"] for r in report.sparsity.get("layers", []))
        lin = next(m for m in model.modules() if isinstance(m, nn.Linear))
        lin.weight.mul_(0.5)
        torch.testing.assert_close(compiled(*inputs), model(*inputs), **FP16)


def test_inductor_weight_variant_is_2_4_ness_where_cusparselt_runs(monkeypatch):
    from trt_subgraph.engines.inductor import InductorEngine

    dense = torch.randn(32, 32, dtype=torch.float16)
    pruned = dense * mask_2_4(dense, kind="linear")
    engine = InductorEngine(sparse=True)
    monkeypatch.setattr(sr, "unavailable_reason", lambda device: None)
    assert [engine.weight_variant(w) for w in (pruned, dense)] == ["2:4", "dense"]
    assert engine.weight_variant(pruned.float()) is None  # cuSPARSELt linears are fp16/bf16
    assert engine.weight_variant(torch.randn(32, dtype=torch.float16)) is None
    assert InductorEngine(sparse=False).weight_variant(pruned) is None
    # a 1x1 convolution's weight is a linear's; larger kernels never run sparse here
    assert [engine.weight_variant(w.reshape(32, 32, 1, 1)) for w in (pruned, dense)] == ["2:4", "dense"]
    assert engine.weight_variant(torch.zeros(32, 32, 3, 3, dtype=torch.float16)) is None
    monkeypatch.setattr(sr, "unavailable_reason", lambda device: "no cuSPARSELt")
    assert engine.weight_variant(pruned) is None


@pytest.mark.parametrize("mode, reason", [("on", True), ("auto", True), ("off", False)])
def test_an_engine_without_2_4_kernels_says_so_in_the_report(mode, reason):
    """The eager engine runs no sparse kernels: with sparsity asked for, the report says why
    nothing ran sparse instead of listing nothing."""
    model = twins().float()
    compiled = torch.compile(model, backend="trt_subgraph", options={"engine": "eager", "sparsity": mode})
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    summary = trt_subgraph.last_report().sparsity
    assert summary["mode"] == mode
    if reason:
        assert summary["reason"] == "the eager engine runs no 2:4 sparse kernels (inductor and tensorrt do)"
    else:
        assert "reason" not in summary


@pytest.mark.parametrize("mode, reason", [("on", True), ("off", False)])
def test_a_model_of_repeated_blocks_keeps_the_engine_reason_in_its_merged_report(mode, reason):
    """The regions path merges the reports of its regions; the reason survives the merge."""
    model, inputs = models.build("encoder", depth=2, width=16, batch=2, seq=4)
    compiled = torch.compile(model.eval(), backend="trt_subgraph", options={"engine": "eager", "sparsity": mode})
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs))
    report = trt_subgraph.last_report()
    assert report.regions["path"] == "regions"
    summary = report.sparsity
    assert summary["mode"] == mode
    if reason:
        assert summary["reason"] == "the eager engine runs no 2:4 sparse kernels (inductor and tensorrt do)"
    else:
        assert "reason" not in summary
