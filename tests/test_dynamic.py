"""Dynamic shapes: symbolic builds, one build per unique subgraph for every size, regions,
fingerprints of symbolic sizes, guards a build adds, batch padding and per-shape CUDA graphs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types

import hf_models
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trt_subgraph
from trt_subgraph import _compat, padding, symbolic
from trt_subgraph.engines.base import ACTIVATION, SYMINT
from trt_subgraph.engines.inductor import Guarded, GuardedRunner, InductorEngine
from trt_subgraph.fingerprint import fingerprint
from trt_subgraph.options import Options
from trt_subgraph.report import SubgraphRecord
from trt_subgraph.runtime import BatchPadding

TOL = {"rtol": 1e-5, "atol": 1e-5}


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(self.norm(x)))


class Net(nn.Module):
    """Repeated blocks behind a learned position table sliced to the sequence length."""

    def __init__(self, depth: int = 3, d: int = 16, max_len: int = 64) -> None:
        super().__init__()
        self.register_buffer("pos", torch.randn(1, max_len, d))
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return x


def compiled(model: nn.Module, dynamic: bool | None = None, **options) -> nn.Module:
    return torch.compile(model, backend="trt_subgraph", dynamic=dynamic, options={"engine": "inductor", **options})


def check_dynamic_report(report) -> None:
    totals = report.totals
    assert totals["fallbacks"] == 0, str(report)
    assert report.regions and report.regions["regions"] > report.regions["lowered"], str(report)
    assert totals["builds"] == totals["unique_subgraphs"] >= 2, str(report)


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic", "automatic"])
def test_dynamic_batch_builds_once_and_matches_eager(how):
    torch.manual_seed(0)
    model = Net().eval()
    fn = compiled(model, dynamic=True if how == "dynamic=True" else None)
    sizes = (2, 3, 5, 7)
    with torch.no_grad():
        for i, batch in enumerate(sizes):
            x = torch.randn(batch, 8, 16)
            if how == "mark_dynamic":
                torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(fn(x), model(x), **TOL)
            if i == 1:  # the dynamic graph exists from here on (automatic dynamic: the second size)
                reports = len(trt_subgraph.reports())
                check_dynamic_report(trt_subgraph.last_report())
    assert len(trt_subgraph.reports()) == reports  # a third and fourth size compile and build nothing
    dynamic_report = trt_subgraph.last_report()
    assert all(isinstance(s.build_s, float) for s in dynamic_report.subgraphs)
    if how == "automatic":
        assert len(trt_subgraph.reports()) == 2  # the static graph of batch 2, then the dynamic one


def test_sequence_length_slicing_of_a_position_table():
    """Field case 07: pos[:, :x.shape[1]] ties the slice to the sequence length."""
    torch.manual_seed(0)
    model = Net().eval()
    fn = compiled(model)
    with torch.no_grad():
        for length in (8, 9, 11, 12):
            x = torch.randn(2, length, 16)
            torch.testing.assert_close(fn(x), model(x), **TOL)
    reports = trt_subgraph.reports()
    assert len(reports) == 2
    check_dynamic_report(reports[-1])


@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_dynamic_benchmark_models_run_every_tensor_op_in_engines(name):
    """The automatic dynamic graph runs no node in PyTorch: size arithmetic (``s0 * 16``, the rows
    of a batch of sequences) is no tensor work, so it is no fallback op. Every block shares one
    region key, the first one too (its input comes straight from the graph's inputs)."""
    from trt_subgraph.bench import models

    model, _ = models.build(name, depth=3, width=32, seq=16, heads=2)
    fn = compiled(model, engine="eager")
    with torch.no_grad():
        for batch in (2, 3, 5):
            (ids,) = models.make_inputs(name, model, batch=batch, seq=16, seed=batch)
            torch.testing.assert_close(fn(ids), model(ids), **TOL)
    static, dynamic = trt_subgraph.reports()
    for report in (static, dynamic):
        assert report.fallback_ops == {} and report.totals["fallbacks"] == 0, str(report)
    assert dynamic.regions["regions"] == 5 and dynamic.regions["lowered"] == 3, str(dynamic)  # glue, block, glue


@pytest.mark.parametrize("dynamic", [None, True])
def test_blocks_fed_by_the_graph_inputs_share_the_region_of_the_others(dynamic):
    """Three identical blocks and nothing else: the first block's inputs are the graph's own
    (real tensors, a real batch size), the others' are traced values; one region key for all."""
    torch.manual_seed(0)
    model = nn.Sequential(*(Block() for _ in range(3))).eval()
    fn = compiled(model, dynamic=dynamic, engine="eager")
    with torch.no_grad():
        for batch in (5, 7, 9):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(fn(x), model(x), **TOL)
    report = trt_subgraph.last_report()
    assert report.regions["regions"] == 3 and report.regions["lowered"] == 1, str(report)
    assert report.totals["builds"] == report.totals["unique_subgraphs"] == 1, str(report)


def test_bert_with_dynamic_batch_and_sequence_builds_once():
    """Hugging Face BERT (small config, random weights), batch and sequence length dynamic."""
    torch.manual_seed(0)
    model = hf_models.bert().eval()
    fn = compiled(model, cache=False)
    with torch.no_grad():
        for batch, length in ((2, 8), (3, 8), (5, 11), (4, 13)):
            ids = torch.randint(3, 100, (batch, length))
            mask = torch.ones(batch, length, dtype=torch.long)
            mask[1, 5:] = 0  # the second sequence is padded
            for t in (ids, mask):
                torch._dynamo.mark_dynamic(t, 0)
                torch._dynamo.mark_dynamic(t, 1)
            expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(fn(input_ids=ids, attention_mask=mask).last_hidden_state, expected, **TOL)
    (report,) = trt_subgraph.reports()  # one graph serves every size
    check_dynamic_report(report)


def test_build_failure_warns_once_per_fingerprint(monkeypatch, caplog):
    def fail(self, sub, weights):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(InductorEngine, "build", fail)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    caplog.set_level(logging.WARNING, logger="trt_subgraph")
    with torch.no_grad():
        for depth in (2, 3):  # two Dynamo graphs (the block count is guarded) with the same pieces
            model = Net(depth).eval()
            torch.testing.assert_close(compiled(model, cache=False, build_workers=0)(x), model(x), **TOL)
    failed = [r for r in caplog.records if "failed to build" in r.getMessage()]
    fingerprints = {s.fingerprint for r in trt_subgraph.reports() for s in r.subgraphs if s.status == "fallback"}
    assert len(trt_subgraph.reports()) == 2 and len(fingerprints) >= 2
    assert len(failed) == len(fingerprints)


# ------------------------------------------------------------------ fingerprints of symbolic sizes


def _shape_env_values(hints: dict[str, int]):
    """A fake mode whose ShapeEnv holds one size symbol per name, with that hint, range 2..inf."""
    fake_mode, shape_env = _compat.fresh_shape_env()
    symbols = {}
    for name, hint in hints.items():
        sym = _compat.create_size_symbol(shape_env, name, hint, _bounds(2, sys.maxsize))
        symbols[name] = shape_env.create_symintnode(sym, hint=hint)
    return fake_mode, symbols


def _bounds(lower: int, upper: int) -> types.SimpleNamespace:
    """A value range as ``ShapeEnv.var_to_range`` holds one (lower, upper)."""
    return types.SimpleNamespace(lower=lower, upper=upper)


def _piece(fake_mode, shape: list, extra: list | None = None) -> tuple[torch.fx.GraphModule, list[str]]:
    """relu(x) (+ a SymInt input) with fake values of `shape` in ``val``."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    with fake_mode:
        x.meta["val"] = torch.empty(shape)
    kinds = [ACTIVATION]
    for value in extra or []:
        p = graph.placeholder(f"s{len(kinds)}")
        p.meta["val"] = value
        kinds.append(SYMINT)
    y = graph.call_function(torch.ops.aten.relu.default, (x,))
    y.meta["val"] = x.meta["val"]
    graph.output((y,))
    return torch.fx.GraphModule(torch.nn.Module(), graph), kinds


def test_fingerprint_covers_relations_not_names_or_hints():
    mode_a, a = _shape_env_values({"p": 3, "q": 5})
    mode_b, b = _shape_env_values({"m": 4, "n": 9})  # other names and other hints
    product_a = fingerprint(*_piece(mode_a, [a["p"] * a["q"], 4]))
    product_b = fingerprint(*_piece(mode_b, [b["m"] * b["n"], 4]))
    square = fingerprint(*_piece(mode_a, [a["p"] * a["p"], 4]))
    assert product_a == product_b
    assert product_a != square  # s0*s1 is not s0*s0
    shared = fingerprint(*_piece(mode_a, [a["p"], 4], extra=[a["p"]]))
    other = fingerprint(*_piece(mode_a, [a["p"], 4], extra=[a["q"]]))
    assert shared != other  # the SymInt input is the batch itself, or another size


def test_fingerprint_covers_ranges():
    fake_mode, shape_env = _compat.fresh_shape_env()
    wide = _compat.create_size_symbol(shape_env, "a", 4, _bounds(2, sys.maxsize))
    narrow = _compat.create_size_symbol(shape_env, "b", 4, _bounds(2, 64))
    prints = [fingerprint(*_piece(fake_mode, [shape_env.create_symintnode(sym, hint=4), 4])) for sym in (wide, narrow)]
    assert prints[0] != prints[1]


def test_detached_inputs_keep_relations_ranges_and_hints_on_their_own_shape_env():
    fake_mode, values = _shape_env_values({"p": 3, "q": 5})
    p, q = values["p"], values["q"]
    with fake_mode:
        x = torch.empty(p, q * 2, 4)
    detached = symbolic.detach([x, p * q, 7, q])  # q, an input by itself: its value is there to read
    dx, dpq, seven, dq = detached.inputs
    assert seven == 7 and dq.node.expr == next(iter(dx.shape[1].node.expr.free_symbols))
    assert dx.shape[0].node.shape_env is detached.shape_env is not p.node.shape_env
    d0, d1 = dx.shape[0].node.expr, next(iter(dx.shape[1].node.expr.free_symbols))
    assert dx.shape[1].node.expr == 2 * d1 and dpq.node.expr == d0 * d1
    assert (dx.shape[0].node.hint, dx.shape[1].node.hint, dx.shape[2]) == (3, 10, 4)
    assert detached.shape_env.var_to_range[d0].lower == 2
    assert detached.added_guards() is None  # nothing assumed yet


def test_a_size_over_a_symbol_no_input_holds_becomes_a_symbol_with_its_range():
    """Behind a strided convolution the height is (h - 1)//2 + 1 and h is no input's size: the
    compiled piece could not read h, so the expression gets a symbol of its own."""
    fake_mode, values = _shape_env_values({"b": 3, "h": 9})
    b, h = values["b"], values["h"]
    with fake_mode:
        x = torch.empty(b, 8, (h - 1) // 2 + 1, (h - 1) // 2 + 1)
        y = torch.empty(b, (h - 1) // 2 + 1)
    detached = symbolic.detach([x, y])
    dx, dy = detached.inputs
    d0, d1 = dx.shape[0].node.expr, dx.shape[2].node.expr
    assert d0.is_Symbol and d1.is_Symbol and d0 != d1
    assert dx.shape[3].node.expr == d1 and dy.shape[1].node.expr == d1  # one symbol per expression
    assert dx.stride()[1].node.expr == d1**2 and dx.shape[2].node.hint == 5  # (9 - 1)//2 + 1
    bounds = detached.shape_env.var_to_range[d1]
    assert (bounds.lower, bounds.upper) == (1, (sys.maxsize - 1) // 2 + 1)  # h in 2..maxsize
    assert set(detached.shape_env.var_to_range) == {d0, d1}  # h itself is gone


def test_dynamic_conv_blocks_behind_strided_convolutions_build_and_match_eager():
    def block(c_in, c_out, stride=1):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    torch.manual_seed(0)
    model = nn.Sequential(block(3, 8), block(8, 8), block(8, 8, 2), block(8, 8)).eval()
    fn = compiled(model, dynamic=True, build_workers=0)
    with torch.no_grad():
        for batch, height, width in [(2, 16, 16), (1, 17, 13), (3, 9, 20)]:
            x = torch.randn(batch, 3, height, width)
            torch.testing.assert_close(fn(x), model(x), rtol=1e-4, atol=1e-5)
    totals = trt_subgraph.last_report().totals
    assert totals["fallbacks"] == 0 and totals["builds"] == totals["unique_subgraphs"], totals


class UpsampledSkip(nn.Module):
    """A U-Net step: a strided convolution, and its output interpolated back to the skip's size
    (the scales are size ratios: SymFloats under dynamic shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.stem(x))
        up = F.interpolate(torch.relu(self.down(skip)), size=skip.shape[-2:], mode="nearest")
        return self.fuse(torch.cat([skip, up], 1))


def test_an_interpolation_to_a_symbolic_size_builds_and_its_artifact_is_kept(caplog):
    """The piece reads the size arithmetic that computes the scales, not the SymFloats: with
    them it failed to build (its symbols bound by no input) or, compiled anyway, could not be
    serialized."""
    torch.manual_seed(0)
    model = UpsampledSkip().eval()
    fn = compiled(model, dynamic=True, build_workers=0)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        for batch, height, width in [(2, 16, 16), (1, 17, 13), (3, 31, 8)]:
            x = torch.randn(batch, 3, height, width)
            torch.testing.assert_close(fn(x), model(x), **TOL)
    totals = trt_subgraph.last_report().totals
    assert totals["fallbacks"] == 0 and totals["builds"] + totals["disk_hits"] == totals["unique_subgraphs"], totals
    assert not [r for r in caplog.records if r.name.startswith("trt_subgraph")], caplog.text


@pytest.mark.parametrize("dynamic", [False, True])
def test_only_symbolic_builds_compile_under_cache_keys_of_their_own(dynamic, monkeypatch):
    """A static build keeps inductor's cache keys: they also key what its Triton kernels learn by
    autotuning at their first run, which a key of its own hid from every later process."""
    import torch._inductor

    tags = []
    real = torch._inductor.standalone_compile

    def recording(*args, **kwargs):
        tags.append(torch.compiler.config.cache_key_tag)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch._inductor, "standalone_compile", recording)
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        x = torch.randn(2, 12, 16)
        torch.testing.assert_close(compiled(model, dynamic=dynamic, build_workers=0)(x), model(x), **TOL)
    assert tags and all(bool(tag) == dynamic for tag in tags), tags


def test_a_symbolic_build_never_takes_another_compiles_code_from_inductors_cache():
    """Two strided convolutions without padding: the first call's sizes leave the second conv's
    output 1 high, so its piece is compiled with guards; Dynamo recompiles at a larger size and
    the same piece builds again. Inductor's own cache held the first compile's code, and a hit
    there added no guards: the second graph ran it unguarded and was wrong."""

    def block(c_in, c_out, stride=1, padding=1):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, padding, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    torch.manual_seed(0)
    model = nn.Sequential(block(3, 8, 2, 0), block(8, 8, 2, 0), block(8, 8), block(8, 8)).eval()
    fn = compiled(model, dynamic=True, build_workers=0)
    with torch.no_grad():
        for batch, height, width in [(2, 9, 20), (2, 64, 48), (2, 33, 31)]:
            x = torch.randn(batch, 3, height, width)
            torch.testing.assert_close(fn(x), model(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ guards a build adds


def test_guarded_runner_runs_pytorch_where_the_guards_fail(caplog):
    class Sub:
        fingerprint = "f" * 32
        gm = staticmethod(lambda x, n: ("pytorch", n))

    runner = GuardedRunner(Guarded(lambda x, n: ("engine", n), "L['t1'] <= 4096 and 2 <= L['t0'].size()[0]"), Sub())
    record = SubgraphRecord(fingerprint=Sub.fingerprint, nodes=1)
    runner.watch(record)
    x = torch.zeros(3, 2)
    assert runner(x, 4096) == ("engine", 4096)
    caplog.set_level(logging.WARNING, logger="trt_subgraph")
    assert runner(x, 5000) == ("pytorch", 5000) and runner(x, 6000) == ("pytorch", 6000)
    assert runner(torch.zeros(1, 2), 8) == ("pytorch", 8) and runner(x, 5000) == ("pytorch", 5000)
    assert sum("outside it" in r.getMessage() for r in caplog.records) == 1
    assert record.outside_guards == ["3x2, 5000", "3x2, 6000", "1x2, 8"]  # input sizes, each once


def test_the_report_counts_the_sizes_a_guarded_piece_ran_in_pytorch():
    """A stride-2 convolution and a ceil_mode pooling behind it: the build assumes the parity
    of the input sizes, so other sizes run in PyTorch (right, and slower); the report says so."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.pool = nn.Conv2d(4, 4, 3, stride=2), nn.AvgPool2d(3, 2, ceil_mode=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.pool(self.conv(x))) * 2

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    fn = compiled(model, dynamic=True, build_workers=0)
    with torch.no_grad():
        for height, width in [(64, 64), (71, 70), (100, 67), (57, 93), (128, 128)]:
            x = torch.randn(2, 4, height, width)
            torch.testing.assert_close(fn(x), model(x), **TOL)
    report = trt_subgraph.last_report()
    assert report.totals["fallbacks"] == 0 and report.totals["outside_guards"] > 0, report.totals
    assert "input sizes outside its guards" in str(report)


def test_a_guard_the_build_adds_is_kept_checked_and_saved(tmp_path, monkeypatch, caplog):
    """A compile that assumes more about sizes than their ranges (inductor's C++ code did, for
    reductions of at most 4096 elements, in torch 2.13 before ``cpp.simdlen`` was pinned): the
    artifact keeps the condition, also through the disk cache, and inputs outside it run the
    subgraph in PyTorch. The condition is stood in for here, so the test does not depend on
    which guards a given inductor adds."""

    class Soft(nn.Module):
        def forward(self, x):
            return torch.softmax(x * 2, -1)

    monkeypatch.setattr(symbolic.Detached, "added_guards", lambda self: "L['t0'].size()[1] <= 8")
    model = Soft()
    caplog.set_level(logging.WARNING, logger="trt_subgraph")
    for start in ("cold", "warm"):
        fn = compiled(model, dynamic=True, cache_dir=str(tmp_path), build_workers=0)  # the stand-in is ours
        with torch.no_grad():
            for length in (5, 8, 12, 30):
                x = torch.randn(2, length)
                torch.testing.assert_close(fn(x), model(x), **TOL)
        assert trt_subgraph.last_report().totals["fallbacks"] == 0
        [artifact] = _memory_artifacts()
        assert isinstance(artifact, Guarded) and artifact.guards == "L['t0'].size()[1] <= 8"
        outside = [r for r in caplog.records if "outside it" in r.getMessage()]
        assert len(outside) == 1 and "<= 8" in outside[0].getMessage()
        assert {s.status for s in trt_subgraph.last_report().subgraphs} == {"built" if start == "cold" else "disk_hit"}
        caplog.clear()
        torch.compiler.reset()  # forgets the artifacts in memory and the warnings: the disk cache stays


def _memory_artifacts() -> list:
    from trt_subgraph import build

    return list(build._MEMORY.values())


# ------------------------------------------------------------------ a second process


CHILD = r"""
import json, sys, torch, trt_subgraph
sys.path.insert(0, sys.argv[2])
from test_dynamic import Net
torch.manual_seed(0)
model = Net().eval()
fn = torch.compile(model, backend="trt_subgraph", dynamic=True,
                   options={"engine": "inductor", "cache_dir": sys.argv[1]})
errs = []
with torch.no_grad():
    for batch, length in ((2, 8), (5, 11)):
        x = torch.randn(batch, length, 16)
        errs.append((fn(x) - model(x)).abs().max().item())
r = trt_subgraph.last_report().to_dict()
print(json.dumps({"statuses": [s["status"] for s in r["subgraphs"]], "errs": errs}))
"""


def _child(cache_dir, inductor_dir) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(cache_dir), os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_second_process_loads_dynamic_artifacts_and_runs_other_sizes(tmp_path):
    cold = _child(tmp_path / "cache", tmp_path / "inductor_cold")
    warm = _child(tmp_path / "cache", tmp_path / "inductor_warm")  # nothing from inductor's own cache
    assert set(cold["statuses"]) == {"built"}
    assert set(warm["statuses"]) == {"disk_hit"}
    assert max(cold["errs"] + warm["errs"]) < 1e-5


# ------------------------------------------------------------------ padding the batch


def _aten_graph(model: nn.Module, x: torch.Tensor):
    """aot_autograd's inference graph of `model` with dim 0 of `x` dynamic, and its batch symbol."""
    captured = {}

    def inference(gm, fakes):
        captured["gm"], captured["fakes"] = gm, fakes
        return _compat.make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return _compat.aot_autograd(fw_compiler=inference, inference_compiler=inference)(gm, example_inputs)

    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(x)
    torch.compiler.reset()
    fakes = captured["fakes"]
    batch, why = padding.batch_symbols(fakes, [not symbolic.is_symbolic([f]) for f in fakes])
    assert why is None, why
    return captured["gm"], batch


class Attention(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.emb, self.norm = nn.Embedding(100, d), nn.LayerNorm(d)
        self.qkv, self.out, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.emb(ids)
        b, t, d = x.shape
        q, k, v = (
            y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in self.qkv(self.norm(x)).chunk(3, -1)
        )
        y = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return y, y[:, 0]


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.mark.parametrize(
    "model, x",
    [(Attention().eval(), torch.randint(0, 100, (3, 5))), (Conv().eval(), torch.randn(3, 3, 8, 8))],
    ids=["attention", "conv"],
)
def test_rows_that_stay_apart_may_be_padded(model, x):
    gm, batch = _aten_graph(model, x)
    assert padding.blocker(gm, batch) is None


@pytest.mark.parametrize(
    "fn, reason",
    [
        (lambda x: x - x.mean(0), "works across dim 0"),
        (lambda x: x.cumsum(0), "works across dim 0"),
        (lambda x: torch.softmax(x, 0), "works across dim 0"),
        (lambda x: x.flip(0) + 1, "not known to keep batch rows apart"),
        (lambda x: x.transpose(0, 1) * 2, "the batch is in dim 1"),
        (lambda x: x[1:] * 2, "not a multiple of the batch"),
        (lambda x: x @ x.t(), "the batch is in dim 1"),
    ],
    ids=["mean", "cumsum", "softmax", "flip", "transpose", "slice", "gram"],
)
def test_rows_that_mix_are_never_padded(fn, reason):
    gm, batch = _aten_graph(Lambda(fn), torch.randn(3, 4))
    why = padding.blocker(gm, batch)
    assert why is not None and reason in why, why


@pytest.mark.parametrize("name", ["bert", pytest.param("gpt2", marks=hf_models.ONE_GRAPH_WITH_CACHE)])
def test_transformers_with_attention_masks_may_be_padded(name):
    """Their masks index the batch with its own arange(B): row r reads row r."""
    model = hf_models.bert(num_hidden_layers=1) if name == "bert" else hf_models.gpt2(n_layer=1)
    captured = {}

    def inference(gm, fakes):
        captured["gm"], captured["fakes"] = gm, fakes
        return _compat.make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return _compat.aot_autograd(fw_compiler=inference, inference_compiler=inference)(gm, example_inputs)

    fn = torch.compile(model.eval(), backend=backend)
    with torch.no_grad():
        for batch in (2, 3):  # the second batch size makes the batch dynamic (duck-sized: ids and mask share it)
            fn(input_ids=torch.randint(3, 100, (batch, 8)), attention_mask=torch.ones(batch, 8, dtype=torch.long))
    gm, fakes = captured["gm"], captured["fakes"]
    flags = [not (isinstance(f, torch.Tensor) and symbolic.is_symbolic([f])) for f in fakes]
    outputs = [o.meta["val"] for o in gm.graph.find_nodes(op="output")[0].args[0]]
    batch, _ = padding.batch_symbols(fakes, flags)
    assert len(batch) == (2 if name == "bert" else 1)  # input_ids and attention_mask: a symbol each
    pad, why = padding.plan((2, 4, 8), fakes, flags, outputs, {batch: padding.blocker(gm, batch)})
    assert why is None and len(pad.inputs) == 2 and pad.outputs, why


def test_batch_padding_pads_with_real_rows_and_cuts_outputs_back():
    pad = BatchPadding(sizes=(1, 2, 4, 8), inputs=(0,), sizes_at=(2,), outputs=(0,))
    assert [pad.target(b) for b in (1, 3, 4, 5, 9)] == [1, 4, 4, 8, 9]
    ids, weight = torch.tensor([[3, 1], [4, 1], [5, 9]]), torch.randn(10, 2)
    args = pad.pad([ids, weight, 3], 3, 4)
    assert args[0].tolist() == [[3, 1], [4, 1], [5, 9], [5, 9]] and args[1] is weight and args[2] == 4
    out, free = torch.arange(16).view(8, 2), torch.ones(2)  # dim 0 of the output: twice the batch
    cut = pad.unpad([out, free], 3, 4)
    assert torch.equal(cut[0], out[:6]) and cut[1] is free


def test_padding_needs_the_batch_as_dim_0_of_every_activation():
    fake_mode, values = _shape_env_values({"b": 3, "t": 5})
    b, t = values["b"], values["t"]
    with fake_mode:
        x, w, y = torch.empty(b, 4), torch.empty(4, 4), torch.empty(t, 4)
    batch = frozenset([b.node.expr])
    pad, why = padding.plan((2, 4), [x, w, b], [False, True, False], [x], {batch: None})
    assert why is None and (pad.inputs, pad.sizes_at, pad.outputs) == ((0,), (2,), (0,))
    assert pad.batch_of([torch.zeros(3, 4), None, 3]) == 3 and pad.batch_of([torch.zeros(3, 4), None, 5]) is None
    assert padding.plan((2, 4), [x], [False], [x], {batch: "mean (aten.mean.dim): mixes"})[1].startswith("mean")
    with fake_mode:
        transposed = torch.empty(4, b)
    assert "no activation input" in padding.plan((2, 4), [w], [True], [w], {})[1]
    assert "output 0: the batch is in dim 1" in padding.plan((2, 4), [x], [False], [transposed], {batch: None})[1]
    both = frozenset([b.node.expr, t.node.expr])  # two inputs, a batch symbol each
    assert padding.plan((2, 4), [x, y], [False, False], [x, y], {both: None})[0].inputs == (0, 1)


def test_cudagraph_options_are_validated():
    assert Options.from_user({"cudagraph_sizes": [8, 1, 4, 4]}).cudagraph_sizes == (1, 4, 8)
    assert Options.from_user({}).cudagraph_max_shapes == 8
    assert Options.from_user({"cudagraph_sizes": list(range(1, 13))}).cudagraph_max_shapes == 12
    for bad in ([], 4, [0, 2], [True], ["8"]):
        with pytest.raises(ValueError, match="'cudagraph_sizes' must be a non-empty list of batch sizes"):
            Options.from_user({"cudagraph_sizes": bad})
    for bad in (0, 2.0, None):
        with pytest.raises(ValueError, match="'cudagraph_max_shapes' must be an int >= 1"):
            Options.from_user({"cudagraph_max_shapes": bad})


# ------------------------------------------------------------------ 2:4 with a dynamic batch


def test_sparse_on_with_a_dynamic_batch_chooses_the_algorithm_per_m(monkeypatch, caplog):
    from trt_subgraph.sparse import runtime as sr
    from trt_subgraph.sparsity import prune_2_4

    monkeypatch.setattr(sr, "unavailable_reason", lambda device: None)  # as if cuSPARSELt ran here
    model = nn.Sequential(nn.Linear(64, 32)).half().eval()
    prune_2_4(model)
    for cudagraphs, expected in ((True, sr.PER_SHAPE), (False, sr.PER_SHAPE_EAGER)):
        gm, _ = _aten_graph(model, torch.randn(16, 64, dtype=torch.half))
        fakes = [p.meta["val"] for p in gm.graph.nodes if p.op == "placeholder"]
        params = {tuple(p.shape): p for p in model.parameters()}
        real = [params.get(tuple(f.shape)) if not symbolic.is_symbolic([f]) else None for f in fakes]
        [record] = sr.rewrite_linears(gm, real, [r is not None for r in real], "on", cudagraphs)
        assert record["sparse"] and record["M"] != 16
        [op] = [n for n in gm.graph.nodes if n.target is torch.ops.trt_subgraph.sparse_linear.default]
        assert op.args[3] == expected

    measured = []

    def measure(m, k, n, dtype, device, bias, graphed):
        measured.append(m)
        return 1.0, 0.5, 5 if m == 16 else 6

    capturing = [False]
    monkeypatch.setattr(sr, "measure", measure)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    cpu = torch.device("cpu")
    assert [sr._algorithm_for(m, 64, 32, torch.half, cpu, True, True) for m in (16, 16, 32, 16)] == [5, 5, 6, 5]
    assert measured == [16, 32]  # once per M
    capturing[0] = True
    caplog.set_level(logging.WARNING, logger="trt_subgraph")
    assert sr._algorithm_for(48, 64, 32, torch.half, cpu, True, True) == 0  # no measuring inside a capture
    assert measured == [16, 32] and any("inside a CUDA graph capture" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ CUDA graphs per shape


def test_replays_key_on_activation_shapes_and_record_again_when_a_weight_changes(monkeypatch):
    """The host side of CUDA graph replays, on a CPU (a recorded graph that replays nothing): one
    graph per shape of the activations and value of the sizes; a replaced weight or one updated
    in place records again."""
    from trt_subgraph import runtime

    def forward(args):
        return [args[0] @ args[2] + args[1]]

    recorded = []

    def record(self, signature, args, addresses):
        recorded.append(signature)
        static = [(i, a.clone()) for i, a in enumerate(args) if i != 2 and isinstance(a, torch.Tensor)]
        graph = types.SimpleNamespace(replay=lambda: None)
        self.graphs[signature] = runtime._Recorded(graph, static, forward(args), addresses)
        return forward(args)

    monkeypatch.setattr(runtime.CUDAGraphForward, "_record", record)
    weight = torch.randn(16, 16)
    graphed = runtime.CUDAGraphForward(forward, static_positions=[2])
    x = torch.randn(3, 16)
    for _ in range(3):
        graphed([x, 3, weight])
    assert recorded == [((3, 16), 3)]  # the weight's shape is no part of the signature
    graphed([torch.randn(5, 16), 5, weight])
    graphed([torch.randn(5, 16), 5, weight])
    assert recorded == [((3, 16), 3), ((5, 16), 5)]
    with torch.no_grad():
        weight.mul_(2)
    graphed([x, 3, weight])
    replaced = [torch.randn(16, 16), torch.randn(16, 16)]  # both alive: two addresses
    graphed([x, 3, replaced[0]])
    graphed([x, 3, replaced[1]])
    assert recorded == [((3, 16), 3), ((5, 16), 5)] + [((3, 16), 3)] * 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_cuda_graph_per_shape_least_recently_used_dropped():
    torch.manual_seed(0)
    model = Net().cuda().eval()
    fn = compiled(model, dynamic=True, cudagraph_max_shapes=2)
    with torch.no_grad():
        for batch in (2, 2, 3, 3, 2, 4, 4, 2):
            x = torch.randn(batch, 8, 16, device="cuda")
            torch.testing.assert_close(fn(x), model(x), **TOL)
    graphed = _graphed(lambda g: g.max_shapes == 2)
    assert graphed.records == 3 and len(graphed.graphs) == 2  # 2, 3, then 4, which dropped 3
    with torch.no_grad():
        for _ in range(2):  # 3 again: called once more uncaptured, then recorded anew
            x = torch.randn(3, 8, 16, device="cuda")
            torch.testing.assert_close(fn(x), model(x), **TOL)
    assert graphed.records == 4 and len(graphed.graphs) == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["whole graph", "regions"])
def test_padding_to_cudagraph_sizes_gives_the_unpadded_outputs(name):
    torch.manual_seed(0)
    model = (Attention() if name == "whole graph" else Net()).cuda().eval()

    def inputs(batch):
        if name == "whole graph":
            return torch.randint(0, 100, (batch, 6), device="cuda")
        return torch.randn(batch, 6, 16, device="cuda")

    fn = compiled(model, dynamic=True, cudagraph_sizes=[2, 4, 8])
    with torch.no_grad():
        for batch in (3, 3, 3, 2, 4, 5, 5, 7, 8, 3, 9, 9):
            x = inputs(batch)
            got, want = fn(x), model(x)
            for g, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want))):
                assert g.shape == w.shape
                torch.testing.assert_close(g, w, **TOL)
    report = trt_subgraph.last_report()
    assert report.cudagraphs == "on (batch padded to 2, 4, 8)", report.cudagraphs
    assert report.regions["path"] == name, report.regions
    graphed = _graphed(lambda g: g.padding is not None)
    # padded to 4, 4, 4, 2, 4, 8, 8, 8, 8, 4, 9, 9: 2 ran once (uncaptured); 4, 8 and 9 were recorded
    assert graphed.records == len(graphed.graphs) == 3


def _graphed(which):
    """The live CUDAGraphForward for which `which` holds."""
    import gc

    from trt_subgraph.runtime import CUDAGraphForward

    found = [o for o in gc.get_objects() if type(o) is CUDAGraphForward and which(o)]
    assert len(found) == 1
    return found[0]
