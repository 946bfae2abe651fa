"""The plan cache: a new process compiling the same graph through plain torch.compile assembles
it from the cached plan and artifacts (no split, no aot_autograd trace, no build, no workers),
and anything that could make the plan wrong (another graph, shape, weight pattern, a changed
entry) lowers the graph as usual."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

import trt_subgraph
from trt_subgraph import engines, plan_cache, regions
from trt_subgraph.bench import models
from trt_subgraph.options import Options
from trt_subgraph.sparsity import prune_2_4

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


def test_weights_that_lost_their_2_4_pattern_miss_the_plan(eager_engine_with_2_4_variants, lowerings):
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


def _warm(model, inputs, ctx=contextlib.nullcontext):
    """The report's ``regions["plan"]`` after a compile under ``torch.no_grad()`` and `ctx` in a
    process that forgot every compiled graph, with the compiled model checked against eager on
    `inputs` and on fresh ones."""
    torch.compiler.reset()
    trt_subgraph.reset()
    fresh = [torch.randn_like(x) for x in inputs]
    with torch.no_grad(), ctx():
        compiled = torch.compile(model, backend="trt_subgraph", options={"engine": "eager"})
        for x in (inputs, fresh):
            got, want = compiled(*x), model(*x)
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, **TIGHT)
    return trt_subgraph.last_report().regions["plan"]


class _Scaled(torch.nn.Module):
    """A linear layer, a buffer, a tensor attribute that is neither parameter nor buffer, and a
    Python float that Dynamo bakes into the graph."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("shift", torch.randn(8))
        self.offset = torch.randn(8)
        self.scale = scale

    def forward(self, x):
        return torch.relu(self.lin(x) * self.scale + self.shift) + self.offset


def test_weight_values_are_read_at_run_time_and_python_constants_are_in_the_key():
    x = [torch.randn(4, 8)]
    assert _warm(_Scaled(0.5), x) == "stored"
    assert _warm(_Scaled(0.5), x) == "cache hit"  # other weights, buffer and attribute values
    assert _warm(_Scaled(2.0), x) == "stored"


def test_training_mode_and_autocast_miss_the_plan():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(p=1.0)).eval()  # train: all zeros
    x = [torch.randn(4, 8)]
    assert _warm(model, x) == "stored"
    assert _warm(model.train(), x) == "stored"
    assert _warm(model.eval(), x, ctx=lambda: torch.autocast("cpu", dtype=torch.bfloat16)) != "cache hit"


def test_a_function_dynamo_puts_in_the_graph_untraced_is_not_cached(monkeypatch):
    """Its code is in the lowering but not in the graph: a later process may run an edited one."""
    import types

    module = types.ModuleType("trt_subgraph_test_user_functions")
    monkeypatch.setitem(sys.modules, module.__name__, module)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return sys.modules["trt_subgraph_test_user_functions"].act(self.lin(x))

    model, x, plans = Model(), [torch.randn(4, 8)], []
    for factor in (2, 3):  # the same function, edited
        exec(f"def act(x):\n    return x * {factor}\n", module.__dict__)
        torch._dynamo.allow_in_graph(module.act)
        plans.append(_warm(model, x))
    assert all(plan.startswith("not cached (it calls trt_subgraph_test_user_functions.act") for plan in plans), plans


def test_an_opaque_custom_op_runs_its_kernel_of_the_day_and_a_decomposed_one_is_not_cached():
    factor = {"value": 2.0}

    @torch.library.custom_op("trt_subgraph_test_plan::scaled", mutates_args=())
    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x * factor["value"]

    @scaled.register_fake
    def _(x):
        return torch.empty_like(x)

    library = torch.library.Library("trt_subgraph_test_plan_implicit", "DEF")
    library.define("scaled(Tensor x) -> Tensor")
    library.impl("scaled", lambda x: x * factor["value"], "CompositeImplicitAutograd")

    class Model(torch.nn.Module):
        def __init__(self, op):
            super().__init__()
            self.lin, self.op = torch.nn.Linear(8, 8), op

        def forward(self, x):
            return self.op(self.lin(x))

    x = [torch.randn(4, 8)]
    opaque = Model(torch.ops.trt_subgraph_test_plan.scaled)
    assert _warm(opaque, x) == "stored"
    factor["value"] = 5.0
    assert _warm(opaque, x) == "cache hit"
    decomposed, plans = Model(torch.ops.trt_subgraph_test_plan_implicit.scaled), []
    for factor["value"] in (2.0, 3.0):  # the same op, its kernel edited
        plans.append(_warm(decomposed, x))
    assert all(plan.startswith("not cached (op trt_subgraph_test_plan_implicit.scaled") for plan in plans), plans


def test_a_user_triton_kernel_is_not_cached():
    """The graph names the kernel and its constant arguments by indexes into a table of the process."""
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_mutation

    from trt_subgraph._compat import lowering_not_pinned

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["example_value"] = torch.empty(4)
    kwargs = dict(kernel_idx=0, constant_args_idx=0, grid=[(1, 1, 1)], tma_descriptor_metadata={}, kwargs={"x": x})
    node = graph.call_function(triton_kernel_wrapper_mutation, kwargs=kwargs)
    assert "Triton kernel" in lowering_not_pinned(node)


def test_a_function_of_torch_in_the_graph_is_cached():
    """Torch's own functions that Dynamo keeps in the graph (autocast's entry) are pinned by
    torch's version, which is in the key."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self.lin(x)
            return y.float() * 2

    x = [torch.randn(4, 8)]
    assert _warm(Model(), x) == "stored"
    assert _warm(Model(), x) == "cache hit"


def test_a_function_of_another_package_in_the_graph_keys_the_plan_on_its_version(monkeypatch):
    """AOTAutograd lets ``einops.rearrange`` and ``einops.repeat`` through where Dynamo keeps
    them in the graph (einops before 0.8.2) and traces their code into the lowering: another
    einops version must miss the plan. A stand-in einops module, not installed (its version
    comes from the module, as where importlib.metadata finds none)."""
    import types

    package, module = types.ModuleType("einops"), types.ModuleType("einops.einops")
    exec("def rearrange(x):\n    return x.t()\n", module.__dict__)
    module.rearrange.__module__ = "einops.einops"
    monkeypatch.setitem(sys.modules, "einops", package)
    monkeypatch.setitem(sys.modules, "einops.einops", module)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["example_value"] = torch.empty(4, 8)
    y = graph.call_function(module.rearrange, (x,))
    y.meta["example_value"] = torch.empty(8, 4)
    graph.output(y)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    digests = []
    for version in ("0.7.0", "0.7.0", "0.8.1"):
        package.__version__ = version
        digests.append(plan_cache._graph_digest(gm, ["activation"]))
    assert digests[0] == digests[1] != digests[2]
