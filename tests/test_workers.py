"""Concurrent builds in worker processes: same outputs and counts as building one after another,
workers that crash or hang fall back to a build in the main process, artifacts load at once."""

from __future__ import annotations

import logging
import operator
import os
import threading
import time

import pytest
import torch
import torch.nn as nn

import trt_subgraph
from trt_subgraph import _compat, build, workers
from trt_subgraph.bench import models
from trt_subgraph.options import Options
from trt_subgraph.workers import WorkerError, WorkerPool

TIGHT = dict(rtol=1e-5, atol=1e-5)
EXACT = dict(rtol=0, atol=0)


def fresh_like(inputs):
    return tuple(torch.randint_like(x, 0, 100) if not x.is_floating_point() else torch.randn_like(x) for x in inputs)


def encoder():
    """3 unique subgraphs: the block (2 instances) and glue (embeddings, head)."""
    return models.build("encoder", depth=2, width=32, batch=2, seq=8)


class Scaled(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.linear(x)) * 0.5 + x


class Gated(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.gate, self.up = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return torch.sigmoid(self.gate(x)) * self.up(x)


class Normed(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return self.linear(self.norm(x)).tanh()


class ThreeKinds(nn.Module):
    """Blocks of three kinds, two of each: three unique block subgraphs, no glue."""

    def __init__(self, width=16):
        super().__init__()
        self.scaled = nn.ModuleList([Scaled(width) for _ in range(2)])
        self.gated = nn.ModuleList([Gated(width) for _ in range(2)])
        self.normed = nn.ModuleList([Normed(width) for _ in range(2)])

    def forward(self, x):
        for block in [*self.scaled, *self.gated, *self.normed]:
            x = block(x)
        return x


def compile_and_run(model, inputs, **options):
    options = {"engine": "inductor", "cache_dir": None, **options}
    with torch.no_grad():
        return torch.compile(model, backend="trt_subgraph", options=options)(*inputs)


def counts(report):
    keys = ("unique_subgraphs", "instances", "builds", "memory_hits", "disk_hits", "fallbacks", "reuses")
    return {k: report.totals[k] for k in keys}


@pytest.fixture
def no_stealing(monkeypatch):
    """The main process builds only the largest subgraph and leaves every other one to the
    workers, however late they start (by default it takes what no worker has started yet)."""
    monkeypatch.setattr(build.Builds, "_steal", lambda self, jobs: None)


def test_concurrent_builds_give_the_same_outputs_and_counts_as_sequential(no_stealing):
    model, x = ThreeKinds().eval(), (torch.randn(4, 16),)
    with torch.no_grad():
        expected = model(*x)

    sequential = compile_and_run(model, x, build_workers=0)
    report = trt_subgraph.last_report()
    assert report.totals["worker_builds"] == 0
    sequential_counts = counts(report)

    torch.compiler.reset()
    trt_subgraph.reset()
    concurrent = compile_and_run(model, x, build_workers=2)
    report = trt_subgraph.last_report()
    assert counts(report) == sequential_counts
    assert sequential_counts["builds"] == sequential_counts["unique_subgraphs"] == 3
    # the main process built the largest, the workers the other two
    assert report.totals["worker_builds"] == 2
    assert not max(report.subgraphs, key=lambda s: s.nodes).worker
    torch.testing.assert_close(concurrent, expected, **TIGHT)
    torch.testing.assert_close(concurrent, sequential, **EXACT)  # the same kernels


def test_worker_builds_are_stored_under_the_same_keys_and_load_concurrently(tmp_path, monkeypatch, no_stealing):
    from trt_subgraph.engines.inductor import InductorEngine

    model, x = ThreeKinds().eval(), (torch.randn(4, 16),)
    with torch.no_grad():
        expected = model(*x)
    cold = compile_and_run(model, x, build_workers=2, cache_dir=tmp_path)
    assert trt_subgraph.last_report().totals["worker_builds"] == 2

    torch.compiler.reset()
    trt_subgraph.reset()  # forgets the artifacts in memory; the disk cache stays
    loaded_in = []
    real_deserialize = InductorEngine.deserialize

    def deserialize(self, payload, sub):
        loaded_in.append(threading.current_thread().name)
        return real_deserialize(self, payload, sub)

    monkeypatch.setattr(InductorEngine, "deserialize", deserialize)
    warm = compile_and_run(model, x, build_workers=0, cache_dir=tmp_path, plan_cache=False)  # lowered again
    report = trt_subgraph.last_report()
    assert report.totals["disk_hits"] == 3 and report.totals["builds"] == 0
    assert len(loaded_in) == 3 and all(name.startswith("trt_subgraph-fetch") for name in loaded_in)
    torch.testing.assert_close(cold, expected, **TIGHT)
    torch.testing.assert_close(warm, cold, **EXACT)


def test_a_worker_that_dies_during_its_build_falls_back_to_this_process(monkeypatch, caplog, no_stealing):
    real_submit = WorkerPool.submit
    monkeypatch.setattr(WorkerPool, "submit", lambda self, fn, *args, **kw: real_submit(self, os._exit, 3))
    model, x = ThreeKinds().eval(), (torch.randn(4, 16),)
    with caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        out = compile_and_run(model, x, build_workers=2)
    with torch.no_grad():
        torch.testing.assert_close(out, model(*x), **TIGHT)
    report = trt_subgraph.last_report()
    assert report.totals["builds"] == 3 and report.totals["worker_builds"] == 0 and report.totals["fallbacks"] == 0
    assert "2 build(s) in worker processes failed" in caplog.text and "exited with code 3" in caplog.text


def test_a_hung_worker_is_killed_and_its_build_falls_back(monkeypatch, caplog, no_stealing):
    workers.start(2).timeout = 3.0
    real_submit = WorkerPool.submit
    monkeypatch.setattr(WorkerPool, "submit", lambda self, fn, *args, **kw: real_submit(self, time.sleep, 3600))
    model, x = ThreeKinds().eval(), (torch.randn(4, 16),)
    with caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        out = compile_and_run(model, x, build_workers=2)
    with torch.no_grad():
        torch.testing.assert_close(out, model(*x), **TIGHT)
    assert trt_subgraph.last_report().totals["builds"] == 3
    assert "took over 3 s and was killed" in caplog.text


def test_background_glue_is_swapped_in_at_a_later_call_with_equal_outputs(monkeypatch):
    """The encoder's block builds before the first call returns; its glue (embeddings, head)
    runs in PyTorch until workers have built it, and a later call swaps the engines in."""
    from trt_subgraph.runtime import PieceRunner

    bound = []
    real_bind = PieceRunner.bind

    def bind(self, runner):
        bound.append((self.fingerprint, runner is self.canonical))
        real_bind(self, runner)

    monkeypatch.setattr(PieceRunner, "bind", bind)
    model, inputs = encoder()
    options = {"engine": "inductor", "cache_dir": None, "build_workers": 8, "background_glue": True}
    compiled = torch.compile(model, backend="trt_subgraph", options=options)
    x = fresh_like(inputs)
    with torch.no_grad():
        expected = model(*x)
        first = compiled(*x)
        assert workers.pool().size == 2  # 3 unique regions, one of them built by this process
        report = trt_subgraph.last_report()
        glue = {s.fingerprint for s in report.subgraphs if s.status == "building"}
        assert len(glue) == 2 and report.totals["builds"] == 1
        assert not any(fingerprint in glue for fingerprint, _ in bound)  # PyTorch runs the glue meanwhile
        torch.testing.assert_close(first, expected, **TIGHT)
        deadline = time.monotonic() + 600
        while report.totals["building"] and time.monotonic() < deadline:
            y = fresh_like(inputs)
            torch.testing.assert_close(compiled(*y), model(*y), **TIGHT)
            time.sleep(0.2)
        assert report.totals["building"] == 0
        assert report.totals["builds"] == 3 and report.totals["worker_builds"] == 2 and report.totals["reuses"] == 1
        assert {fingerprint for fingerprint, canonical in bound if not canonical} >= glue  # the engines swapped in
        torch.testing.assert_close(compiled(*x), expected, **TIGHT)


def test_closing_the_pool_fails_its_queued_and_running_jobs_at_once():
    """``trt_subgraph.reset()`` closes the pool while background builds may be queued: every
    Future completes (before, queued ones never did, and the end of the process waited for them)."""
    pool = WorkerPool(1)
    running = pool.submit(time.sleep, 60)
    queued = pool.submit(operator.add, 2, 3)
    pool.close()
    for future in (queued, running):
        with pytest.raises(WorkerError):
            future.result(timeout=30)


def test_the_pool_runs_jobs_reports_failures_and_replaces_a_dead_worker():
    pool = WorkerPool(1)
    try:
        assert pool.submit(operator.add, 2, 3).result() == 5
        with pytest.raises(WorkerError, match="ValueError: invalid literal"):
            pool.submit(int, "not a number").result()
        with pytest.raises(WorkerError, match="exited with code 7"):
            pool.submit(os._exit, 7).result()
        assert pool.submit(operator.mul, 6, 7).result() == 42  # a new process took over
    finally:
        pool.close()
    assert all(w.proc is None for w in pool.workers)


def test_a_queued_job_can_be_cancelled_until_a_worker_takes_it():
    pool = WorkerPool(1)
    try:
        busy = pool.submit(time.sleep, 2)
        queued = pool.submit(operator.add, 1, 1)
        assert queued.cancel()
        busy.result()
        assert pool.submit(operator.add, 2, 2).result() == 4
    finally:
        pool.close()


def test_idle_workers_exit_and_start_again_for_the_next_job():
    pool = WorkerPool(1, idle=0.5)
    try:
        assert pool.submit(operator.add, 1, 2).result() == 3
        deadline = time.monotonic() + 30
        while pool.workers[0].proc is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool.workers[0].proc is None
        assert pool.submit(operator.add, 2, 2).result() == 4
    finally:
        pool.close()


def test_a_worker_refuses_a_subgraph_it_does_not_rebuild_exactly():
    """The bytes a worker returns are stored under the main process's key, so a worker whose
    fingerprint, engine settings, code-generation or device key differ builds nothing."""
    from trt_subgraph.engines.inductor import InductorEngine

    model, inputs = encoder()
    sub = trt_subgraph.capture(model, *inputs).unique[0].sub
    engine = InductorEngine()
    parts = build.ArtifactStore(engine, Options(cache=False)).key_parts(sub)
    task = {
        "engine": engine,
        "graph": _compat.graph_pickle(sub.gm, keep_meta=lambda key: key == "val"),
        "input_kinds": sub.input_kinds,
        "settings": _compat.compile_settings(),
    }
    pool = WorkerPool(1)
    try:
        wrong = {**parts, "fingerprint": "0" * 32, "settings": {**parts["settings"], "inductor_config": "x"}}
        with pytest.raises(WorkerError, match="the worker's fingerprint, settings differ"):
            pool.submit(build.build_in_worker, {**task, "parts": wrong}).result()
        payload = pool.submit(build.build_in_worker, {**task, "parts": parts}).result()
    finally:
        pool.close()
    x = [
        torch.randn(v.shape, dtype=v.dtype) if v.dtype.is_floating_point else torch.ones(v.shape, dtype=v.dtype)
        for v in sub.example_inputs
    ]
    torch.testing.assert_close(engine.deserialize(payload, sub)(*x), sub.gm(*x), **TIGHT)


@pytest.mark.parametrize("value", [-1, True, 1.5, "2"])
def test_build_workers_must_be_a_count(value):
    with pytest.raises(ValueError, match="'build_workers' must be an int >= 0"):
        Options.from_user({"build_workers": value})


@pytest.mark.parametrize("value", [1, "yes", None])
def test_background_glue_must_be_a_bool(value):
    with pytest.raises(ValueError, match="'background_glue' must be a bool"):
        Options.from_user({"background_glue": value})


def test_default_workers_leave_small_machines_to_the_main_process(monkeypatch):
    for cores, expected in [(1, 0), (2, 0), (3, 0), (4, 2), (16, 8), (64, 8)]:
        monkeypatch.setattr(workers, "usable_cores", lambda cores=cores: cores)
        assert workers.default_workers() == expected


def test_inductor_artifacts_are_aot_where_torch_has_them():
    from trt_subgraph.engines.inductor import InductorEngine

    model, inputs = encoder()
    sub = min((u.sub for u in trt_subgraph.capture(model, *inputs).unique), key=lambda s: s.num_ops)
    artifact = InductorEngine().build(sub, [])
    aot = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10)
    assert _compat.aot_artifacts() == aot
    assert (type(artifact).__name__ == "AOTCompiledArtifact") == aot


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_background_glue_swap_records_the_cuda_graphs_again(monkeypatch):
    from trt_subgraph.runtime import CUDAGraphForward

    dropped = []
    real_invalidate = CUDAGraphForward.invalidate

    def invalidate(self):
        dropped.append(len(self.graphs))
        real_invalidate(self)

    monkeypatch.setattr(CUDAGraphForward, "invalidate", invalidate)
    model, inputs = encoder()
    model = model.cuda()
    options = {"engine": "inductor", "cache_dir": None, "build_workers": 2, "background_glue": True}
    compiled = torch.compile(model, backend="trt_subgraph", options=options)
    with torch.no_grad():
        x = tuple(t.cuda() for t in fresh_like(inputs))
        expected = model(*x)
        torch.testing.assert_close(compiled(*x), expected, **TIGHT)
        report = trt_subgraph.last_report()
        assert report.cudagraphs.startswith("on") and report.totals["building"] == 2
        deadline = time.monotonic() + 600
        while report.totals["building"] and time.monotonic() < deadline:  # replays the graph meanwhile
            torch.testing.assert_close(compiled(*x), expected, **TIGHT)
            time.sleep(0.2)
        assert report.totals["building"] == 0 and dropped  # one swap per finished build, or one for both
        for _ in range(3):  # uncaptured, recorded, replayed: with the glue's engines
            torch.testing.assert_close(compiled(*x), expected, **TIGHT)


_ONE_CALL = r"""
import json, sys, torch, trt_subgraph
from trt_subgraph.bench import models

model, inputs = models.build("encoder", depth=2, width=32, batch=2, seq=8)
options = {"engine": "inductor", "cache_dir": sys.argv[1], "build_workers": 2, "background_glue": True}
with torch.no_grad():
    torch.compile(model, backend="trt_subgraph", options=options)(*inputs)
report = trt_subgraph.last_report()
print(json.dumps({"statuses": sorted(s.status for s in report.subgraphs), "plan": report.regions.get("plan")}))
"""


def test_a_process_reset_while_glue_builds_ends_without_waiting(tmp_path):
    """``trt_subgraph.reset()`` drops the compiled graphs and stops the workers: the end of the
    process does not wait for their builds (it waited 300 s for builds that could never end)."""
    import subprocess
    import sys

    script = _ONE_CALL + "trt_subgraph.reset()\nprint('reset', flush=True)\n"
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "cache")], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0 and "reset" in done.stdout, done.stderr[-2000:]
    assert time.monotonic() - start < 120, "the end of the process waited for dropped builds"
    assert "did not finish" not in done.stderr


def test_a_process_that_ends_while_glue_builds_leaves_it_in_the_disk_cache(tmp_path):
    """One call, then the end of the process, while the glue still builds in the background: the
    end waits for those builds, so that the next process finds every engine in the disk cache."""
    import json
    import subprocess
    import sys

    def one_call():
        done = subprocess.run(
            [sys.executable, "-c", _ONE_CALL, str(tmp_path / "cache")], capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold = one_call()
    assert cold["statuses"].count("building") == 2, cold  # the process ended with its glue building
    warm = one_call()
    assert warm["plan"] == "cache hit" and set(warm["statuses"]) == {"disk_hit"}, warm


def test_workers_import_this_trt_subgraph_whatever_the_working_directory_holds(tmp_path, monkeypatch):
    """A checkout of another trt_subgraph in the working directory must not shadow the one this
    process runs (``python -c`` puts the working directory first on a child's import path)."""
    shadow = tmp_path / "trt_subgraph"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the shadowing checkout was imported')\n")
    monkeypatch.chdir(tmp_path)
    pool = WorkerPool(1)
    try:
        assert pool.submit(operator.add, 2, 3).result() == 5
    finally:
        pool.close()
