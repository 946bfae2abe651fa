"""TensorRT engine on a GPU: build once, refit across depths, sparse flag, stripped plans, weight changes.

Run with ``pytest -m tensorrt`` where tensorrt and torch_tensorrt are installed with a CUDA GPU;
elsewhere every test here is reported as skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trt_subgraph
from trt_subgraph.engines import tensorrt as trt_engine
from trt_subgraph.engines.base import ACTIVATION
from trt_subgraph.engines.tensorrt import TensorRTEngine, to_constant_module

_UNAVAILABLE = TensorRTEngine.unavailable_reason()
pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"TensorRT engine unavailable: {_UNAVAILABLE}"),
]

WIDTH = 256  # large enough that weights dominate the plan size
RTOL, ATOL = 1e-3, 1e-4  # fp32 with TF32 off in PyTorch and in the engine


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH), nn.LayerNorm(WIDTH)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


@pytest.fixture(scope="module")
def stack():
    torch.manual_seed(0)
    assert not torch.backends.cuda.matmul.allow_tf32, "the tolerances assume PyTorch's default (TF32 off)"
    model = nn.Sequential(*[Block() for _ in range(3)]).cuda().eval()
    captured = trt_subgraph.capture(model, torch.randn(4, WIDTH, device="cuda"))
    (unit,) = [u for u in captured.unique if len(u.instance_weights) == 3]
    return model, unit


def _activation(sub, seed: int) -> torch.Tensor:
    (val,) = [v for k, v in zip(sub.input_kinds, sub.example_inputs) if k == ACTIVATION]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(tuple(val.shape), generator=gen, device="cuda")


def _inputs(sub, weights, x):
    it = iter(weights)
    return [x if kind == ACTIVATION else next(it) for kind in sub.input_kinds]


def _expected(sub, weights, x):
    with torch.no_grad():
        return to_constant_module(sub, weights)(x)


def _check(runner, sub, weights, seed):
    x = _activation(sub, seed)
    (got,) = runner(*_inputs(sub, weights, x))
    (expected,) = _expected(sub, weights, x)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def built(stack):
    _, unit = stack
    engine = TensorRTEngine()
    return engine, engine.build(unit.sub, list(unit.instance_weights[0]))


def test_build_runs_and_matches_pytorch(stack, built):
    _, unit = stack
    engine, artifact = built
    runner = engine.bind(artifact, unit.sub)
    _check(runner, unit.sub, unit.instance_weights[0], seed=1)
    assert runner.refit_count == 0 and not runner.rebuilt


@pytest.mark.parametrize("depth", [1, 2])
def test_one_engine_refits_for_blocks_at_other_depths(stack, built, depth):
    _, unit = stack
    engine, artifact = built
    runner = engine.bind(artifact, unit.sub)
    _check(runner, unit.sub, unit.instance_weights[depth], seed=depth)
    assert runner.refit_count == 1 and not runner.rebuilt, runner.rebuild_reason


def test_refit_mapping_names_match_the_engine_for_every_instance(stack, built):
    _, unit = stack
    engine, artifact = built
    names = [set(engine.refit_mapping(unit.sub, list(w))) for w in unit.instance_weights]
    assert names[0] == names[1] == names[2] and names[0]


def test_sparse_flag_is_accepted(stack):
    _, unit = stack
    engine = TensorRTEngine(sparse=True)
    artifact = engine.build(unit.sub, list(unit.instance_weights[0]))
    assert artifact.sparse and engine.settings()["sparse"] is True
    runner = engine.bind(artifact, unit.sub)
    _check(runner, unit.sub, unit.instance_weights[2], seed=3)
    assert runner.sparse


def test_weight_stripped_plan_round_trip(stack, built):
    _, unit = stack
    engine, artifact = built
    payload = engine.serialize(artifact)
    loaded = engine.deserialize(payload, unit.sub)
    assert loaded.stripped == trt_engine._can_strip()
    if loaded.stripped:  # 3 * WIDTH^2 * 2 fp32 weights are gone from the plan
        assert len(loaded.plan) < len(artifact.plan) - 4 * WIDTH * WIDTH
    runner = engine.bind(loaded, unit.sub)
    _check(runner, unit.sub, unit.instance_weights[1], seed=4)
    assert runner.refit_count == 1 and not runner.rebuilt, runner.rebuild_reason


def test_weight_change_refits_before_running(stack, built):
    _, unit = stack
    engine, artifact = built
    weights = [w.clone() for w in unit.instance_weights[0]]  # not the model's: this test changes them
    runner = engine.bind(artifact, unit.sub)
    _check(runner, unit.sub, weights, seed=5)
    assert runner.refit_count == 1  # new addresses: refit even though the values are the built ones
    with torch.no_grad():
        for w in weights:
            w.mul_(1.5)  # in place, as an optimizer step or load_state_dict would
    _check(runner, unit.sub, weights, seed=6)
    assert runner.refit_count == 2
    _check(runner, unit.sub, [w * 0.5 for w in weights], seed=7)
    assert runner.refit_count == 3 and not runner.rebuilt, runner.rebuild_reason


def test_converter_registry_answers_is_node_supported(stack):
    _, unit = stack
    engine = TensorRTEngine()
    nodes = [n for n in unit.sub.gm.graph.nodes if n.op == "call_function"]
    assert all(engine.is_node_supported(n) for n in nodes)


def test_backend_builds_once_and_matches_eager(stack):
    model, _ = stack
    x = torch.randn(4, WIDTH, device="cuda")
    compiled = torch.compile(
        model, backend="trt_subgraph", options={"engine": "tensorrt", "cache_dir": None, "cudagraphs": False}
    )
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=RTOL, atol=ATOL)
    report = trt_subgraph.last_report()
    assert report.engine == "tensorrt"
    assert sum(s.status == "built" for s in report.subgraphs if s.instances == 3) == 1
