"""The TensorRT adapter's CPU-verifiable parts: canonical constant modules, payloads, refit policy."""

from __future__ import annotations

import sys
import weakref

import pytest
import torch
from torch import nn

import trt_subgraph
from trt_subgraph import engines
from trt_subgraph.engines import tensorrt as trt_engine
from trt_subgraph.engines.base import ACTIVATION
from trt_subgraph.engines.tensorrt import TensorRTArtifact, TensorRTEngine, to_constant_module
from trt_subgraph.sparsity import mask_2_4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(8, 16), nn.Linear(16, 8), nn.LayerNorm(8)
        with torch.no_grad():  # distinct LayerNorm values per block too
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.fixture(scope="module")
def stack():
    torch.manual_seed(0)
    model = Stack().eval()
    captured = trt_subgraph.capture(model, torch.randn(2, 8))
    (unit,) = [u for u in captured.unique if len(u.instance_weights) == 3]
    return model, unit


def _activation(sub, seed=0) -> torch.Tensor:
    (val,) = [v for k, v in zip(sub.input_kinds, sub.example_inputs) if k == ACTIVATION]
    return torch.randn(tuple(val.shape), generator=torch.Generator().manual_seed(seed))


def _all_inputs(sub, weights, activation):
    it = iter(weights)
    return [activation if kind == ACTIVATION else next(it) for kind in sub.input_kinds]


def test_blocks_at_different_depths_give_identical_graphs_and_weight_names(stack):
    model, unit = stack
    first = to_constant_module(unit.sub, unit.instance_weights[0])
    last = to_constant_module(unit.sub, unit.instance_weights[2])
    assert first.code == last.code
    names = [name for name, _ in first.named_buffers()]
    assert names == [name for name, _ in last.named_buffers()] == [f"w_{k}" for k in range(6)]
    for name in names:
        assert not torch.equal(getattr(first, name), getattr(last, name)), name
    # Each module holds its own block's parameters (shared storage, no copies).
    for module, block in ((first, model.blocks[0]), (last, model.blocks[2])):
        assert {b.data_ptr() for b in module.buffers()} == {p.data_ptr() for p in block.parameters()}
    for node in first.graph.nodes:
        assert set(node.meta) <= {"val"}, node.format_node()
        assert node.op != "placeholder" or node.name.startswith("in_")
    assert "blocks" not in first.code


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_canonical_module_matches_eager_block(stack, depth):
    model, unit = stack
    module = to_constant_module(unit.sub, unit.instance_weights[depth])
    x = _activation(unit.sub, seed=depth + 10)
    with torch.no_grad():
        (got,) = module(x)
        expected = model.blocks[depth](x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_exported_programs_are_identical_across_depths(stack):
    """What torch_tensorrt converts: same nodes, names, module paths and state_dict keys."""
    _, unit = stack
    x = _activation(unit.sub)
    programs = [
        torch.export.export(to_constant_module(unit.sub, w), (x,), strict=False).run_decompositions()
        for w in (unit.instance_weights[0], unit.instance_weights[2])
    ]
    gms = [p.module() for p in programs]
    assert gms[0].code == gms[1].code
    for gm in gms:
        paths = {path for n in gm.graph.nodes for path, _ in (n.meta.get("nn_module_stack") or {}).values()}
        assert paths <= {""}, paths
    assert [n.name for n in gms[0].graph.nodes] == [n.name for n in gms[1].graph.nodes]
    assert list(programs[0].state_dict) == list(programs[1].state_dict)
    assert any(not torch.equal(programs[0].state_dict[k], programs[1].state_dict[k]) for k in programs[0].state_dict)


def test_bad_weights_are_reported(stack):
    _, unit = stack
    weights = list(unit.instance_weights[0])
    with pytest.raises(ValueError, match="6 weight inputs"):
        to_constant_module(unit.sub, weights[:-1])
    with pytest.raises(ValueError, match=r"must be torch.float32 \(16, 8\)"):
        to_constant_module(unit.sub, [torch.zeros(8, 16), *weights[1:]])
    with pytest.raises(TypeError, match="must be a tensor"):
        to_constant_module(unit.sub, [1.0, *weights[1:]])


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make tensorrt and torch_tensorrt unimportable, whatever is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    trt_engine._converter_tables.cache_clear()
    yield
    trt_engine._converter_tables.cache_clear()


def test_unavailable_reason_names_what_is_missing(no_tensorrt, stack):
    reason = TensorRTEngine.unavailable_reason()
    assert "tensorrt does not import" in reason and "torch_tensorrt does not import" in reason
    assert ("no CUDA device" in reason) == (not torch.cuda.is_available())
    with pytest.raises(RuntimeError, match="torch_tensorrt does not import"):
        engines.select("tensorrt")
    _, unit = stack
    node = next(n for n in unit.sub.gm.graph.nodes if n.op == "call_function")
    assert TensorRTEngine().is_node_supported(node) is False


def test_engine_options_are_validated():
    with pytest.raises(TypeError, match="sparse"):
        TensorRTEngine(sparse="yes")
    with pytest.raises(ValueError, match="optimization_level"):
        TensorRTEngine(optimization_level=9)
    settings = TensorRTEngine(sparse=True, optimization_level=5).settings()
    assert settings["sparse"] is True and settings["optimization_level"] == 5
    assert set(settings["versions"]) == {"tensorrt", "torch_tensorrt"}


def test_weight_variant_is_2_4_ness_of_conv_and_linear_weights_when_sparse():
    conv = torch.randn(8, 8, 3, 3, dtype=torch.float16)
    pruned_conv = conv * mask_2_4(conv, kind="conv")
    linear = torch.randn(16, 16, dtype=torch.float16)
    sparse = TensorRTEngine(sparse=True)
    assert [sparse.weight_variant(w) for w in (pruned_conv, conv)] == ["2:4", "dense"]
    assert sparse.weight_variant(linear * mask_2_4(linear, kind="linear")) == "2:4"
    assert sparse.weight_variant(torch.randn(16)) is None  # a bias
    assert sparse.weight_variant(pruned_conv.float()) is None  # FP32 is never run sparse
    assert TensorRTEngine(sparse=False).weight_variant(pruned_conv) is None


def test_payload_round_trip_keeps_names_and_flags(stack):
    _, unit = stack
    engine = TensorRTEngine(sparse=True)
    artifact = TensorRTArtifact(
        plan=b"\x00plan-bytes\xff",
        input_names=["in_2"],
        output_names=["output0"],
        sparse=True,
        stripped=True,
        built_with=TensorRTArtifact.record(unit.instance_weights[0]),
    )
    loaded = engine.deserialize(engine.serialize(artifact), unit.sub)
    assert (loaded.plan, loaded.input_names, loaded.output_names, loaded.sparse, loaded.stripped) == (
        artifact.plan,
        artifact.input_names,
        artifact.output_names,
        True,
        True,
    )
    assert loaded.built_with == ()  # a loaded plan is always refit with the instance's weights
    with pytest.raises(ValueError, match="bad magic"):
        engine.deserialize(b"not a payload", unit.sub)


class _FakeRefits:
    """Replaces the TensorRT calls of a runner; the refit policy around them stays real."""

    def __init__(self, monkeypatch, fail=False):
        self.refits, self.builds, self.fail = [], [], fail
        monkeypatch.setattr(trt_engine, "_deserialize", lambda plan: ("engine", plan))
        monkeypatch.setattr(trt_engine.TensorRTRunner, "_refit", lambda runner, weights: self._refit(runner, weights))
        monkeypatch.setattr(trt_engine.TensorRTRunner, "_execute", lambda runner, acts: ("ran", runner.engine))
        monkeypatch.setattr(TensorRTEngine, "build", lambda engine, sub, weights: self._build(engine, sub, weights))

    def _refit(self, runner, weights):
        if self.fail:
            raise trt_engine.RefitError("names missing")
        self.refits.append([w.data_ptr() for w in weights])
        runner.refit_count += 1

    def _build(self, engine, sub, weights):
        self.builds.append(weights)
        return TensorRTArtifact(
            plan=b"rebuilt",
            input_names=[],
            output_names=[],
            sparse=engine.sparse,
            built_with=TensorRTArtifact.record(weights),
        )


def _artifact(weights, stripped=False):
    return TensorRTArtifact(
        plan=b"built",
        input_names=["in_2"],
        output_names=["output0"],
        sparse=False,
        stripped=stripped,
        built_with=() if stripped else TensorRTArtifact.record(weights),
    )


def test_runner_refits_only_when_address_or_version_changes(monkeypatch, stack):
    _, unit = stack
    fake = _FakeRefits(monkeypatch)
    first, last = [list(w) for w in (unit.instance_weights[0], unit.instance_weights[2])]
    x = _activation(unit.sub)
    owner = TensorRTEngine()
    runner = owner.bind(_artifact(first), unit.sub)
    runner(*_all_inputs(unit.sub, first, x))
    assert runner.refit_count == 0  # the instance the engine was built with
    other = owner.bind(_artifact(first), unit.sub)
    other(*_all_inputs(unit.sub, last, x))
    other(*_all_inputs(unit.sub, last, x))
    assert other.refit_count == 1 and fake.refits[-1] == [w.data_ptr() for w in last]
    with torch.no_grad():
        last[0].mul_(1.0)  # in place: same address, new version
    other(*_all_inputs(unit.sub, last, x))
    assert other.refit_count == 2
    replaced = [w.clone() for w in last]  # new tensors: new addresses
    other(*_all_inputs(unit.sub, replaced, x))
    assert other.refit_count == 3 and not other.rebuilt


def test_loaded_plan_is_refit_before_its_first_run(monkeypatch, stack):
    _, unit = stack
    _FakeRefits(monkeypatch)
    first = list(unit.instance_weights[0])
    runner = TensorRTEngine().bind(_artifact(first, stripped=True), unit.sub)
    runner(*_all_inputs(unit.sub, first, _activation(unit.sub)))
    assert runner.refit_count == 1


def test_reused_address_of_a_freed_build_weight_still_refits(monkeypatch, stack):
    """Memory of freed build weights can be reused at the same address with version 0."""
    _, unit = stack
    _FakeRefits(monkeypatch)
    first = list(unit.instance_weights[0])
    gone = torch.zeros(1)
    dead = weakref.ref(gone)
    del gone
    artifact = _artifact(first)
    artifact.built_with = tuple((dead, w.data_ptr(), w._version) for w in first)
    runner = TensorRTEngine().bind(artifact, unit.sub)
    runner(*_all_inputs(unit.sub, first, _activation(unit.sub)))
    assert runner.refit_count == 1


def test_failed_refit_rebuilds_the_instance_and_says_so(monkeypatch, stack):
    _, unit = stack
    fake = _FakeRefits(monkeypatch, fail=True)
    first, last = list(unit.instance_weights[0]), list(unit.instance_weights[1])
    runner = TensorRTEngine().bind(_artifact(first), unit.sub)
    result = runner(*_all_inputs(unit.sub, last, _activation(unit.sub)))
    assert runner.rebuilt and "names missing" in runner.rebuild_reason
    assert result == ("ran", ("engine", b"rebuilt")) and fake.builds == [last]
    runner(*_all_inputs(unit.sub, last, _activation(unit.sub)))
    assert len(fake.builds) == 1  # same weights: nothing to redo
