"""The plan cache: a new process compiling the same graph through plain torch.compile assembles
it from the cached plan and artifacts (no split, no aot_autograd trace, no build, no workers),
and anything that could make the plan wrong (another graph, shape, weight pattern, a changed
entry) lowers the graph as usual."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import trt_subgraph
from trt_subgraph import engines, plan_cache, regions
from trt_subgraph.bench import models
from trt_subgraph.engines.eager import EagerEngine
from trt_subgraph.options import Options
from trt_subgraph.sparsity import analyze_weight, prune_2_4

TIGHT = dict(rtol=1e-5, atol=1e-5)
DECODER = dict(depth=2, width=16, batch=2, seq=8)


def compile_and_run(model, inputs, **options):
    """The compiled model's output on `inputs` and on fresh inputs, each with eager's, and the
    report, after forgetting every compiled graph (as a new process would)."""
    torch.compiler.reset()
    trt_subgraph.reset()
    options = {"engine": "eager", **options}
    fresh = models.make_inputs("decoder", model, batch=DECODER["batch"], seq=DECODER["seq"], seed=7)
    with torch.no_grad():
        compiled = torch.compile(model, backend="trt_subgraph", options=options)
        pairs = [(compiled(*inputs), model(*inputs)), (compiled(*fresh), model(*fresh))]
    for got, want in pairs:
        torch.testing.assert_close(got, want, **TIGHT)
    return trt_subgraph.last_report()


@pytest.fixture
def lowerings(monkeypatch):
    """How often the backend split a graph into regions and traced one with aot_autograd."""
    calls = {"split": 0, "aot_autograd": 0}
    real_split, real_aot = regions.split_module, regions.aot_autograd

    def split(*args, **kwargs):
        calls["split"] += 1
        return real_split(*args, **kwargs)

    def aot(*args, **kwargs):
        calls["aot_autograd"] += 1
        return real_aot(*args, **kwargs)

    monkeypatch.setattr(regions, "split_module", split)
    monkeypatch.setattr(regions, "aot_autograd", aot)
    return calls


def test_the_same_graph_again_takes_its_plan_from_the_cache(lowerings):
    model, inputs = models.build("decoder", seed=0, **DECODER)
    first = compile_and_run(model, inputs)
    assert first.regions["plan"] == "stored" and lowerings["split"] == 1
    lowerings.update(split=0, aot_autograd=0)
    again = compile_and_run(model, inputs)
    assert again.regions["plan"] == "cache hit", again.regions
    assert lowerings == {"split": 0, "aot_autograd": 0}
    assert again.regions["path"] == first.regions["path"] == "regions"
    assert again.totals["unique_subgraphs"] == first.totals["unique_subgraphs"]


def test_another_shape_or_another_op_misses(lowerings):
    model, inputs = models.build("decoder", seed=0, **DECODER)
    assert compile_and_run(model, inputs).regions["plan"] == "stored"
    longer = models.make_inputs("decoder", model, batch=DECODER["batch"], seq=DECODER["seq"] - 2)
    torch.compiler.reset()
    trt_subgraph.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="trt_subgraph", options={"engine": "eager"})(*longer)
        torch.testing.assert_close(out, model(*longer), **TIGHT)
    assert trt_subgraph.last_report().regions["plan"] == "stored"
    for block in model.layers:  # another norm: other ops
        block.mlp_norm = torch.nn.LayerNorm(DECODER["width"])
    assert compile_and_run(model, inputs).regions["plan"] == "stored"
    assert lowerings["split"] == 3


def test_a_changed_plan_entry_is_refused_and_the_graph_lowered(lowerings, tmp_path, caplog):
    model, inputs = models.build("decoder", seed=0, **DECODER)
    assert compile_and_run(model, inputs).regions["plan"] == "stored"
    entries = sorted((tmp_path / "cache").glob("*.entry"))
    assert len(entries) == 1, entries  # the eager engine stores no artifacts: the one plan
    data = bytearray(entries[0].read_bytes())
    data[-20] ^= 0xFF  # inside the pickled plan
    entries[0].write_bytes(bytes(data))
    report = compile_and_run(model, inputs)
    assert report.regions["plan"] == "stored" and lowerings["split"] == 2
    assert "rejected" in caplog.text


def test_options_that_change_the_plan_miss_and_others_hit(lowerings):
    model, inputs = models.build("decoder", seed=0, **DECODER)
    assert compile_and_run(model, inputs).regions["plan"] == "stored"
    assert compile_and_run(model, inputs, build_workers=0).regions["plan"] == "cache hit"
    assert compile_and_run(model, inputs, min_block_size=3).regions["plan"] == "stored"
    assert compile_and_run(model, inputs, plan_cache=False).regions["plan"] == "off"
    assert compile_and_run(model, inputs, cache_dir=None).regions["plan"] == "off (disk cache off)"


class _TwoFourEagerEngine(EagerEngine):
    """The eager engine, with 2:4 weights as another weight variant (as the inductor engine on CUDA)."""

    def weight_variant(self, weight):
        return "2:4" if weight.dim() == 2 and analyze_weight(weight, kind="linear").pattern_ok else "dense"


def test_weights_that_lost_their_2_4_pattern_miss_the_plan(monkeypatch, lowerings):
    real = engines.engine_class
    monkeypatch.setattr(engines, "engine_class", lambda name: _TwoFourEagerEngine if name == "eager" else real(name))
    model, inputs = models.build("decoder", seed=0, **DECODER)
    for block in model.layers:
        prune_2_4(block)
    pruned = compile_and_run(model, inputs)
    assert pruned.regions["plan"] == "stored"
    assert compile_and_run(model, inputs).regions["plan"] == "cache hit"
    dense, _ = models.build("decoder", seed=0, **DECODER)
    report = compile_and_run(dense, inputs)
    assert report.regions["plan"] == "stored" and lowerings["split"] == 2
    assert {rec.variant for rec in report.subgraphs} != {rec.variant for rec in pruned.subgraphs}


def test_graphs_the_plan_cannot_hold_are_lowered_every_time():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x * 2

    torch.compiler.reset()
    with torch.no_grad():
        torch.compile(Counter(), backend="trt_subgraph", options={"engine": "eager"})(torch.randn(3))
    assert trt_subgraph.last_report().regions["plan"].startswith("not stored (inputs [")


def test_a_key_names_no_module_instance_by_id():
    """Dynamo keys ``nn_module_stack`` by ``id()`` of the module: such ids must not reach the key."""
    keys = []
    for _ in range(2):
        model, inputs = models.build("decoder", seed=0, **DECODER)
        graphs = []

        def backend(gm, example_inputs, graphs=graphs):
            graphs.append((gm, example_inputs))
            return gm.forward

        torch.compiler.reset()
        with torch.no_grad():
            torch.compile(model, backend=backend)(*inputs)
        ((gm, example_inputs),) = graphs
        engine, _ = engines.select("eager", torch_executed_ops=frozenset(), sparsity="auto")
        flags = [isinstance(x, torch.nn.Parameter) for x in example_inputs]
        keys.append(plan_cache.plan_key(gm, example_inputs, flags, Options(), engine))
    assert keys[0] == keys[1]


@pytest.mark.skipif(not hasattr(torch.compiler, "load_compiled_function"), reason="torch without aot_compile (< 2.9)")
def test_a_function_compiled_from_a_cached_plan_saves_and_loads(tmp_path):
    import torch._dynamo.config as dynamo_config

    model, inputs = models.build("decoder", seed=0, **DECODER)

    def forward(model, *args):
        return model(*args)

    for plan in ("stored", "cache hit"):
        torch.compiler.reset()
        trt_subgraph.reset()
        with torch.no_grad(), dynamo_config.patch(enable_aot_compile=True):  # torch 2.9 to 2.11 need it
            compiled = torch.compile(forward, fullgraph=True, backend="trt_subgraph", options={"engine": "eager"})
            compiled = compiled.aot_compile(((model, *inputs), {}))
        assert trt_subgraph.last_report().regions["plan"] == plan
    run = trt_subgraph.load(trt_subgraph.save(compiled, tmp_path / "decoder.tsg"), model)
    fresh = models.make_inputs("decoder", model, batch=DECODER["batch"], seq=DECODER["seq"], seed=3)
    with torch.no_grad():
        torch.testing.assert_close(run(*fresh), model(*fresh), **TIGHT)
    assert trt_subgraph.last_report().regions["loaded"] is True


_CHILD = r"""
import json, sys, torch, trt_subgraph
from trt_subgraph import regions, workers
from trt_subgraph.bench import models

calls = {"split": 0, "aot_autograd": 0, "worker_pools": 0}
real_split, real_aot, real_pool = regions.split_module, regions.aot_autograd, workers.for_engine

def count(name, real):
    def counted(*args, **kwargs):
        calls[name] += 1
        return real(*args, **kwargs)
    return counted

regions.split_module = count("split", real_split)
regions.aot_autograd = count("aot_autograd", real_aot)
workers.for_engine = count("worker_pools", real_pool)
kwargs = json.loads(sys.argv[1])
model, inputs = models.build("decoder", seed=0, **kwargs)
fresh = models.make_inputs("decoder", model, batch=kwargs["batch"], seq=kwargs["seq"], seed=9)
with torch.no_grad():
    compiled = torch.compile(model, backend="trt_subgraph", options={"engine": "inductor", "build_workers": 0})
    errors = [(compiled(*x) - model(*x)).abs().max().item() for x in (inputs, fresh)]
report = trt_subgraph.last_report()
print("@@" + json.dumps({"errors": errors, "calls": calls, "totals": report.totals, "regions": report.regions,
                         "statuses": sorted({s.status for s in report.subgraphs})}))
"""


def _child(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{len(list(tmp_path.iterdir()))}")}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(DECODER)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("@@"))[2:])


def test_a_new_process_with_the_cache_full_builds_nothing_and_lowers_nothing(tmp_path):
    """Two processes with their own empty inductor caches share one trt_subgraph disk cache."""
    cold = _child(tmp_path)
    assert cold["regions"]["plan"] == "stored" and cold["totals"]["builds"] > 0, cold
    warm = _child(tmp_path)
    assert max(warm["errors"]) <= 1e-5, warm
    assert warm["regions"]["plan"] == "cache hit", warm
    assert warm["calls"] == {"split": 0, "aot_autograd": 0, "worker_pools": 0}, warm
    assert warm["totals"]["builds"] == 0 and warm["statuses"] == ["disk_hit"], warm
