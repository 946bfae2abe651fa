"""Tests of the benchmark models and the `trt-subgraph bench` tool (CPU, tiny sizes).

The end-to-end tests spawn real case processes (one per case, as the tool does), with the
eager backend and torch.compile's "eager" backend to stay fast; inductor is not needed to
test the plumbing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trt_subgraph.bench import models, output, runner
from trt_subgraph.bench.backends import find_blocks
from trt_subgraph.cli import bench as cli
from trt_subgraph.cli.bench import add_cli

SMALL = dict(depth=2, width=32, batch=2, seq=8, image=32)


@pytest.fixture(autouse=True)
def _bytecode_present(monkeypatch):
    """Sweeps here never compile bytecode into ~/.cache, whatever the environment ships; the
    bytecode tests below replace this."""
    monkeypatch.setattr(runner, "has_bytecode", lambda prefix, sources=None: True)


# ---------------------------------------------------------------------------------------------
# models


def test_build_rejects_unknown_model_listing_allowed_names():
    with pytest.raises(
        ValueError, match="unknown model 'bert'; allowed: encoder, vit, resnet, decoder, mlp, efficientnet, mobilenetv3"
    ):
        models.build("bert")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="encoder", depth=0), "depth must be a positive int"),
        (dict(name="encoder", width=48, heads=5), "divisible by heads"),
        (dict(name="vit", image=36), "divisible by patch 8"),
        (dict(name="resnet", depth=(1, 2)), "4 ints"),
        (dict(name="mlp", dtype="float64"), "allowed: float32, float16, bfloat16"),
    ],
)
def test_build_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.build(**kwargs)


@pytest.mark.parametrize(("name", "norm_first"), [(m, True) for m in models.MODELS] + [("encoder", False)])
def test_small_models_match_between_eager_and_compiled(name, norm_first):
    model, inputs = models.build(name, norm_first=norm_first, seed=3, **SMALL)
    assert not model.training
    # Fresh random inputs of the same kind as the example inputs.
    x = inputs[0]
    fresh = torch.randint_like(x, 0, 1000) if not x.is_floating_point() else torch.randn_like(x)
    with torch.no_grad():
        ref = model(fresh)
        torch.compiler.reset()
        out = torch.compile(model, backend="eager")(fresh)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_build_is_deterministic_and_seed_dependent():
    a, xa = models.build("decoder", **SMALL, seed=1)
    b, xb = models.build("decoder", **SMALL, seed=1)
    c, _ = models.build("decoder", **SMALL, seed=2)
    assert torch.equal(xa[0], xb[0])
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.layers[0].q_proj.weight, c.layers[0].q_proj.weight)


def test_build_dtype_casts_weights_and_float_inputs_only():
    model, (ids,) = models.build("encoder", **{**SMALL, "seq": 4}, dtype="bfloat16")
    assert ids.dtype == torch.int64
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _, (img,) = models.build("resnet", depth=1, width=8, batch=2, image=32, dtype=torch.float16)
    assert img.dtype == torch.float16


def test_find_blocks_finds_the_repeated_blocks():
    enc, _ = models.build("encoder", **{**SMALL, "depth": 3})
    assert find_blocks(enc) == list(enc.layers)
    res, _ = models.build("resnet", depth=(1, 2, 1, 3), width=8, batch=2, image=32)
    blocks = find_blocks(res)
    assert len(blocks) == 7 and all(isinstance(b, models.Bottleneck) for b in blocks)
    # The first block of each stage downsamples (a different structure); the others do not.
    assert [b.downsample is not None for b in res.layer4] == [True, False, False]
    mlp, _ = models.build("mlp", width=16, batch=2)
    assert find_blocks(mlp) == []


def test_convnext_has_convnext_t_layout_and_its_blocks_are_found():
    model, (x,) = models.build("convnext", depth=2, width=16, batch=2, image=32)
    blocks = find_blocks(model)
    assert len(blocks) == 8 and all(isinstance(b, models.ConvNeXtBlock) for b in blocks)
    assert isinstance(model.stages[0].downsample, torch.nn.Identity)
    assert [stage.downsample[1].stride for stage in model.stages[1:]] == [(2, 2)] * 3
    assert blocks[0].conv_dw.groups == 16 and blocks[0].conv_dw.kernel_size == (7, 7)
    assert model(x).shape == (2, 1000)
    # ConvNeXt-T at the GPU defaults: 28.6 M parameters, as timm's convnext_tiny.
    tiny, _ = models.build("convnext", batch=1, image=32)
    assert [len(stage.blocks) for stage in tiny.stages] == [3, 3, 9, 3]
    assert round(sum(p.numel() for p in tiny.parameters()) / 1e6, 1) == 28.6
    with pytest.raises(ValueError, match="convnext depth must be an int or 4 ints"):
        models.build("convnext", depth=(1, 2))


# ---------------------------------------------------------------------------------------------
# the tool


def _rows(out_dir: Path) -> list[dict]:
    data = json.loads((out_dir / "results.json").read_text())
    assert set(data["meta"]) >= {"machine", "date", "versions", "config"}
    return data["results"]


def test_tiny_sweep_end_to_end_writes_json_markdown_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "--models",
            "encoder",
            "--backends",
            "eager,compile:eager",
            "--depths",
            "1,2",
            "--width",
            "16",
            "--batch",
            "2",
            "--seq",
            "8",
            "--device",
            "cpu",
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert "[1/4] encoder depth=1 eager ... " in captured.err and "[4/4]" in captured.err
    assert "== encoder ==" in captured.out

    rows = _rows(out)
    assert [(r["depth"], r["backend"]) for r in rows] == [
        (1, "eager"),
        (1, "compile:eager"),
        (2, "eager"),
        (2, "compile:eager"),
    ]
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert r["blocks"] == r["depth"]
        assert r["first_call_s"] > 0 and r["second_call_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["latency_ms_p10"] <= r["latency_ms_median"] <= r["latency_ms_p90"]
        assert r["timer"] == "perf_counter" and r["mem_kind"] == "process_max_rss"
        assert r["rel_err"] < 1e-5  # same fp32 weights and inputs as the reference
        assert r["sizes"] == {"depth": r["depth"], "width": 16, "batch": 2, "seq": 8}

    md = (out / "results.md").read_text()
    assert md.startswith("# trt-subgraph bench")
    assert "- Machine: " in md and "torch " + torch.__version__ in md and "## encoder" in md
    assert sum(line.startswith("| 2 | compile:eager |") for line in md.splitlines()) == 1
    assert "| depth | backend | first call s | 2nd call s | median ms |" in md

    pngs = [out / "first_call.png", out / "latency.png"]
    if importlib.util.find_spec("matplotlib") is not None:
        for p in pngs:
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "![first_call](first_call.png)" in md
    else:
        assert not any(p.exists() for p in pngs)
    assert not (out / "logs").exists()  # logs are kept for failed cases only


HELPERS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make(depth=2, width=8, batch=1):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        return model, (torch.randn(batch, width),)

    def broken(**kwargs):
        raise RuntimeError("factory exploded")

    def slow(**kwargs):
        import time
        time.sleep(120)
    """
)


@pytest.fixture
def helper_module(tmp_path, monkeypatch):
    (tmp_path / "bench_helpers.py").write_text(HELPERS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    return "bench_helpers"


def test_factory_model_works_and_a_failing_backend_is_an_error_row(tmp_path, helper_module, capsys):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "--model",
            f"{helper_module}:make",
            "--backends",
            "eager,compile:no_such_backend",
            "--depths",
            "3",
            "--width",
            "12",
            "--device",
            "cpu",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    ok, bad = _rows(out)
    assert ok["backend"] == "eager" and ok["status"] == "ok", ok.get("error")
    # depth and width reached the factory: 3 Linear(12, 12) blocks.
    assert ok["blocks"] == 3 and ok["params"] == 3 * (12 * 12 + 12)
    assert ok["rel_err"] == 0.0
    assert bad["backend"] == "compile:no_such_backend" and bad["status"] == "error"
    assert "compile: InvalidBackend" in bad["error"] and "no_such_backend" in bad["error"]
    assert "no_such_backend" in (out / "results.md").read_text()
    assert "InvalidBackend" in (out / bad["log"]).read_text() and "log" not in ok
    assert "error: compile: InvalidBackend" in capsys.readouterr().out


def test_a_factory_that_raises_is_an_error_row(helper_module):
    cfg = runner.Config(models=[f"{helper_module}:broken"], backends=["eager"], device="cpu", dtype="float32")
    (case,) = runner.cases(cfg)
    row = runner.run_case(case, trt_cache_dir="/nonexistent", timeout=120)
    assert row["status"] == "error" and "build: RuntimeError: factory exploded" in row["error"]


def test_timeout_becomes_a_row_and_kills_the_case(helper_module):
    cfg = runner.Config(models=[f"{helper_module}:slow"], backends=["eager"], device="cpu", dtype="float32", timeout=3)
    (case,) = runner.cases(cfg)
    row = runner.run_case(case, trt_cache_dir="/nonexistent", timeout=3)
    assert row["status"] == "timeout" and "timed out after 3s" in row["error"]
    assert row["wall_s"] < 30


def test_warm_cache_runs_trt_subgraph_twice_sharing_only_its_cache(monkeypatch, tmp_path):
    seen = []

    def fake_run_case(case, *, trt_cache_dir, timeout, log_file=None, env=None):
        seen.append((case.backend, case.variant, case.depth, trt_cache_dir))
        return {
            "model": case.model,
            "depth": case.depth,
            "backend": case.backend,
            "variant": case.variant,
            "status": "ok",
            "wall_s": 0.0,
        }

    monkeypatch.setattr(runner, "run_case", fake_run_case)
    cfg = runner.Config(
        models=["encoder"],
        backends=["inductor", "trt_subgraph"],
        device="cpu",
        dtype="float32",
        depths=[2, 4],
        warm_cache=True,
    )
    data = runner.run_sweep(cfg, stream=open(os.devnull, "w"))
    assert [(b, v, d) for b, v, d, _ in seen] == [
        ("inductor", "cold", 2),
        ("trt_subgraph", "cold", 2),
        ("trt_subgraph", "warm", 2),
        ("inductor", "cold", 4),
        ("trt_subgraph", "cold", 4),
        ("trt_subgraph", "warm", 4),
    ]
    dirs = [s[3] for s in seen]
    assert dirs[1] == dirs[2] and dirs[4] == dirs[5]
    assert len({dirs[0], dirs[1], dirs[3], dirs[4]}) == 4
    assert not any(Path(d).exists() for d in dirs)  # cleaned up
    assert "trt_subgraph (warm)" in output.markdown(data)


def test_saved_runs_a_writer_then_a_reader_with_every_cache_empty(monkeypatch):
    """--saved: per trt_subgraph case, a writer process saves the function into a folder and a
    reader process with an empty trt_subgraph cache loads it; the reader's row is the saved row.
    A writer that fails gives the row its error."""
    seen = []

    def fake_run_case(case, *, trt_cache_dir, timeout, log_file=None, env=None):
        saved = case.spec.get("saved")
        seen.append((case.backend, case.variant, saved and saved["role"], saved and saved["folder"], trt_cache_dir))
        ok = not (saved and saved["role"] == "write" and case.depth == 4)
        row = {"model": case.model, "depth": case.depth, "backend": case.backend, "variant": case.variant}
        return {**row, "status": "ok" if ok else "error", "error": None if ok else "boom", "wall_s": 0.0}

    monkeypatch.setattr(runner, "run_case", fake_run_case)
    cfg = runner.Config(
        models=["encoder"],
        backends=["eager", "trt_subgraph"],
        device="cpu",
        dtype="float32",
        depths=[2, 4],
        warm_cache=True,
        saved=True,
    )
    data = runner.run_sweep(cfg, stream=open(os.devnull, "w"))
    assert [(b, v, r) for b, v, r, _, _ in seen] == [
        ("eager", "cold", None),
        ("trt_subgraph", "cold", None),
        ("trt_subgraph", "warm", None),
        ("trt_subgraph", "saved", "write"),
        ("trt_subgraph", "saved", "load"),
        ("eager", "cold", None),
        ("trt_subgraph", "cold", None),
        ("trt_subgraph", "warm", None),
        ("trt_subgraph", "saved", "write"),  # fails: no reader
    ]
    writer, reader = seen[3], seen[4]
    assert writer[3] == reader[3] and reader[4] not in (writer[4], seen[1][4])  # one folder, a fresh cache
    assert not any(Path(d).exists() for _, _, _, f, c in seen for d in (f, c) if d)  # cleaned up
    rows = {(r["depth"], r["variant"]): r for r in data["results"] if r["backend"] == "trt_subgraph"}
    assert rows[(2, "saved")]["status"] == "ok"
    assert rows[(4, "saved")]["error"] == "saving the function: boom"
    assert "trt_subgraph (saved)" in output.markdown(data)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(backends=["inductor"]), "add trt_subgraph to --backends"),
        (dict(batches=[1, 2]), "--saved takes one input size"),
        (dict(dynamic=True), "--saved takes one input size"),
    ],
)
def test_saved_needs_trt_subgraph_and_one_input_size(changes, message):
    base = dict(models=["encoder"], backends=["trt_subgraph"], device="cpu", dtype="float32", saved=True)
    with pytest.raises(ValueError, match=message):
        runner.Config(**{**base, **changes})


@pytest.mark.skipif(not hasattr(torch.compiler, "load_compiled_function"), reason="torch without aot_compile (< 2.9)")
def test_saved_function_writes_a_file_that_a_loader_runs(tmp_path, monkeypatch):
    """The writer's first call compiles ahead of time, runs and saves; a loader over the same
    folder runs the saved plan (nothing traced or split) and gives eager's outputs."""
    import trt_subgraph
    from trt_subgraph.bench.backends import saved_function

    monkeypatch.setenv("TRT_SUBGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    model, (x,) = models.build("mlp", width=16, batch=2)
    options = {"engine": "eager"}
    with torch.no_grad():
        write, _ = saved_function("write", str(tmp_path), model, options)
        torch.testing.assert_close(write(x), model(x), rtol=1e-5, atol=1e-5)
        assert (tmp_path / "function.pt2").is_file() and (tmp_path / "key").is_file()
        torch.compiler.reset()
        load, _ = saved_function("load", str(tmp_path), model, options)
        y = torch.randn_like(x)
        torch.testing.assert_close(load(y), model(y), rtol=1e-5, atol=1e-5)
    report = trt_subgraph.last_report()
    assert report.regions["loaded"] is True and "loaded from a saved plan" in report.engine_reason
    with pytest.raises(ValueError, match="role must be 'write' or 'load'"):
        saved_function("read", str(tmp_path), model, options)


def test_runs_repeat_the_sweep_round_by_round_and_keep_the_median_first_call(monkeypatch, tmp_path):
    first_calls = iter([5.0, 9.0, 7.0, 6.0, 1.0, 8.0, 3.0, 2.0, 4.0])  # 3 rounds of 3 processes
    seen = []

    def fake_run_case(case, *, trt_cache_dir, timeout, log_file=None, env=None):
        seen.append((case.backend, case.variant, trt_cache_dir))
        first = next(first_calls)
        return {
            "model": case.model,
            "depth": case.depth,
            "backend": case.backend,
            "variant": case.variant,
            "status": "ok",
            "wall_s": 0.0,
            "first_call_s": first,
            "latency_ms_median": (first * 7) % 10 + 1,  # not in the order of the first calls
            "latency_ms_p10": 1.0,
            "latency_ms_p90": 100.0,
        }

    monkeypatch.setattr(runner, "run_case", fake_run_case)
    cfg = runner.Config(
        models=["encoder"],
        backends=["inductor", "trt_subgraph"],
        device="cpu",
        dtype="float32",
        depths=[2],
        warm_cache=True,
        runs=3,
        out=tmp_path,
    )
    data = runner.run_sweep(cfg, stream=open(os.devnull, "w"))
    assert [(b, v) for b, v, _ in seen] == [
        ("inductor", "cold"),
        ("trt_subgraph", "cold"),
        ("trt_subgraph", "warm"),
    ] * 3
    assert seen[1][2] == seen[2][2] and len({seen[1][2], seen[4][2], seen[7][2]}) == 3  # each warm after its cold
    rows = {(r["backend"], r["variant"]): r for r in data["results"]}
    assert len(data["results"]) == 3
    inductor, cold, warm = rows["inductor", "cold"], rows["trt_subgraph", "cold"], rows["trt_subgraph", "warm"]
    assert inductor["first_call_s_runs"] == [5.0, 6.0, 3.0] and inductor["first_call_s"] == 5.0
    assert cold["first_call_s_runs"] == [9.0, 1.0, 2.0] and cold["first_call_s"] == 2.0
    assert warm["first_call_s_runs"] == [7.0, 8.0, 4.0] and warm["first_call_s"] == 7.0
    assert warm["latency_ms_median"] == 10.0  # every other column is the median run's own
    # latency moves from process to process: every run's median, and their median
    assert warm["latency_ms_median_runs"] == [10.0, 7.0, 9.0] and warm["latency_ms_median_of_runs"] == 9.0
    assert inductor["latency_ms_median_runs"] == [6.0, 3.0, 2.0] and inductor["latency_ms_median_of_runs"] == 3.0
    two = runner.combine([{**warm, "first_call_s": 1.0, "latency_ms_median": 1.0}, {**warm, "latency_ms_median": 4.0}])
    assert two["latency_ms_median_of_runs"] == 2.5  # of an even count, the mean of the middle two
    md = (tmp_path / "results.md").read_text()
    assert "| 2 | trt_subgraph | 2 (1-9) |" in md and "runs 3" in md and "median first call" in md
    assert "| 9 (7-10) |" in md and "median over the runs" in md


def test_a_failing_run_makes_the_row_an_error_row():
    ok = {"status": "ok", "first_call_s": 1.0}
    row = runner.combine([ok, {"status": "error", "error": "boom"}, ok])
    assert row["status"] == "error" and row["error"] == "run 2 of 3: boom"
    assert runner.combine([ok]) is ok


def test_append_merges_runs_and_refuses_incomparable_settings(monkeypatch, tmp_path):
    def fake_run_case(case, *, trt_cache_dir, timeout, log_file=None, env=None):
        return {
            "model": case.model,
            "depth": case.depth,
            "backend": case.backend,
            "variant": case.variant,
            "status": "ok",
            "wall_s": 0.0,
            "first_call_s": float(case.depth),
            "machine": "test machine",
            "latency_ms_median": 2.0,
            "latency_ms_p10": 1.0,
            "latency_ms_p90": 3.0,
        }

    monkeypatch.setattr(runner, "run_case", fake_run_case)
    devnull = open(os.devnull, "w")
    out = tmp_path / "out"

    def cfg(**kw):
        base = dict(
            models=["encoder"],
            backends=["inductor", "trt_subgraph"],
            device="cpu",
            dtype="float32",
            out=out,
            append=True,
        )
        return runner.Config(**{**base, **kw})

    runner.run_sweep(cfg(depths=[8, 32], command="first"), stream=devnull)
    # A second run adds depth 4 and redoes depth 32 for one backend only.
    runner.run_sweep(cfg(depths=[4, 32], backends=["trt_subgraph"], command="second"), stream=devnull)
    data = json.loads((out / "results.json").read_text())
    assert [(r["depth"], r["backend"]) for r in data["results"]] == [
        (4, "trt_subgraph"),
        (8, "inductor"),
        (8, "trt_subgraph"),
        (32, "inductor"),
        (32, "trt_subgraph"),
    ]
    assert data["meta"]["commands"] == ["first", "second"]
    md = (out / "results.md").read_text()
    assert "`first`" in md and "`second`" in md

    with pytest.raises(ValueError, match="dtype differs"):
        runner.run_sweep(cfg(depths=[2], dtype="bfloat16"), stream=devnull)
    with pytest.raises(ValueError, match="runs differs"):
        runner.run_sweep(cfg(depths=[2], runs=3), stream=devnull)
    assert len(json.loads((out / "results.json").read_text())["results"]) == 5  # untouched


def test_cpu_defaults_are_small_and_cuda_defaults_are_the_gpu_benchmark_sizes():
    cpu = runner.Config(models=["encoder", "vit", "mlp"], backends=["eager"], device="cpu", dtype="float32")
    got = {(c.model, c.depth): c.spec["model_kwargs"] for c in runner.cases(cpu)}
    assert got[("encoder", 2)] == {"width": 64, "batch": 2, "seq": 16, "depth": 2}
    assert got[("vit", 4)] == {"width": 64, "batch": 2, "image": 32, "depth": 4}
    assert got[("mlp", None)] == {"width": 64, "batch": 2}
    gpu = runner.Config(models=["decoder"], backends=["eager"], device="cuda", dtype="float16")
    (case,) = runner.cases(gpu)
    assert case.depth is None and case.spec["model_kwargs"] == {}
    assert runner._sizes(case) == {"depth": 16, "width": 2048, "batch": 4, "seq": 512}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backends", "eager,tensorrt"], "unknown backend 'tensorrt'; allowed: eager, inductor"),
        (["--models", "bert"], "unknown model 'bert'; allowed: encoder"),
        (["--depths", "2,x"], "--depths must be comma-separated positive ints"),
        (["--trt-options", "engine"], "expected key=value pairs"),
        (["--device", "tpu"], "allowed: cpu, cuda, cuda:N"),
        (["--device", "cuda:x"], "unknown device 'cuda:x'; allowed: cpu, cuda, cuda:N"),
        (["--device", "cpu:0"], "unknown device 'cpu:0'; allowed: cpu, cuda, cuda:N"),
        (["--device", "cuda:01"], "unknown device 'cuda:01'; allowed: cpu, cuda, cuda:N"),
        (["--device", ""], "unknown device ''; allowed: cpu, cuda, cuda:N"),
        (["--model", "trt_subgraph:"], "expected 'package.module:factory'"),
        (["--depths", "1,,2"], "--depths must be comma-separated positive ints, got '1,,2'"),
        (["--runs", "0"], "runs must be >= 1"),
        (["--models", "mlp", "--depths", "2,4"], "--depths does not apply to mlp"),
        (["--timeout", "inf"], "timeout must be a positive number of seconds, got inf"),
        (["--width", "0"], "width must be a positive int, got 0"),
        (["--batch", "-1"], "batch must be a positive int, got -1"),
        (["--depths", ""], "--depths must be comma-separated positive ints"),
        (["--models", ""], "no models given"),
        (["--timeout", "nan"], "timeout must be a positive number of seconds, got nan"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_made_or_appended_to_exits_2_before_any_case(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runner, "run_case", lambda *a, **k: pytest.fail("a case ran"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = ["--models", "mlp", "--backends", "eager", "--device", "cpu"]
    assert cli.main([*argv, "--out", str(a_file)]) == 2
    assert f"--out {a_file}: cannot write there" in capsys.readouterr().err
    rows_without_model = '{"meta": {"config": {"models": []}}, "results": [{"backend": "eager"}]}'
    for text in ('{"meta": {}, "results": 5}', "{not json", rows_without_model):
        (tmp_path / "results.json").write_text(text)
        assert cli.main([*argv, "--out", str(tmp_path), "--append"]) == 2
        assert "results.json is not a results file of this tool" in capsys.readouterr().err


def test_trt_options_are_parsed_with_types():
    assert cli.parse_kv("engine=inductor, sparsity=auto,cudagraphs=false,min_block_size=3,cache_dir=none") == {
        "engine": "inductor",
        "sparsity": "auto",
        "cudagraphs": False,
        "min_block_size": 3,
        "cache_dir": None,
    }
    assert cli.parse_kv("cudagraph_sizes=[1, 2,4],engine=inductor,torch_executed_ops=[aten.gelu.default]") == {
        "cudagraph_sizes": [1, 2, 4],
        "engine": "inductor",
        "torch_executed_ops": ["aten.gelu.default"],
    }
    assert cli.parse_kv("cudagraph_sizes=[ ]") == {"cudagraph_sizes": []}
    assert cli.parse_kv("cache_dir=/tmp/run[1],a=]x[") == {"cache_dir": "/tmp/run[1]", "a": "]x["}  # not lists


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cudagraph_sizes=[1,2", "the list in 'cudagraph_sizes=[1,2' does not close: write key=[v1,v2]"),
        ("k=[[1,2]]", "is not a list of values: write key=[v1,v2] (no nested lists)"),
        ("k=[1,[2,3]]", "no nested lists"),
        ("k=[1,,2]", "'[1,,2]' has an empty item"),
        ("[a=1]", "'[a' is not a key: brackets belong to list values"),
        ("engine=eager,engine=inductor", "'engine' is given twice"),
        ("engine", "expected key=value pairs"),
    ],
)
def test_bad_option_texts_are_refused_with_what_to_write(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cli.parse_kv(text)


def test_add_cli_registers_the_bench_subcommand():
    parser = argparse.ArgumentParser(prog="trt-subgraph")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--models", "vit", "--depths", "2,4", "--warm-cache"])
    assert args.func is cli.run and args.models == "vit" and args.warm_cache
    cfg = cli.config_from_args(args)
    assert cfg.depths == [2, 4] and cfg.models == ["vit"]


def _tiny_case(**kw):
    """The spec of a tiny eager encoder case on the CPU, with `kw` on top."""
    spec = {
        "model": "encoder",
        "model_kwargs": {"depth": 2, "width": 16, "batch": 2, "seq": 4},
        "backend": "eager",
        "device": "cpu",
        "dtype": "float32",
        "warmup": 0,
        "repeats": 2,
        "seed": 0,
    }
    return {**spec, **kw}


def test_sparse_case_prunes_before_the_reference():
    from trt_subgraph.bench import _case

    res = _case.run_case(_tiny_case(sparse=True))
    assert res["status"] == "ok", res.get("error")
    assert res["pruned_layers"] == 2 * 4  # qkv, proj, fc1, fc2 of each block
    assert res["rel_err"] == 0.0  # the fp32 reference is the pruned model


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_case_without_cuda_is_an_error_row():
    from trt_subgraph.bench import _case

    spec = {
        "model": "mlp",
        "model_kwargs": {"width": 8, "batch": 2},
        "backend": "eager",
        "device": "cuda",
        "dtype": "float16",
        "warmup": 0,
        "repeats": 1,
        "seed": 0,
    }
    res = _case.run_case(spec)
    assert res["status"] == "error" and "torch.cuda.is_available() is False" in res["error"]
    assert res["error"].startswith("build: ")


# ---------------------------------------------------------------------------------------------
# bytecode for the case processes


class _FakeCaseProcess:
    """Stands in for subprocess.Popen of a case process: records its environment, returns a result."""

    envs: list[dict[str, str]] = []

    def __init__(self, cmd, *, env, **kwargs):
        assert cmd[1] == "-c" and "from trt_subgraph.bench._case import main" in cmd[2]
        self.envs.append(env)
        self.pid, self.returncode = 0, 0

    def communicate(self, timeout=None):
        from trt_subgraph.bench._case import MARKER

        result = {
            "status": "ok",
            "first_call_s": 1.0,
            "latency_ms_median": 1.0,
            "latency_ms_p10": 1.0,
            "latency_ms_p90": 1.0,
        }
        return MARKER + json.dumps(result) + "\n", ""


@pytest.mark.parametrize("user_prefix", [False, True])
def test_missing_bytecode_is_compiled_once_and_every_case_process_gets_the_prefix(monkeypatch, tmp_path, user_prefix):
    compiled = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if user_prefix:  # the user's PYTHONPYCACHEPREFIX is where the bytecode goes
        prefix = str(tmp_path / "mine")
        monkeypatch.setenv("PYTHONPYCACHEPREFIX", prefix)
    else:
        prefix = str(tmp_path / "xdg" / "trt_subgraph-bench" / "pycache")
        monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.setattr(runner, "has_bytecode", lambda p, sources=None: False)
    monkeypatch.setattr(runner, "compile_bytecode", lambda p, paths: compiled.append((p, paths)))
    monkeypatch.setattr(_FakeCaseProcess, "envs", [])
    monkeypatch.setattr(runner.subprocess, "Popen", _FakeCaseProcess)

    cfg = runner.Config(
        models=["encoder"],
        backends=["eager", "trt_subgraph"],
        device="cpu",
        dtype="float32",
        depths=[2],
        warm_cache=True,
        runs=2,
    )
    stream = io.StringIO()
    data = runner.run_sweep(cfg, stream=stream)

    assert len(compiled) == 1 and compiled[0][0] == prefix  # once, before the first case
    torch_dir = os.path.dirname(torch.__file__)
    assert torch_dir in compiled[0][1] and os.path.dirname(os.__file__) not in compiled[0][1]
    assert os.path.join(os.path.dirname(os.__file__), "json") in compiled[0][1]  # the standard library
    envs = _FakeCaseProcess.envs
    assert len(envs) == 6  # 2 runs x (eager, trt_subgraph cold, trt_subgraph warm)
    assert all(e["PYTHONPYCACHEPREFIX"] == prefix for e in envs)
    assert all(e["TORCHINDUCTOR_CACHE_DIR"] != envs[0]["TORCHINDUCTOR_CACHE_DIR"] for e in envs[1:])
    assert data["meta"]["bytecode"].startswith(f"compiled into {prefix} (PYTHONPYCACHEPREFIX)")
    assert stream.getvalue().startswith("bytecode: torch has no compiled bytecode")
    assert all(r["status"] == "ok" for r in data["results"])


def test_bytecode_off_or_present_leaves_the_case_environment_alone(monkeypatch):
    def no_compile(prefix, paths):
        raise AssertionError("compiled")

    monkeypatch.setattr(runner, "compile_bytecode", no_compile)
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    assert runner.prepare_bytecode("off", ["encoder"], io.StringIO()) == ({}, "off")
    assert runner.prepare_bytecode("auto", ["encoder"], io.StringIO()) == ({}, "present (beside the sources)")
    monkeypatch.setattr(runner, "has_bytecode", lambda p, sources=None: False)
    assert runner.prepare_bytecode("off", ["encoder"], io.StringIO()) == ({}, "off")
    with pytest.raises(ValueError, match="unknown bytecode mode 'on'; allowed: auto, off"):
        runner.Config(models=["encoder"], backends=["eager"], device="cpu", dtype="float32", bytecode="on")


def test_compile_bytecode_writes_where_a_prefixed_interpreter_looks(monkeypatch, tmp_path):
    monkeypatch.undo()  # the real has_bytecode
    pkg = tmp_path / "src" / "tinypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "mod.py").write_text("Y = 2\n")
    sources = [str(pkg / "__init__.py"), str(pkg / "mod.py")]
    prefix = str(tmp_path / "pyc")
    assert not runner.has_bytecode(prefix, sources)
    runner.compile_bytecode(prefix, [str(pkg)])
    assert runner.has_bytecode(prefix, sources)
    assert not runner.has_bytecode(None, sources)  # nothing written beside the sources
    # A --model factory's package is compiled too.
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    assert str(pkg) in runner.bytecode_sources(["tinypkg.mod:make"])


# ---------------------------------------------------------------------------------------------
# dynamic shapes: --batches / --seqs


def test_make_inputs_gives_builds_inputs_at_any_size_from_the_same_generator():
    model, (ids,) = models.build("encoder", **{**SMALL, "seq": 8}, seed=4)
    again = models.make_inputs("encoder", model, batch=2, seq=8, seed=4)[0]
    assert torch.equal(again, ids)
    (wide,) = models.make_inputs("encoder", model, batch=5, seq=6, seed=4)
    assert wide.shape == (5, 6) and wide.dtype == torch.int64 and int(wide.max()) < model.embed.num_embeddings
    with pytest.raises(ValueError, match="seq 9 exceeds the 8 tokens this encoder was built for"):
        models.make_inputs("encoder", model, batch=1, seq=9)
    resnet, (img,) = models.build("resnet", depth=1, width=8, batch=2, image=32, seed=1)
    assert torch.equal(models.make_inputs("resnet", resnet, batch=2, image=32, seed=1)[0], img)
    mlp, _ = models.build("mlp", width=16, batch=2)
    assert models.make_inputs("mlp", mlp, batch=3)[0].shape == (3, 16)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batches", "1,2", "--batch", "4"], "--batches and --batch exclude each other"),
        (["--seqs", "8,16", "--seq", "8"], "--seqs and --seq exclude each other"),
        (["--batches", "1,2", "--seqs", "8,16"], "--batches and --seqs exclude each other"),
        (["--batches", "1,x"], "--batches must be comma-separated positive ints, got '1,x'"),
        (["--batches", "0,2"], "--batches must be comma-separated positive ints, got '0,2'"),
        (["--batches", "1,2,1"], "--batches lists a size twice: [1, 2, 1]"),
        (["--seqs", "8,16", "--models", "encoder,vit"], "--seqs applies to models with a sequence length"),
        (["--seq", "8", "--models", "vit,resnet"], "--seq sizes encoder, decoder and --model factories, none of"),
        (
            ["--image", "64", "--models", "encoder"],
            "--image sizes vit, resnet, efficientnet, mobilenetv3, convnext and",
        ),
    ],
)
def test_bad_size_sweeps_exit_2_with_a_clear_message(argv, message, capsys):
    assert cli.main(["--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_size_sweep_reaches_every_case_and_seqs_build_the_model_for_the_longest():
    args = argparse.ArgumentParser()
    cli.add_arguments(args)
    cfg = cli.config_from_args(args.parse_args(["--device", "cpu", "--seqs", "16,40,24", "--depths", "2"]))
    (case,) = [c for c in runner.cases(cfg) if c.backend == "eager"]
    assert case.spec["sweep"] == {"dim": "seq", "sizes": [16, 40, 24]} and case.spec["dynamic"] is False
    assert case.spec["model_kwargs"]["seq"] == 40
    cfg = cli.config_from_args(args.parse_args(["--device", "cpu", "--batches", "4,1", "--dynamic"]))
    assert all(c.spec["sweep"] == {"dim": "batch", "sizes": [4, 1]} and c.spec["dynamic"] for c in runner.cases(cfg))


def test_dynamic_flag_passes_dynamic_true_to_every_torch_compile(monkeypatch):
    from trt_subgraph.bench import backends

    seen = []
    monkeypatch.setattr(backends.torch, "compile", lambda model, **kw: seen.append(kw.get("dynamic")) or model)
    model, _ = models.build("encoder", **SMALL)
    for name in ("inductor", "reduce-overhead", "trt_subgraph", "compile:eager"):
        for dynamic in (True, False):
            backends.prepare(name, model, dtype=torch.float32, trt_options={}, tt_options={}, dynamic=dynamic)
    assert seen == [True, None] * 4
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw))
    backends.prepare("regional", model, dtype=torch.float32, trt_options={}, tt_options={}, dynamic=True)
    assert calls == [{"backend": "inductor", "dynamic": True}] * 2


def _sweep_spec(**kw):
    spec = {
        "model": "encoder",
        "model_kwargs": {"depth": 2, "width": 16, "batch": 2, "seq": 8},
        "backend": "eager",
        "device": "cpu",
        "dtype": "float32",
        "warmup": 1,
        "repeats": 3,
        "seed": 0,
        "sweep": {"dim": "batch", "sizes": [1, 3, 2]},
    }
    return {**spec, **kw}


def test_size_sweep_case_calls_each_size_in_order_against_its_own_reference(monkeypatch):
    from trt_subgraph.bench import _case

    shapes = []
    real = models.Encoder.forward
    monkeypatch.setattr(models.Encoder, "forward", lambda self, ids: shapes.append(tuple(ids.shape)) or real(self, ids))
    res = _case.run_case(_sweep_spec())
    assert res["status"] == "ok", res.get("error")
    # references (fp32 eager), then first and second call per size, then warmup + 3 timed + 1
    # accuracy call per size once all were seen.
    order = [(1, 8), (3, 8), (2, 8)]
    assert shapes == order + [s for s in order for _ in range(2)] + [s for s in order for _ in range(5)]
    entries = res["per_size"]
    assert [(e["size"], e["call_order"]) for e in entries] == [(1, 0), (3, 1), (2, 2)]
    for e in entries:
        assert e["rel_err"] == 0.0 and e["first_call_s"] > 0 and e["second_call_s"] > 0
        assert e["latency_ms_p10"] <= e["latency_ms_median"] <= e["latency_ms_p90"]
    assert res["first_call_s"] == pytest.approx(sum(e["first_call_s"] for e in entries))
    assert "latency_ms_median" not in res  # per size only

    # A reference from other inputs than the call's would show: a compiled callable that answers
    # every size with batch 1's output fails the shape check of that size's reference.
    from trt_subgraph.bench import backends

    def stale(backend, model, **kw):
        first = {}
        return (lambda ids: first.setdefault("out", model(ids))), {}

    monkeypatch.setattr(backends, "prepare", stale)
    res = _case.run_case(_sweep_spec())
    assert res["status"] == "error" and res["error"].startswith("first call (batch 3): ValueError")
    assert [e["size"] for e in res["per_size"]] == [1]  # what was done before the failure


def test_a_trt_subgraph_sweep_counts_every_compilation_beyond_the_reports_kept(monkeypatch):
    """`trt_subgraph.reports()` keeps the last few reports; the sweep's counts keep them all."""
    import trt_subgraph
    from trt_subgraph import report
    from trt_subgraph.bench import _case

    monkeypatch.setattr(report, "_KEPT", 1)
    spec = _sweep_spec(backend="trt_subgraph", trt_options={"engine": "eager", "cache": False, "build_workers": 0})
    res = _case.run_case(spec)
    assert res["status"] == "ok", res.get("error")
    # batch 1 is specialized, batch 3 compiles the dynamic graph, batch 2 reuses it
    assert [e["trt_compiles"] for e in res["per_size"]] == [1, 1, 0]
    assert res["trt_sweep_compiles"] == 2 and len(trt_subgraph.reports()) == 1
    builds = [e["trt_totals"].get("builds", 0) for e in res["per_size"]]
    assert builds[0] > 0 and builds[1] > 0 and builds[2] == 0
    assert res["trt_sweep_totals"]["builds"] == sum(builds)
    assert res["trt_sweep_totals"]["fallbacks"] == res["trt_sweep_totals"]["fallback_nodes"] == 0


def test_seq_sweep_of_a_factory_model_rebuilds_only_its_inputs(helper_module, tmp_path, monkeypatch):
    from trt_subgraph.bench import _case

    (tmp_path / "seq_helpers.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def make(depth=1, width=4, batch=2, seq=3):
                return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]), torch.randn(batch, seq, width)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    res = _case.run_case(
        _sweep_spec(model="seq_helpers:make", model_kwargs={"depth": 2}, sweep={"dim": "seq", "sizes": [5, 2]})
    )
    assert res["status"] == "ok", res.get("error")
    assert [e["size"] for e in res["per_size"]] == [5, 2] and all(e["rel_err"] == 0.0 for e in res["per_size"])


def test_size_sweep_rows_per_size_median_run_by_summed_first_calls_and_tables(monkeypatch, tmp_path):
    sums = iter([6.0, 3.0, 9.0, 5.0, 7.0, 1.0])  # 3 rounds of inductor, trt_subgraph

    def fake_run_case(case, *, trt_cache_dir, timeout, log_file=None, env=None):
        total = next(sums)
        per_size = [
            {
                "size": b,
                "call_order": i,
                "first_call_s": total - 1.0 if i == 0 else 0.5,
                "second_call_s": 0.01,
                "latency_ms_median": total + b,
                "latency_ms_p10": 1.0,
                "latency_ms_p90": 100.0,
                "rel_err": 1e-3,
            }
            for i, b in enumerate(case.spec["sweep"]["sizes"])
        ]
        row = {
            "model": case.model,
            "depth": case.depth,
            "backend": case.backend,
            "variant": case.variant,
            "dim": "batch",
            "sizes": {"depth": case.depth, "batch": 2, "seq": 16},
            "status": "ok",
            "wall_s": 0.0,
            "first_call_s": total,
            "per_size": per_size,
        }
        if case.backend == "trt_subgraph":
            for e in per_size:
                e.update(trt_compiles=int(e["size"] == 1), trt_totals={"builds": 3 * (e["size"] == 1), "fallbacks": 0})
            row.update(trt_sweep_compiles=1, trt_sweep_totals={"builds": 3, "fallbacks": 0, "fallback_nodes": 0})
        return row

    monkeypatch.setattr(runner, "run_case", fake_run_case)
    cfg = runner.Config(
        models=["encoder"],
        backends=["inductor", "trt_subgraph"],
        device="cpu",
        dtype="float32",
        depths=[2],
        batches=[1, 2],
        runs=3,
        out=tmp_path,
    )
    data = runner.run_sweep(cfg, stream=open(os.devnull, "w"))
    rows = data["results"]
    assert [(r["backend"], r["size"], r["sizes"]["batch"]) for r in rows] == [
        ("inductor", 1, 1),
        ("inductor", 2, 2),
        ("trt_subgraph", 1, 1),
        ("trt_subgraph", 2, 2),
    ]
    ind, trt = rows[0], rows[2]
    assert ind["first_call_s_sum"] == 7.0 and ind["first_call_s_sum_runs"] == [6.0, 9.0, 7.0]
    assert ind["first_call_s"] == 6.0 and ind["latency_ms_median"] == 8.0  # the median run's own
    assert trt["first_call_s_sum"] == 3.0 and "per_size" not in trt
    assert json.loads((tmp_path / "results.json").read_text())["results"] == rows

    md = (tmp_path / "results.md").read_text()
    lines = md.splitlines()
    header = "| depth | batch | backend | first call s | 2nd call s | median ms | p10-p90 ms | rel err |"
    assert any(line.startswith(header + " builds/fallbacks | fallback nodes |") for line in lines)
    body = [line for line in lines if line.startswith("| 2 |")]
    assert [line.split(" | ")[1:3] for line in body] == [  # grouped by size, in call order
        ["1", "inductor"],
        ["1", "trt_subgraph"],
        ["2", "inductor"],
        ["2", "trt_subgraph"],
    ]
    assert "| 2 | 1 | trt_subgraph | 2 | 0.01 | 4 | 1-100 | 1.0e-03 | 3/0 | 0 | ok |" in md
    assert "| 2 | 2 | trt_subgraph | 0.5 | 0.01 | 5 | 1-100 | 1.0e-03 | 0/0 | 0 | ok |" in md
    assert (
        "Sum of first calls over the 2 batch sizes at depth 2: inductor 7 s (6-9 over 3 runs), "
        "trt_subgraph 3 s (1-5 over 3 runs; 1 compilations, 3 builds, 0 fallbacks, 0 fallback nodes)."
    ) in md
    assert "Sizes: width" not in md and "Sizes: seq 16." in md
    assert "batch sizes 1, 2, in this order" in md
    assert not (tmp_path / "first_call.png").exists()
    assert "Sum of first calls" in output.terminal_table(data)

    with pytest.raises(ValueError, match="batches differs"):  # another call order: other first calls
        runner.run_sweep(dataclasses.replace(cfg, batches=[2, 1], append=True))


@pytest.mark.parametrize("statuses, rc", [(["error", "timeout"], 1), (["error", "ok"], 0)])
def test_the_bench_exits_1_only_when_every_case_failed(monkeypatch, capsys, statuses, rc):
    results = iter(statuses)

    def fake_run_case(case, *, trt_cache_dir, timeout, log_file=None, env=None):
        status = next(results)
        row = {"model": case.model, "depth": case.depth, "backend": case.backend, "variant": case.variant}
        return {**row, "status": status, "wall_s": 0.0, "first_call_s": 1.0, "error": "" if status == "ok" else "boom"}

    monkeypatch.setattr(runner, "run_case", fake_run_case)
    argv = ["--models", "encoder", "--backends", "eager,inductor", "--depths", "2", "--device", "cpu"]
    assert cli.main(argv) == rc
    assert ("every case failed" in capsys.readouterr().err) == (rc == 1)


def test_the_fallback_column_counts_subgraphs_that_failed_to_build():
    row = {"model": "encoder", "backend": "trt_subgraph", "status": "ok"}
    totals = {"unique_subgraphs": 4, "builds": 3, "reuses": 0, "fallback_nodes": 2}
    fallback = output.COLUMNS.index("fallback")
    assert output.cells({**row, "trt_totals": {**totals, "fallbacks": 0}})[fallback] == "2"
    assert output.cells({**row, "trt_totals": {**totals, "fallbacks": 1}})[fallback] == "2 + 1 subgraph"
    assert output.cells(row)[fallback] == ""  # not a trt_subgraph row


def test_failed_size_sweep_case_keeps_the_sizes_it_did():
    row = {"model": "encoder", "depth": 2, "backend": "eager", "dim": "batch", "sizes": {"batch": 2}}
    assert runner.expand({**row, "status": "timeout", "error": "timed out"}) == [
        {**row, "status": "timeout", "error": "timed out", "size": None}
    ]
    failed = runner.expand({**row, "status": "error", "error": "boom", "per_size": [{"size": 4, "call_order": 0}]})
    assert [(r["size"], r["status"], r["sizes"]) for r in failed] == [(4, "error", {"batch": 4})]
    plain = {"model": "encoder", "status": "ok"}
    assert runner.expand(plain) == [plain]


def test_tiny_batch_sweep_end_to_end_with_eager(tmp_path):
    out = tmp_path / "out"
    argv = ["--models", "encoder", "--backends", "eager", "--depths", "1", "--width", "16", "--seq", "8"]
    argv += ["--batches", "2,1", "--device", "cpu", "--repeats", "2", "--warmup", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    rows = _rows(out)
    assert [(r["size"], r["sizes"]["batch"], r["status"]) for r in rows] == [(2, 2, "ok"), (1, 1, "ok")]
    assert all(r["rel_err"] == 0.0 and r["latency_ms_median"] > 0 for r in rows)
    assert "| 1 | 1 | eager |" in (out / "results.md").read_text()


def test_cases_import_this_trt_subgraph_whatever_the_working_directory_holds(tmp_path, monkeypatch):
    """The case process runs the trt_subgraph of the command, not a checkout in the working
    directory (``python -m`` and ``-c`` put the working directory first on the import path)."""
    shadow = tmp_path / "trt_subgraph"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the shadowing checkout was imported')\n")
    monkeypatch.chdir(tmp_path)
    cfg = runner.Config(models=["mlp"], backends=["eager"], device="cpu", dtype="float32", repeats=2, warmup=1)
    (case,) = runner.cases(cfg)
    row = runner.run_case(case, trt_cache_dir=str(tmp_path / "cache"), timeout=120)
    assert row["status"] == "ok", row.get("error")


def test_first_call_is_timed_from_the_compile_call(monkeypatch):
    """What a backend does when torch.compile is called (inductor imports itself there) counts
    in the first call, as it does for the user waiting for the first output."""
    import time

    from trt_subgraph.bench import _case, backends

    def slow_prepare(backend, model, **kw):
        time.sleep(0.4)
        return model, {}

    monkeypatch.setattr(backends, "prepare", slow_prepare)
    res = _case.run_case(_tiny_case())
    assert res["status"] == "ok", res.get("error")
    assert res["compile_call_s"] >= 0.4
    assert res["first_call_s"] >= res["compile_call_s"]


_TERMINATED_BENCH = r"""
import sys
from trt_subgraph.bench import runner

case = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
with runner.stop_signals_as_exit():
    runner.run_in_own_session([sys.executable, "-c", case, sys.argv[1]], timeout=600)
"""


def test_a_terminated_bench_stops_the_case_it_runs(tmp_path):
    """`timeout`, a scheduler or `kill` sends the bench SIGTERM; its case, in a session of its
    own, outlived it and kept its memory (a model being built, say)."""
    pid_file = tmp_path / "case.pid"
    bench = subprocess.Popen([sys.executable, "-c", _TERMINATED_BENCH, str(pid_file)])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline and bench.poll() is None, "the case never started"
        time.sleep(0.05)
    case = int(pid_file.read_text())
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while _alive(case):
        assert time.monotonic() < deadline, f"the case (pid {case}) outlived the bench"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (Linux); a zombie, killed and not yet reaped by its new parent, does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_a_gpu_this_machine_lacks_is_refused_before_any_case_runs(capsys):
    assert cli.main(["--device", "cuda:1", "--models", "mlp", "--backends", "eager"]) == 2
    assert "sees no CUDA GPU; use --device cpu" in capsys.readouterr().err
