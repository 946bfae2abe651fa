"""torch.distributed ranks split the builds of the graphs they all compile (`trt_subgraph.ranks`),
and tensor-parallel graphs with functional collectives compile. Ranks are processes on CPU
(gloo), started with torch.multiprocessing and rendezvousing through a file store."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp

from trt_subgraph import ranks
from trt_subgraph.options import Options


class ParallelMLP(torch.nn.Module):
    """A tensor-parallel MLP: column-parallel up, row-parallel down, then a functional all_reduce."""

    def __init__(self, width: int, hidden: int, world: int, group=None) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, hidden // world)
        self.down = torch.nn.Linear(hidden // world, width, bias=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(self.down(torch.relu(self.up(x))), "sum", self.group or dist.group.WORLD)


class Model(torch.nn.Module):
    def __init__(self, world: int, layers: int = 3, width: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(ParallelMLP(width, hidden, world) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


class GatheredMLP(torch.nn.Module):
    """Column-parallel up whose shards a functional all_gather joins, then a replicated down."""

    def __init__(self, width: int, hidden: int, world: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, hidden // world)
        self.down = torch.nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(funcol.all_gather_tensor(torch.relu(self.up(x)), -1, dist.group.WORLD))


def _rank(rank: int, world: int, store: str, out: str, case: str, options: dict) -> None:
    import trt_subgraph

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    if options.get("cache_dir") == "per rank":
        options = {**options, "cache_dir": os.path.join(out, f"cache{rank}")}
    try:
        torch.manual_seed(rank)  # every rank holds other weights (its shards)
        width = 8
        model = Model(world, hidden=16 * (rank + 1) if case == "differ" else 16).eval()
        if case == "gather":
            model.layers = torch.nn.ModuleList(GatheredMLP(width, 16, world) for _ in range(3)).eval()
        if case == "groups":  # the same block on another group (same ranks): never shares its region
            model.layers[1].group = dist.new_group(list(range(world)))
        if case == "fail" and rank == 0:
            from trt_subgraph.engines.inductor import InductorEngine

            def fail(self, sub, weights):
                raise RuntimeError("no build on rank 0")

            InductorEngine.build = fail
        x = torch.randn(4, width, generator=torch.Generator().manual_seed(7))  # the same on every rank
        if case == "plan_or_cold":  # a wait for the agreement's time-out would set ranks._ALONE
            ranks.AGREE_TIMEOUT = datetime.timedelta(seconds=20)
        if case == "alone":  # only rank 0 compiles: it waits for the others a while, then builds alone
            ranks.AGREE_TIMEOUT = datetime.timedelta(seconds=5)
            if rank > 0:
                with torch.no_grad():
                    for _ in range(4):  # rank 0's collectives: eager twice, compiled twice
                        model(x)
                dist.barrier()
                return
        with torch.no_grad():
            expected = model(x)
            compiled = torch.compile(model, backend="trt_subgraph", options=options)
            got = compiled(x)
            fresh = torch.randn(4, width)
            again = compiled(fresh)
            expected_again = model(fresh)
        report = trt_subgraph.last_report()
        result = {
            "alone": ranks._ALONE,
            "error": (got - expected).abs().max().item(),
            "error_again": (again - expected_again).abs().max().item(),
            "close": torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
            and torch.allclose(again, expected_again, rtol=1e-5, atol=1e-5),
            "report": report.to_dict(),
        }
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        if case == "alone":
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(tmp_path, world: int, case: str = "same", ranks_done: int | None = None, **options) -> list[dict]:
    options = {"engine": "inductor", "cache_dir": None, "build_workers": 0, **options}
    store = tmp_path / f"store-{len(list(tmp_path.glob('store-*')))}"  # a new rendezvous file for each launch
    store.touch()
    mp.spawn(_rank, args=(world, str(store), str(tmp_path), case, options), nprocs=world)
    results = []
    for rank in range(world if ranks_done is None else ranks_done):
        with open(tmp_path / f"rank{rank}.json") as f:
            results.append(json.load(f))
    for rank, result in enumerate(results):
        assert result["close"], f"rank {rank} differs from eager by {result['error']}, {result['error_again']}"
    return results


def _statuses(results: list[dict]) -> dict[str, list[tuple[str, int | None]]]:
    """{fingerprint: [(status, rank) on each rank]}"""
    found: dict[str, list[tuple[str, int | None]]] = {}
    for result in results:
        for rec in result["report"]["subgraphs"]:
            found.setdefault(rec["fingerprint"], []).append((rec["status"], rec["rank"]))
    return found


def _assert_built_once(results: list[dict]) -> None:
    world = len(results)
    found = _statuses(results)
    assert len(found) >= 2, found
    for fingerprint, statuses in found.items():
        assert len(statuses) == world, (fingerprint, statuses)
        builders = [rank for rank, (status, _) in enumerate(statuses) if status == "built"]
        assert len(builders) == 1, (fingerprint, statuses)
        assert all(owner == builders[0] for _, owner in statuses), (fingerprint, statuses)
        assert sorted(status for status, _ in statuses) == ["built"] + ["received"] * (world - 1)
    for result in results:
        totals = result["report"]["totals"]
        assert totals["builds"] + totals["received"] == totals["unique_subgraphs"]
    ran = results[0]["report"]["fallback_ops"]  # each all-reduce reduces its piece's output in place
    assert "_c10d_functional.all_reduce_.default" in ran and "_c10d_functional.all_reduce.default" not in ran


def test_two_ranks_build_each_unique_subgraph_once_and_match_eager(tmp_path):
    results = _run(tmp_path, 2)
    _assert_built_once(results)
    owners = {owner for statuses in _statuses(results).values() for _, owner in statuses}
    assert owners == {0, 1}  # both ranks built a share


@pytest.mark.slow
def test_four_ranks_build_each_unique_subgraph_once_and_match_eager(tmp_path):
    _assert_built_once(_run(tmp_path, 4))


def test_received_artifacts_are_cached_so_every_rank_starts_warm(tmp_path):
    _assert_built_once(_run(tmp_path, 2, cache_dir="per rank"))
    for result in _run(tmp_path, 2, cache_dir="per rank"):  # new processes, the same caches
        totals = result["report"]["totals"]
        assert totals["builds"] == totals["received"] == 0, totals


def test_a_rank_whose_builds_fail_leaves_them_to_the_others(tmp_path):
    results = _run(tmp_path, 2, case="fail")
    for statuses in _statuses(results).values():
        if statuses[0][1] == 0:  # rank 0's share: it failed, rank 1 built it itself
            assert statuses == [("fallback", 0), ("built", 1)], statuses
        else:  # rank 1's share reached rank 0 (only building fails there)
            assert statuses == [("received", 1), ("built", 1)], statuses


def test_a_rank_with_the_plan_cached_takes_part_so_the_others_do_not_wait(tmp_path):
    """Rank 0 finds the graph's plan in its disk cache, rank 1's cache is empty: rank 0 builds
    nothing and joins the agreement with no keys, so rank 1 builds at once and neither rank gives
    up splitting (before, rank 1 waited the agreement's time-out, then built alone from then on)."""
    import shutil

    _run(tmp_path, 2, cache_dir="per rank")
    shutil.rmtree(tmp_path / "cache1")
    warm, cold = _run(tmp_path, 2, cache_dir="per rank", case="plan_or_cold")
    assert warm["report"]["regions"]["plan"] == "cache hit" and warm["report"]["totals"]["builds"] == 0
    assert cold["report"]["totals"]["builds"] == cold["report"]["totals"]["unique_subgraphs"] > 0
    assert warm["alone"] is None and cold["alone"] is None


def test_ranks_compiling_different_graphs_build_alone(tmp_path):
    results = _run(tmp_path, 2, case="differ")
    found = _statuses(results)
    assert len(found) >= 3, found  # the blocks' pieces differ, the residual adds are alike
    for statuses in found.values():
        assert all(status == ("built", None) for status in statuses), statuses


def test_a_graph_that_one_rank_compiles_alone_is_built_there_after_a_wait(tmp_path):
    (result,) = _run(tmp_path, 2, case="alone", ranks_done=1)
    for statuses in _statuses([result]).values():
        assert statuses == [("built", None)], statuses


def test_rank_split_off_builds_every_subgraph_on_every_rank(tmp_path):
    results = _run(tmp_path, 2, rank_split_builds="off")
    for statuses in _statuses(results).values():
        assert statuses == [("built", None), ("built", None)], statuses


def test_a_block_on_another_process_group_gets_its_own_region(tmp_path):
    same = _run(tmp_path, 2, engine="eager")
    groups = _run(tmp_path, 2, case="groups", engine="eager")
    assert same[0]["report"]["regions"]["lowered"] == 2  # the blocks and the residual adds
    assert groups[0]["report"]["regions"]["lowered"] == 3  # the block on the other group alone


def test_a_functional_all_gather_compiles_and_matches_eager(tmp_path):
    results = _run(tmp_path, 2, case="gather", engine="eager")
    ran = results[0]["report"]["fallback_ops"]
    assert any(op.startswith("_c10d_functional.all_gather_into_tensor") for op in ran), ran


def _graph_with_all_reduces(sources: list[str]) -> tuple[torch.fx.GraphModule, list[torch.fx.Node]]:
    """A graph over x (4 x 8) and w (8 x 8) that all-reduces each of `sources`: "mm" (a new
    tensor), "shared" (a new tensor another op reads too), "input" (x itself), "view" (a
    view of x), "strided" (a transposed new tensor)."""
    aten, c10d = torch.ops.aten, torch.ops._c10d_functional
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    x.meta["val"], w.meta["val"] = torch.randn(4, 8), torch.randn(8, 8)
    outputs, reduces = [], []
    for source in sources:
        if source in ("mm", "shared"):
            node = graph.call_function(aten.mm.default, (x, w))
            node.meta["val"] = torch.randn(4, 8)
            if source == "shared":
                outputs.append(graph.call_function(aten.relu.default, (node,)))
        elif source == "input":
            node = x
        elif source == "view":
            node = graph.call_function(aten.view.default, (x, [8, 4]))
            node.meta["val"] = torch.randn(8, 4)
        else:
            node = graph.call_function(aten.t.default, (graph.call_function(aten.mm.default, (x, w)),))
            node.meta["val"] = torch.randn(8, 4).t()
        reduce = graph.call_function(c10d.all_reduce.default, (node, "sum", "0"))
        reduces.append(reduce)
        outputs.append(graph.call_function(c10d.wait_tensor.default, (reduce,)))
    graph.output(tuple(outputs))
    return torch.fx.GraphModule(torch.nn.Module(), graph), reduces


def test_all_reduce_runs_in_place_only_on_a_new_tensor_nothing_else_reads():
    from trt_subgraph.collectives import reinplace_all_reduces

    sources = ["mm", "shared", "input", "view", "strided"]
    gm, reduces = _graph_with_all_reduces(sources)
    assert reinplace_all_reduces(gm, {}) == 1
    turned = {s: str(r.target) for s, r in zip(sources, reduces)}
    assert turned == {
        "mm": "_c10d_functional.all_reduce_.default",
        **{s: "_c10d_functional.all_reduce.default" for s in sources[1:]},
    }


def test_fresh_outputs_of_a_piece_share_memory_with_nothing():
    """A piece output may be reduced in place only where it is made inside the piece and no
    other output reaches its memory (through a view, or ``_unsafe_view``, which shares memory
    though its schema says it does not)."""
    from trt_subgraph.collectives import fresh_outputs

    aten = torch.ops.aten

    def piece(*outputs: str) -> torch.fx.GraphModule:
        graph = torch.fx.Graph()
        x, w = graph.placeholder("x"), graph.placeholder("w")
        mm = graph.call_function(aten.mm.default, (x, w))
        made = {
            "mm": mm,
            "unsafe_view": graph.call_function(aten._unsafe_view.default, (mm, [2, 2, 8])),
            "view": graph.call_function(aten.view.default, (mm, [2, 2, 8])),
            "other": graph.call_function(aten.mm.default, (w, w)),
            "input": x,
            "input_view": graph.call_function(aten.view.default, (x, [32])),
        }
        graph.output(tuple(made[o] for o in outputs))
        return torch.fx.GraphModule(torch.nn.Module(), graph)

    assert fresh_outputs(piece("mm", "other")) == {0, 1}
    assert fresh_outputs(piece("unsafe_view", "other")) == {0, 1}  # mm itself is no output
    assert fresh_outputs(piece("mm", "unsafe_view")) == frozenset()  # one memory, two outputs
    assert fresh_outputs(piece("view", "mm", "other")) == {2}
    assert fresh_outputs(piece("input", "input_view", "other")) == {2}


def test_balance_gives_largest_first_to_the_least_loaded_rank():
    sizes = {"a": 10, "b": 7, "c": 5, "d": 4, "e": 1}
    assert ranks.balance(sizes, 2) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    assert ranks.balance(sizes, 1) == dict.fromkeys(sizes, 0)
    assert ranks.balance({}, 3) == {}


def test_agreement_splits_among_the_ranks_that_need_the_same_keys(monkeypatch):
    """Ranks 0 and 2 need {a, b}, rank 1 {c}, each building one at a time: 0 and 2 split
    theirs, 1 owns its own; at the exchange a key's bytes win over another owner's failure.
    Where every rank builds all its misses at once (its slots), nobody splits that graph."""
    every = [([("a", 5), ("b", 3)], 1), ([("c", 1)], 1), ([("a", 5), ("b", 3)], 1)]
    monkeypatch.setattr(ranks, "world", lambda: (2, 3))
    monkeypatch.setattr(ranks, "_gather", lambda use, value, size: every if use == "agree" else payloads)
    assert ranks.owners({"a": 5, "b": 3}) == {"a": 0, "b": 2}
    payloads = [{"a": b"x"}, {"c": None}, {"b": b"y", "c": b"z"}]
    assert ranks.exchange({"b": b"y"}) == {"a": b"x", "b": b"y", "c": b"z"}
    every = [([("a", 5), ("b", 3)], 2), ([("c", 1)], 1), ([("a", 5), ("b", 3)], 2)]
    assert ranks.owners({"a": 5, "b": 3}, slots=2) is None and ranks._ALONE is None  # this graph only
    every = [([("a", 5), ("b", 3)], 2), ([("c", 1)], 1), ([("a", 5), ("b", 3)], 1)]
    assert ranks.owners({"a": 5, "b": 3}) == {"a": 0, "b": 2}  # rank 2 would queue a build
    every = [([("a", 5)], 1), ([("c", 1)], 1), ([], 1)]  # nobody shares: everyone builds alone from now on
    monkeypatch.setattr(ranks, "_ALONE", None)
    assert ranks.owners({"a": 5}) is None and ranks._ALONE is not None
    every = [([], 1), ([("c", 1)], 1), ([], 1)]  # one rank misses a subgraph, the others nothing: no verdict
    monkeypatch.setattr(ranks, "_ALONE", None)
    assert ranks.owners({}) is None and ranks._ALONE is None


@pytest.mark.parametrize("symbolic", [False, True])
def test_a_graph_with_symbolic_subgraphs_counts_one_build_at_a_time(monkeypatch, symbolic):
    """Subgraphs with symbolic sizes never build in workers: the ranks must not take this
    process's workers for slots that would build them at once."""
    from types import SimpleNamespace

    from trt_subgraph import build
    from trt_subgraph import symbolic as symbolic_module
    from trt_subgraph.engines.inductor import InductorEngine

    asked = []
    monkeypatch.setattr(ranks, "world", lambda: (0, 2))
    monkeypatch.setattr(ranks, "owners", lambda sizes, slots: asked.append(slots))
    monkeypatch.setattr(symbolic_module, "is_symbolic", lambda inputs: symbolic)
    builds = build.Builds(InductorEngine(), Options.from_user({"build_workers": 3}), pool=object())
    firsts = [SimpleNamespace(background=False, key=k, sub=SimpleNamespace(num_ops=5, example_inputs=[])) for k in "ab"]
    assert builds._split(firsts) is None
    assert asked == [1 if symbolic else 4]


def test_rank_split_builds_option_is_checked():
    assert Options.from_user({}).rank_split_builds == "auto"
    assert Options.from_user({"rank_split_builds": "off"}).rank_split_builds == "off"
    with pytest.raises(ValueError, match=r"'rank_split_builds' must be one of \['auto', 'off'\]"):
        Options.from_user({"rank_split_builds": True})


def test_without_a_process_group_nothing_is_split():
    assert not dist.is_initialized()
    assert ranks.world() is None
    assert ranks.owners({"a": 1}) is None


def test_a_timed_out_distributed_case_stops_its_ranks_and_keeps_their_stacks(tmp_path, monkeypatch):
    """torchrun starts its ranks in sessions of their own: at the case's time-out they still stop
    (SIGTERM, which torchrun passes on), and the case's log keeps their output and thread stacks."""
    import subprocess
    import sys
    import uuid

    marker = f"TRT_SUBGRAPH_TEST_CASE={uuid.uuid4().hex}"
    name, value = marker.split("=")
    argv = ["--device", "cpu", "--tiny", "--nproc", "2", "--modes", "tp", "--backends", "trt_subgraph"]
    done = subprocess.run(
        [sys.executable, "-m", "trt_subgraph.bench.distributed", *argv, "--timeout", "12", "--out", str(tmp_path)],
        env={**os.environ, name: value},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    (row,) = json.loads((tmp_path / "distributed.json").read_text())["rows"]
    assert row["error"].startswith("timed out after 12 s")
    log = (tmp_path / "tp-trt_subgraph.log").read_text()
    assert "(most recent call first)" in log  # the ranks' stacks (each rank dumps once it has started)
    left = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes().split(b"\0"):
                left.append(environ.parent.name)
        except OSError:
            pass
    assert left == [], f"processes of the case still running: {left}"


def test_distributed_bench_runs_tensor_parallel_decoder_on_cpu(tmp_path):
    from trt_subgraph.bench import distributed

    argv = ["--device", "cpu", "--tiny", "--nproc", "2", "--modes", "tp", "--backends", "eager,inductor,trt_subgraph"]
    assert distributed.main([*argv, "--iters", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "distributed.json").read_text())
    backends = [(r["mode"], r["backend"]) for r in result["rows"]]
    assert backends == [("tp", "eager"), ("tp", "inductor"), ("tp", "trt_subgraph")]
    for row in result["rows"]:
        assert row["error"] is None and row["within_tolerance"], row
        assert row["max_rel_err"] < 1e-4 and row["rank_max_abs_diff"] == 0.0, row
        assert len(row["first_call_s_per_rank"]) == 2
    trt = result["rows"][-1]
    assert len(trt["builds_per_rank"]) == 2 and sum(trt["builds_per_rank"]) >= trt["unique_subgraphs"] > 0, trt
    assert trt["background_wait_s"] >= 0.0
    assert "| tp | inductor |" in (tmp_path / "distributed.md").read_text()


def test_distributed_bench_rejects_heads_that_do_not_divide():
    from trt_subgraph.bench import distributed
    from trt_subgraph.bench.models import build

    model, _ = build("decoder", depth=1, width=32, heads=4, seq=8)
    with pytest.raises(ValueError, match="4 heads and MLP hidden size 88 must divide by 3 ranks"):
        distributed.tensor_parallel(model, 0, 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backends", "trt_subgraph-remote"], "needs --remote-cache URL"),
        (["--remote-cache", "http://host:6379"], "--remote-cache: remote cache URL 'http://host:6379': scheme"),
        (["--remote-cache", "redis://"], "names no host"),
        (["--modes", "pp"], "--modes: unknown ['pp']; allowed: tp, dp"),
        (["--backends", "bogus"], "--backends: unknown ['bogus']; allowed:"),
        (["--nproc", "3", "--modes", "tp"], "tp: 4 heads and MLP hidden size 88 must divide by 3 ranks (set --heads"),
    ],
)
def test_distributed_bench_refuses_bad_arguments_before_launching(argv, message, capsys, tmp_path):
    from trt_subgraph.bench import distributed

    with pytest.raises(SystemExit) as stopped:
        distributed.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), *argv])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing launched, nothing written


def test_inductor_artifacts_of_other_gpus_have_other_keys():
    """Inductor's generated code sets its CUDA device by index: ranks on cuda:0 and cuda:1 must
    not share an artifact (fake tensors: no GPU needed)."""
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    from trt_subgraph.engines.inductor import InductorEngine

    with FakeTensorMode():
        first, second = torch.empty(2, device="cuda:0"), torch.empty(2, device="cuda:1")
    engine = InductorEngine()
    keys = [engine.codegen_key(SimpleNamespace(example_inputs=[x])) for x in (first, second)]
    assert keys[0]["cuda"]["indexes"] == [0] and keys[1]["cuda"]["indexes"] == [1]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_split_the_decoders_builds(tmp_path):
    from trt_subgraph.bench import distributed

    argv = ["--device", "cuda", "--tiny", "--nproc", "2", "--backends", "trt_subgraph,trt_subgraph-alone"]
    assert distributed.main([*argv, "--iters", "5", "--warmup", "2", "--out", str(tmp_path)]) == 0
    for row in json.loads((tmp_path / "distributed.json").read_text())["rows"]:
        assert row["within_tolerance"] and row["rank_max_abs_diff"] == 0.0, row
        unique, builds = row["unique_subgraphs"], row["builds_per_rank"]
        if row["backend"] == "trt_subgraph":  # each GPU sees itself as cuda:0: one build per subgraph
            assert sum(builds) == unique and sum(row["received_per_rank"]) == unique, row
        else:
            assert builds == [unique, unique], row


def test_distributed_bench_ranks_import_this_trt_subgraph_whatever_the_working_directory_holds(tmp_path, monkeypatch):
    """torchrun starts each rank with ``python -m``, which puts the working directory first on
    the import path; a directory holding another trt_subgraph must not shadow this one."""
    from trt_subgraph.bench import distributed

    shadow = tmp_path / "checkout"
    (shadow / "trt_subgraph").mkdir(parents=True)
    (shadow / "trt_subgraph" / "__init__.py").write_text("raise ImportError('the shadowing checkout was imported')\n")
    monkeypatch.chdir(shadow)
    argv = ["--device", "cpu", "--tiny", "--nproc", "2", "--modes", "tp", "--backends", "eager"]
    assert distributed.main([*argv, "--iters", "2", "--warmup", "1", "--out", str(tmp_path / "out")]) == 0
    (row,) = json.loads((tmp_path / "out" / "distributed.json").read_text())["rows"]
    assert row["error"] is None and row["within_tolerance"], row
