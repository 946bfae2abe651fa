"""End-to-end behaviour of the backend on CPU, always compared with eager PyTorch."""

from __future__ import annotations

import ast
import json
import logging
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trt_subgraph
from trt_subgraph.bench import models

TIGHT = dict(rtol=1e-5, atol=1e-5)


def compiled(model, **options):
    options.setdefault("engine", "eager")
    return torch.compile(model, backend="trt_subgraph", options=options)


def run_both(model, inputs, **options):
    with torch.no_grad():
        expected = model(*inputs)
        actual = compiled(model, **options)(*inputs)
    return actual, expected


def fresh_like(inputs):
    return tuple(torch.randint_like(x, 0, 100) if not x.is_floating_point() else torch.randn_like(x) for x in inputs)


def by_instances(report):
    return sorted((s.instances for s in report.subgraphs), reverse=True)


@pytest.mark.parametrize("engine", ["eager", "inductor"])
def test_mlp_matches_eager(engine):
    model, inputs = models.build("mlp", width=16, batch=4)
    actual, expected = run_both(model, fresh_like(inputs), engine=engine)
    torch.testing.assert_close(actual, expected, **TIGHT)
    report = trt_subgraph.last_report()
    assert report.engine == engine and report.totals["builds"] >= 1


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_encoder_builds_the_block_once(norm_first):
    model, inputs = models.build("encoder", depth=12, width=32, batch=2, seq=8, norm_first=norm_first)
    actual, expected = run_both(model, fresh_like(inputs))
    torch.testing.assert_close(actual, expected, **TIGHT)
    report = trt_subgraph.last_report()
    totals = report.totals
    assert report.block_method == "nn_module_stack" and report.blocks == 12
    assert by_instances(report)[0] == 12
    assert all(s.instances == 1 for s in report.subgraphs[1:] if s.instances != 12)
    assert totals["builds"] == totals["unique_subgraphs"]
    assert totals["reuses"] == 11
    assert totals["fallback_nodes"] == 0


def test_encoder_with_inductor_engine_compiles_the_block_once():
    model, inputs = models.build("encoder", depth=4, width=32, batch=2, seq=8)
    actual, expected = run_both(model, fresh_like(inputs), engine="inductor", cache_dir=None)
    torch.testing.assert_close(actual, expected, **TIGHT)
    report = trt_subgraph.last_report()
    assert by_instances(report)[0] == 4 and report.totals["reuses"] == 3
    assert all(s.status == "built" for s in report.subgraphs)


def test_vit_like():
    model, inputs = models.build("vit", depth=3, width=32, batch=2, image=32)
    actual, expected = run_both(model, (torch.randn_like(inputs[0]),))
    torch.testing.assert_close(actual, expected, **TIGHT)
    report = trt_subgraph.last_report()
    assert by_instances(report)[0] == 3 and report.totals["reuses"] == 2


def test_resnet_first_block_of_each_stage_differs():
    model, inputs = models.build("resnet", depth=(3, 4, 6, 3), width=8, batch=2, image=32)
    actual, expected = run_both(model, (torch.randn_like(inputs[0]),))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    report = trt_subgraph.last_report()
    assert report.blocks == 16
    # Blocks 2..n of each stage share a fingerprint; each first block (downsample) is unique.
    repeated = sorted(s.instances for s in report.subgraphs if s.instances > 1)
    assert repeated == [2, 2, 3, 5]
    assert report.totals["reuses"] == 12 - 4


def test_llama_like_decoder_with_rope_and_causal_attention():
    model, inputs = models.build("decoder", depth=4, width=64, batch=2, seq=16)
    actual, expected = run_both(model, fresh_like(inputs))
    torch.testing.assert_close(actual, expected, **TIGHT)
    assert by_instances(trt_subgraph.last_report())[0] == 4


@torch.library.custom_op("trt_subgraph_tests::scale", mutates_args=())
def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor


@scale.register_fake
def _(x, factor):
    return torch.empty_like(x)


@torch.compiler.disable
def host_side_step(x):
    return x + 1


class BreakAndCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        x = scale(torch.relu(self.a(x)), 0.5)
        x = host_side_step(x)  # graph break
        return torch.tanh(self.b(x))


def test_graph_break_and_an_op_the_engine_does_not_support():
    model = BreakAndCustomOp().eval()
    actual, expected = run_both(model, (torch.randn(4, 8),))
    torch.testing.assert_close(actual, expected, **TIGHT)
    reports = trt_subgraph.reports()[-2:]
    assert len(reports) == 2, "the graph break gives two compiled graphs"
    assert reports[0].fallback_ops == {"trt_subgraph_tests.scale.default": 1}
    assert reports[0].totals["fallback_nodes"] == 1
    assert reports[1].fallback_ops == {}


def test_torch_executed_ops_run_in_pytorch():
    model, inputs = models.build("encoder", depth=2, width=32, batch=2, seq=8)
    actual, expected = run_both(model, inputs, torch_executed_ops={"aten.gelu"})
    torch.testing.assert_close(actual, expected, **TIGHT)
    assert trt_subgraph.last_report().fallback_ops.get("aten.gelu.default") == 2


class RegionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)

    @torch.compiler.nested_compile_region
    def forward(self, x):
        return x + F.gelu(self.fc(self.norm(x)))


def test_nested_compile_region_blocks():
    model = nn.Sequential(*[RegionBlock() for _ in range(5)]).eval()
    actual, expected = run_both(model, (torch.randn(3, 16),))
    torch.testing.assert_close(actual, expected, **TIGHT)
    report = trt_subgraph.last_report()
    assert report.block_method == "invoke_subgraph"
    assert by_instances(report) == [5] and report.totals["reuses"] == 4


def test_dynamic_batch_does_not_recompile_and_keeps_blocks_shared():
    model, inputs = models.build("encoder", depth=3, width=32, batch=2, seq=8)
    fn = torch.compile(model, backend="trt_subgraph", dynamic=True, options={"engine": "inductor", "cache_dir": None})
    with torch.no_grad():
        for batch in (2, 5, 7):
            x = torch.randint(0, 100, (batch, 8))
            torch.testing.assert_close(fn(x), model(x), **TIGHT)
    assert len(trt_subgraph.reports()) == 1, "one compilation serves every batch size"
    report = trt_subgraph.last_report()
    assert by_instances(report)[0] == 3 and report.cudagraphs.startswith("off")


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _check(fn, model, x):
    with torch.no_grad():
        torch.testing.assert_close(fn(x), model(x), **TIGHT)


def test_weights_are_never_stale():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    fn = compiled(model)
    x = torch.randn(4, 8)
    _check(fn, model, x)
    with torch.no_grad():
        model.layers[0][0].weight.data.copy_(torch.randn(8, 8))  # .data bypasses the version counter
    _check(fn, model, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.layers[1][0].weight.grad = torch.randn(8, 8)
    optimizer.step()
    _check(fn, model, x)
    model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})
    _check(fn, model, x)
    model.layers[1][0].weight = nn.Parameter(torch.randn(8, 8))  # replaced tensor
    _check(fn, model, x)


class Stateful(nn.Module):
    """Module state of every kind: parameters, a BatchNorm's running statistics, a buffer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.register_buffer("scale", torch.rand(8) + 0.5)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.bn(self.lin(x)) * self.scale


def stateful_forward(model, x, my_buffers_y, marked):
    """Inputs that look like module state and are not: one named like a buffer, one marked static."""
    return model(x) + my_buffers_y * marked


def _compile_stateful(path, model, inputs, device):
    options = {"engine": "eager", "cache_dir": None}
    with torch.no_grad():
        if path == "torch.compile":
            fn = torch.compile(stateful_forward, backend="trt_subgraph", options=options)
            fn(model, *inputs)
            return fn, None
        import torch._dynamo.config as dynamo_config

        from trt_subgraph import _compat

        with dynamo_config.patch(enable_aot_compile=True):
            fn = torch.compile(stateful_forward, fullgraph=True, backend="trt_subgraph", options=options)
            fn = fn.aot_compile(((model, *inputs), {}))
        return fn, _compat.aot_compiled_backend_result(fn)


def _stateful_weight_flags(monkeypatch, path, device):
    """Compile `stateful_forward` along `path`; (the compiled function, its result object if any,
    {graph input name: counted as a weight}, the model, the inputs)."""
    from trt_subgraph import backend

    flags = {}

    def recording(placeholder, example):
        flags[str(placeholder.target)] = found = real(placeholder, example)
        return found

    real = backend._is_weight
    monkeypatch.setattr(backend, "_is_weight", recording)
    torch.manual_seed(0)
    model = Stateful().eval().to(device)
    inputs = [torch.randn(4, 8, device=device) for _ in range(3)]
    torch._dynamo.mark_static_address(inputs[2])
    fn, result = _compile_stateful(path, model, inputs, device)
    return fn, result, flags, model, inputs


@pytest.mark.parametrize("path", ["torch.compile", "aot_compile"])
def test_module_buffers_count_as_weights_and_caller_inputs_never_do(monkeypatch, path):
    if path == "aot_compile" and not hasattr(torch.compiler, "load_compiled_function"):
        pytest.skip("torch without aot_compile (< 2.9)")
    torch.compiler.reset()
    fn, _, flags, model, _ = _stateful_weight_flags(monkeypatch, path, "cpu")
    assert flags == {
        "L_model_modules_lin_parameters_weight_": True,
        "L_model_modules_lin_parameters_bias_": True,
        "L_model_modules_bn_parameters_weight_": True,
        "L_model_modules_bn_parameters_bias_": True,
        "L_model_modules_bn_buffers_running_mean_": True,
        "L_model_modules_bn_buffers_running_var_": True,
        "L_model_buffers_scale_": True,
        "L_x_": False,
        "L_my_buffers_y_": False,  # named like a buffer
        "L_marked_": False,  # marked static by its user
    }
    with torch.no_grad():
        for _ in range(2):  # fresh inputs and state: nothing is baked in
            fresh = [torch.randn(4, 8) for _ in range(3)]
            torch.testing.assert_close(fn(model, *fresh), stateful_forward(model, *fresh), **TIGHT)
            model.bn.running_mean.add_(1.0)
            model.scale.mul_(2.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", ["torch.compile", "aot_compile"])
def test_in_a_cuda_graph_buffers_are_static_and_inputs_are_copied_in_at_every_call(monkeypatch, path):
    if path == "aot_compile" and not hasattr(torch.compiler, "load_compiled_function"):
        pytest.skip("torch without aot_compile (< 2.9)")
    torch.compiler.reset()
    fn, result, flags, model, inputs = _stateful_weight_flags(monkeypatch, path, "cuda")
    with torch.no_grad():
        for _ in range(4):  # the second call records, the later ones replay
            x, y = torch.randn(4, 8, device="cuda"), torch.randn(4, 8, device="cuda")
            inputs[2].copy_(torch.randn(4, 8, device="cuda"))  # marked static by its user: still an input
            torch.testing.assert_close(fn(model, x, y, inputs[2]), stateful_forward(model, x, y, inputs[2]), **TIGHT)
        model.bn.running_var.mul_(2.0)  # in place: the graph reads it where it is
        torch.testing.assert_close(fn(model, x, y, inputs[2]), stateful_forward(model, x, y, inputs[2]), **TIGHT)
    if result is not None:
        graphed = result.cudagraph
        assert graphed is not None and graphed.graphs
        assert len(graphed.static_positions) == sum(flags.values()) == len(flags) - 3


def test_second_instance_of_the_same_class_gets_its_own_weights():
    torch.manual_seed(0)
    first, second = TwoLayers().eval(), TwoLayers().eval()
    x = torch.randn(4, 8)
    fn_first, fn_second = compiled(first, engine="inductor"), compiled(second, engine="inductor")
    _check(fn_first, first, x)
    _check(fn_second, second, x)
    assert not torch.allclose(first(x), second(x))


def test_another_model_with_the_same_block_reuses_the_built_engine():
    shallow, inputs = models.build("encoder", depth=2, width=32, batch=2, seq=8)
    deep, _ = models.build("encoder", depth=5, width=32, batch=2, seq=8, seed=1)
    for model in (shallow, deep):
        actual, expected = run_both(model, inputs, engine="inductor", cache_dir=None)
        torch.testing.assert_close(actual, expected, **TIGHT)
    block = max(trt_subgraph.last_report().subgraphs, key=lambda s: s.instances)
    assert block.instances == 5 and block.status == "memory_hit"


def test_grad_path_is_differentiable_and_matches_eager(caplog):
    torch.manual_seed(0)
    model = TwoLayers()
    reference = TwoLayers()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 8)
    with caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        out = compiled(model, engine="inductor")(x)
    assert out.grad_fn is not None
    out.sum().backward()
    reference(x).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TIGHT)
    assert "gradients are enabled" in caplog.text


@pytest.mark.parametrize("engine", ["eager", "inductor"])
def test_grad_path_records_its_own_report(engine):
    """last_report() describes the graph just compiled, not the model compiled before it."""
    model, inputs = models.build("mlp", width=16, batch=4)
    run_both(model, inputs, engine=engine)
    assert trt_subgraph.last_report().subgraphs
    out = compiled(TwoLayers(), engine=engine)(torch.randn(4, 8))
    assert out.grad_fn is not None
    report = trt_subgraph.last_report()
    assert report.engine_reason.startswith("gradient path") and report.subgraphs == []
    assert report.engine == ("eager" if engine == "eager" else "inductor")


@pytest.mark.parametrize("engine", ["eager", "inductor"])
def test_meta_device_inputs(engine):
    """Meta tensors hold no values: the 2:4 check skips their weights, and the engines compile on shapes alone."""
    model = TwoLayers().to("meta")
    x = torch.randn(4, 8, device="meta")
    actual, expected = run_both(model, (x,), engine=engine)
    assert actual.device.type == "meta" and actual.shape == expected.shape and actual.dtype == expected.dtype
    assert {s.status for s in trt_subgraph.last_report().subgraphs} == {"built"}


def test_reset_forgets_what_this_process_holds(caplog):
    """``trt_subgraph.reset()`` (also run by ``torch._dynamo.reset()``): artifacts in memory, the
    report history, warnings already shown; a compiled function still referenced keeps working."""
    model, inputs = models.build("mlp", width=16, batch=4)
    first = compiled(model, engine="inductor", cache_dir=None)
    with torch.no_grad():
        expected = first(*inputs)
    assert trt_subgraph.last_report() is not None
    for forget in (trt_subgraph.reset, torch._dynamo.reset):
        forget()
        assert trt_subgraph.last_report() is None
        torch._dynamo.reset()  # Dynamo's own cache, so that the model compiles again
        with torch.no_grad():
            torch.testing.assert_close(compiled(model, engine="inductor", cache_dir=None)(*inputs), expected)
        assert {s.status for s in trt_subgraph.last_report().subgraphs} == {"built"}  # not memory hits
    with torch.no_grad():
        torch.testing.assert_close(first(*inputs), expected)

    x = torch.randn(4, 8)
    with caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        for _ in range(2):
            torch._dynamo.reset()
            compiled(TwoLayers())(x)
    assert caplog.text.count("gradients are enabled") == 2  # once per process, and reset starts over


@pytest.mark.parametrize(
    "options, message",
    [
        ({"engnie": "eager"}, "unknown option(s) ['engnie']; valid options are"),
        ({"engine": "tvm"}, "'engine' must be one of ['auto', 'eager', 'inductor', 'tensorrt']"),
        ({"sparsity": "yes"}, "'sparsity' must be one of ['auto', 'on', 'off']"),
        ({"cudagraphs": "no"}, "'cudagraphs' must be a bool"),
        ({"min_block_size": 0}, "'min_block_size' must be an int >= 1"),
        ({"cache_dir": 3}, "'cache_dir' must be a path or None"),
        ({"torch_executed_ops": "aten.gelu"}, "'torch_executed_ops' must be a collection"),
    ],
)
def test_bad_options_raise_value_error(options, message):
    fn = torch.compile(TwoLayers(), backend="trt_subgraph", options=options)
    with pytest.raises(Exception) as info:
        fn(torch.randn(2, 8))
    # Dynamo wraps backend errors in BackendCompilerFailed and keeps ours as inner_exception.
    assert isinstance(getattr(info.value, "inner_exception", info.value), ValueError)
    assert message in str(info.value)


def test_engine_build_failure_falls_back_with_a_warning(monkeypatch, caplog):
    from trt_subgraph.engines.eager import EagerEngine

    def broken(self, sub, weights):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(EagerEngine, "build", broken)
    model, inputs = models.build("encoder", depth=2, width=32, batch=2, seq=8)
    with caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        actual, expected = run_both(model, inputs)
    torch.testing.assert_close(actual, expected, **TIGHT)
    report = trt_subgraph.last_report()
    assert {s.status for s in report.subgraphs} == {"fallback"}
    assert "no kernel for you" in caplog.text and "running it in PyTorch" in caplog.text
    failed = report.totals["fallbacks"]
    assert failed == len(report.subgraphs) and f"fallbacks {failed}, fallback nodes" in str(report)


def test_engine_failure_at_run_time_falls_back(monkeypatch, caplog):
    from trt_subgraph.engines.eager import EagerEngine

    def bind(self, artifact, sub):
        def runner(*args):
            raise RuntimeError("engine crashed")

        return runner

    monkeypatch.setattr(EagerEngine, "bind", bind)
    model, inputs = models.build("mlp", width=16, batch=4)
    with caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        actual, expected = run_both(model, inputs)
    torch.testing.assert_close(actual, expected, **TIGHT)
    assert "engine crashed" in caplog.text


def test_report_is_json_and_readable():
    model, inputs = models.build("encoder", depth=2, width=32, batch=2, seq=8)
    run_both(model, inputs)
    report = trt_subgraph.last_report()
    data = json.loads(json.dumps(report.to_dict()))
    assert data["engine"] == "eager"
    for key in ("unique_subgraphs", "builds", "reuses", "fallback_nodes", "compile_s"):
        assert key in data["totals"]
    for sub in data["subgraphs"]:
        assert len(sub["fingerprint"]) == 32 and sub["status"] in ("built", "memory_hit", "disk_hit")
        assert sub["instances"] >= 1 and sub["nodes"] >= 1 and sub["build_s"] >= 0
    text = str(report)
    assert "fingerprint" in text and data["subgraphs"][0]["fingerprint"] in text


def test_backend_works_without_importing_the_package():
    code = (
        "import torch, sys\n"
        "assert 'trt_subgraph' in torch._dynamo.list_backends()\n"
        "m = torch.nn.Linear(4, 4)\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(m, backend='trt_subgraph', options={'engine': 'eager'})(torch.ones(2, 4))\n"
        "    assert torch.allclose(y, m(torch.ones(2, 4)))\n"
        "assert 'trt_subgraph' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# Modules without a leading underscore whose contents PyTorch does not keep stable either.
PRIVATE_TORCH_MODULES = ("torch.fx.experimental.proxy_tensor", "torch.multiprocessing.reductions")


def _private_torch_uses(source: str) -> list[str]:
    """Each private torch API `source` reaches: imports of ``torch._x`` modules or names and of
    `PRIVATE_TORCH_MODULES`, attribute reads ``torch._x``, and ``._version`` of any tensor."""

    def private_module(name: str) -> bool:
        return name.startswith("torch._") or name in PRIVATE_TORCH_MODULES

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if private_module(node.module):
                found.append(f"from {node.module} import")
            elif node.module == "torch":
                found += [f"from torch import {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if private_module(a.name)]
        elif isinstance(node, ast.Attribute):
            if node.attr == "_version":
                found.append("._version")
            elif (
                isinstance(node.value, ast.Name)
                and node.value.id == "torch"
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"torch.{node.attr}")
    return found


def test_every_private_torch_api_is_reached_through_the_compat_module():
    package = pathlib.Path(trt_subgraph.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.name != "_compat.py":
            offenders += [f"{path.relative_to(package)}: {use}" for use in _private_torch_uses(path.read_text())]
    assert offenders == []


def test_the_private_torch_api_check_sees_every_kind_of_use():
    source = """
import torch._dynamo
from torch._inductor import config
from torch import _dynamo
from torch.fx.experimental.proxy_tensor import unset_fake_temporarily
from torch.multiprocessing.reductions import StorageWeakRef
torch._cslt_compress(w)
v = w._version
ok = torch.__version__, torch.fx.Graph, torch.ops.aten.mm.default
"""
    assert sorted(_private_torch_uses(source)) == sorted(
        [
            "import torch._dynamo",
            "from torch._inductor import",
            "from torch import _dynamo",
            "from torch.fx.experimental.proxy_tensor import",
            "from torch.multiprocessing.reductions import",
            "torch._cslt_compress",
            "._version",
        ]
    )


_POOL_PROBE = """
import sys, torch, trt_subgraph
from trt_subgraph import _compat
torch.manual_seed(0)
m = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()) for _ in range(3)]).cuda()
x = torch.randn(8, 64, device="cuda")
backend = sys.argv[1]
options = {"engine": "inductor"} if backend == "trt_subgraph" else None
with torch.no_grad():
    y = torch.compile(m, backend=backend, options=options)(x)
    torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-4)
report = trt_subgraph.last_report() if backend == "trt_subgraph" else None
totals = report.totals if report else {}
print("@@", _compat.inductor_pool_started(), totals.get("builds"), totals.get("disk_hits"))
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loading_inductor_artifacts_does_not_start_inductors_worker_pool(tmp_path):
    """A load compiles nothing; the pool's workers would each import torch for nothing."""

    def probe(backend: str, inductor_dir: str) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_COMPILE_THREADS"}
        env.update(
            TORCHINDUCTOR_CACHE_DIR=str(tmp_path / inductor_dir),
            TRITON_CACHE_DIR=str(tmp_path / inductor_dir / "triton"),
            TRT_SUBGRAPH_CACHE_DIR=str(tmp_path / "trt_subgraph"),
        )
        proc = subprocess.run([sys.executable, "-c", _POOL_PROBE, backend], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return next(line for line in proc.stdout.splitlines() if line.startswith("@@")).split()[1:]

    if probe("inductor", "control")[0] != "True":
        pytest.skip("inductor starts no worker pool on this machine, so there is nothing to avoid")
    _, builds, disk_hits = probe("trt_subgraph", "cold")
    assert disk_hits == "0" and int(builds) > 0
    pool, builds, disk_hits = probe("trt_subgraph", "warm")  # trt_subgraph's disk cache warm, inductor's caches fresh
    assert (pool, builds) == ("False", "0") and int(disk_hits) > 0


def test_artifact_loads_compile_in_process_unless_the_user_or_a_running_pool_says_otherwise(monkeypatch):
    from torch._inductor import CompiledArtifact, async_compile
    from torch._inductor import config as inductor_config

    from trt_subgraph import _compat

    seen = []
    monkeypatch.setattr(
        CompiledArtifact, "load", staticmethod(lambda **kw: seen.append(inductor_config.compile_threads))
    )
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    with inductor_config.patch(compile_threads=8):
        _compat.load_compiled_artifact("unused")
        monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "8")
        _compat.load_compiled_artifact("unused")
        monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS")
        monkeypatch.setattr(async_compile, "_pool_set", {object()})
        _compat.load_compiled_artifact("unused")
        assert seen == [1, 8, 8] and inductor_config.compile_threads == 8


def _stand_in_cuda_graphs(monkeypatch) -> tuple[Any, list[str], Callable[[list], list]]:
    """torch.cuda's capture API stood in for on a CPU: a graph replays what the forward captured
    into it. Returns the capture state, the log of work done ("run" or "replay") and a forward
    computing ``x * w + 1`` that logs its work."""
    import contextlib
    import types

    state = types.SimpleNamespace(capturing=None, modes=[])
    work: list[str] = []

    class Graph:
        def replay(self) -> None:
            self.captured()

    @contextlib.contextmanager
    def graph(g, pool=None, capture_error_mode="global"):
        state.capturing = g
        state.modes.append(capture_error_mode)
        try:
            yield
        finally:
            state.capturing = None

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())

    def forward(args: list) -> list:
        x, w = args
        if state.capturing is not None:  # recorded, not run
            out = torch.empty_like(x)
            state.capturing.captured = lambda: (out.copy_(x * w + 1), work.append("replay"))
            return [out]
        work.append("run")
        return [x * w + 1]

    return state, work, forward


def test_every_call_runs_the_forward_once_the_recording_call_too(monkeypatch):
    """Each call does the forward's work exactly once, also the call that records and those
    after a swap or a weight change. A forward with collectives depends on it: ranks that
    record at different calls must still run the same collectives."""
    from trt_subgraph.runtime import CUDAGraphForward

    state, work, forward = _stand_in_cuda_graphs(monkeypatch)
    weight = torch.randn(8)
    graphed = CUDAGraphForward(forward, static_positions=[1])
    for call in range(9):
        if call == 4:
            graphed.invalidate()  # a background build swapped in
        if call == 6:
            with torch.no_grad():
                weight.mul_(2)  # a new version of a static input records again
        x = torch.randn(8)
        torch.testing.assert_close(graphed([x, weight])[0], x * weight + 1)
        assert len(work) == call + 1, work
    assert graphed.records == 3 and state.modes == ["thread_local"] * 3
    assert work == ["run", "run", "replay", "replay", "run", "run", "run", "replay", "replay"]


def test_reset_drops_every_recorded_cuda_graph(monkeypatch):
    """``trt_subgraph.reset()`` (run by ``torch.compiler.reset()`` once the backend was used)
    drops the graphs of every live compiled forward: NCCL's ``destroy_process_group()`` hangs while a graph holding its
    collectives exists. The forwards keep working and record again; one that is no longer
    referenced is not kept alive by the reset's registry."""
    import gc
    import weakref

    from trt_subgraph import runtime

    _, work, forward = _stand_in_cuda_graphs(monkeypatch)
    weight = torch.randn(8)
    forwards = [runtime.CUDAGraphForward(forward, static_positions=[1]) for _ in range(2)]
    for graphed in forwards:
        for _ in range(3):
            graphed([torch.randn(8), weight])
        assert len(graphed.graphs) == 1
    trt_subgraph.reset()
    assert all(not graphed.graphs and graphed.pool is None for graphed in forwards)
    work.clear()
    for _ in range(3):
        x = torch.randn(8)
        torch.testing.assert_close(forwards[0]([x, weight])[0], x * weight + 1)
    assert work == ["run", "run", "replay"] and forwards[0].records == 2
    gone = weakref.ref(forwards.pop())
    del graphed
    gc.collect()
    assert gone() is None and len(runtime._LIVE) >= 1


def test_reset_while_another_thread_compiles_does_not_raise():
    """Compiled forwards are made in whichever thread compiles; a reset iterating over the live
    ones while another thread adds one raised "Set changed size during iteration"."""
    import threading

    from trt_subgraph import runtime

    stop = threading.Event()
    made: list[Any] = [runtime.CUDAGraphForward(lambda args: args, static_positions=[]) for _ in range(300)]

    def compile_forever() -> None:
        while not stop.is_set():
            made.append(runtime.CUDAGraphForward(lambda args: args, static_positions=[]))
            if len(made) > 600:
                del made[300:]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often: the reset is interrupted mid-iteration
    thread = threading.Thread(target=compile_forever)
    thread.start()
    try:
        for _ in range(2000):
            runtime.release_cuda_graphs()
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_is_recorded_at_the_second_call_and_replayed_after_it():
    from trt_subgraph.runtime import CUDAGraphForward

    capturing = []

    def forward(args: list) -> list:
        capturing.append(torch.cuda.is_current_stream_capturing())
        return [args[0] * args[1] + 1]

    weight = torch.randn(64, device="cuda")
    graphed = CUDAGraphForward(forward, static_positions=[1])
    for call in range(4):
        x = torch.randn(64, device="cuda")  # fresh activations: replays must copy them in
        (y,) = graphed([x, weight])
        torch.testing.assert_close(y, x * weight + 1)
        if call == 0:
            assert not graphed.graphs and capturing == [False]
    # call 1 ran plain; call 2 ran once on a side stream, then captured; calls 3 and 4 replayed
    assert capturing == [False, False, True] and graphed.records == 1
    with torch.no_grad():
        weight.mul_(2)  # a new version of a static input re-records
    x = torch.randn(64, device="cuda")
    torch.testing.assert_close(graphed([x, weight])[0], x * weight + 1)
    assert graphed.records == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("how", ["invalidate", "evict"])
def test_cuda_graphs_record_again_after_every_graph_was_dropped(how):
    """A background build swapped in drops every graph (`invalidate`), and with
    ``max_shapes=1`` a new shape evicts the only one. The memory pool of graphs that are all
    destroyed is released by torch's allocator; capturing into it again failed with an
    internal assert (``use_count > 0``) and left the forward uncaptured."""
    from trt_subgraph.runtime import CUDAGraphForward

    weight = torch.randn(64, device="cuda")
    graphed = CUDAGraphForward(lambda args: [args[0] * args[1] + 1], static_positions=[1], max_shapes=1)
    sizes = [64, 64, 64] if how == "invalidate" else [64, 64, 32, 32, 32]
    for i, size in enumerate(sizes + sizes):
        if how == "invalidate" and i == len(sizes):
            graphed.invalidate()
        x = torch.randn(size, device="cuda")
        torch.testing.assert_close(graphed([x, weight[:size] if size != 64 else weight])[0], x * weight[:size] + 1)
    assert graphed.failed is None
    assert graphed.records == (2 if how == "invalidate" else 4)


def test_inductor_builds_leave_triton_autotuning_to_the_first_run():
    """standalone_compile turns on ``triton.autotune_at_compile_time`` (benchmarks on generated
    inputs while compiling); trt_subgraph's builds turn it off, so kernels tune on their first
    run, on real inputs, as under torch.compile. A post-grad pass reads the setting in effect
    inside the compile."""
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from trt_subgraph import _compat

    seen: list[Any] = []

    class ReadSetting(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            seen.append(config.triton.autotune_at_compile_time)

        def uuid(self) -> str:
            return "read autotune_at_compile_time"

    gm = torch.fx.symbolic_trace(lambda x: torch.relu(x) + 1)
    with config.patch(post_grad_custom_post_pass=ReadSetting(), force_disable_caches=True):
        compiled = _compat.standalone_compile(gm, [torch.randn(4)])
    x = torch.randn(4)
    out = compiled(x)
    torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, torch.relu(x) + 1)
    assert seen == [False]
