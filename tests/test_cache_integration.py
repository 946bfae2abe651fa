"""The disk cache seen through the backend: warm second processes, concurrency, faults, keys."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import trt_subgraph
from trt_subgraph import build
from trt_subgraph.bench import models
from trt_subgraph.cache import DiskCache

CHILD = r"""
import json, sys, torch, trt_subgraph
from trt_subgraph.bench import models
model, inputs = models.build("encoder", depth=3, width=32, batch=2, seq=8)
with torch.no_grad():
    out = torch.compile(model, backend="trt_subgraph", options={"engine": "inductor", "cache_dir": sys.argv[1]})(*inputs)
    err = (out - model(*inputs)).abs().max().item()
r = trt_subgraph.last_report().to_dict()
print(json.dumps({"totals": r["totals"], "statuses": [s["status"] for s in r["subgraphs"]], "err": err}))
"""


def run_children(cache_dir, n=1, env=None):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(cache_dir)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        for _ in range(n)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_second_process_starts_warm(tmp_path):
    (cold,) = run_children(tmp_path / "c")
    (warm,) = run_children(tmp_path / "c")
    assert cold["totals"]["builds"] == cold["totals"]["unique_subgraphs"] >= 2
    assert warm["totals"]["builds"] == 0
    assert set(warm["statuses"]) == {"disk_hit"}
    assert cold["err"] < 1e-5 and warm["err"] < 1e-5


def test_entries_are_keyed_by_the_cpu_instruction_set(tmp_path):
    """A cache shared by machines whose CPUs differ (an NFS home): a process where inductor
    generates code for another vector ISA must not load the entries (they compute garbage)."""
    shared = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # inductor's cache is shared too
    (cold,) = run_children(tmp_path / "c", env=shared)
    assert cold["totals"]["builds"] >= 2
    for capability in ("default", "avx2"):  # scalar code, and AVX2 where the machine has more
        env = {"ATEN_CPU_CAPABILITY": capability}
        (other,) = run_children(tmp_path / "c", env={**shared, **env})
        assert other["err"] < 1e-5, capability
        if _picked_isa(env) == _picked_isa({}):  # this machine's own pick: its entries apply
            assert set(other["statuses"]) == {"disk_hit"}, capability
        else:
            assert set(other["statuses"]) == {"built"}, capability


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_the_same_compiler_named_another_way_finds_the_entries(tmp_path):
    """``CXX=g++`` and ``CXX=/usr/bin/g++`` run one binary: the key names the binary, not
    the name it was reached by (gcc's banner holds that name as ``COLLECT_GCC``)."""
    (cold,) = run_children(tmp_path / "c", env={"CXX": "g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "i1")})
    assert cold["totals"]["builds"] >= 2
    env = {"CXX": shutil.which("g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "i2")}
    (other,) = run_children(tmp_path / "c", env=env)
    assert set(other["statuses"]) == {"disk_hit"} and other["err"] < 1e-5, other


def _picked_isa(env):
    code = "from trt_subgraph import _compat; print(_compat.cpu_codegen_key()['vec_isa'])"
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_cpu_codegen_key_follows_aten_cpu_capability(monkeypatch):
    from trt_subgraph import _compat

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    scalar = _compat.cpu_codegen_key()
    assert scalar["vec_isa"] == "INVALID_VEC_ISA" and scalar["compiler"].strip()
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    native = _compat.cpu_codegen_key()
    assert native["compiler"] == scalar["compiler"] and native["arch"] == scalar["arch"]


def test_concurrent_processes_build_each_subgraph_once(tmp_path):
    results = run_children(tmp_path / "c", n=4)
    unique = results[0]["totals"]["unique_subgraphs"]
    assert sum(r["totals"]["builds"] for r in results) == unique
    assert sum(r["totals"]["disk_hits"] for r in results) == 3 * unique
    assert all(r["err"] < 1e-5 for r in results)


def compile_encoder(cache_dir, **options):
    model, inputs = models.build("encoder", depth=3, width=32, batch=2, seq=8)
    torch.compiler.reset()
    build.clear_memory_cache()
    with torch.no_grad():
        out = torch.compile(
            model, backend="trt_subgraph", options={"engine": "inductor", "cache_dir": cache_dir, **options}
        )(*inputs)
        torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)
    return trt_subgraph.last_report()


def test_damaged_entries_are_dropped_and_rebuilt(tmp_path, caplog):
    cache_dir = tmp_path / "c"
    first = compile_encoder(cache_dir)
    entries = DiskCache(cache_dir).entries()
    assert len(entries) == first.totals["unique_subgraphs"] + 1  # and the graph's plan
    for info in entries:  # flip one payload byte in every entry
        data = bytearray(info.path.read_bytes())
        data[-10] ^= 0xFF
        info.path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        second = compile_encoder(cache_dir)
    assert {s.status for s in second.subgraphs} == {"built"}
    assert "checksum" in caplog.text.lower() or "damaged" in caplog.text.lower()
    assert len(DiskCache(cache_dir).entries()) == len(entries), "rebuilt entries were written back"
    third = compile_encoder(cache_dir)
    assert {s.status for s in third.subgraphs} == {"disk_hit"}


def test_changed_setting_or_version_misses(tmp_path, monkeypatch):
    cache_dir = tmp_path / "c"
    compile_encoder(cache_dir)
    assert {s.status for s in compile_encoder(cache_dir).subgraphs} == {"disk_hit"}
    monkeypatch.setattr(torch._inductor.config, "max_autotune_pointwise", True)
    assert {s.status for s in compile_encoder(cache_dir).subgraphs} == {"built"}
    monkeypatch.undo()
    monkeypatch.setattr(build, "__version__", "999.0")
    assert {s.status for s in compile_encoder(cache_dir).subgraphs} == {"built"}


def test_cache_can_be_turned_off(tmp_path):
    report = compile_encoder(None)
    assert {s.status for s in report.subgraphs} == {"built"}
    report = compile_encoder(tmp_path / "c", cache=False)
    assert not (tmp_path / "c").exists()


def test_loading_an_entry_leaves_no_temporary_directory(tmp_path, monkeypatch):
    """Entries load from an anonymous file: a process killed while loading leaves nothing in the temp dir."""
    import tempfile

    from trt_subgraph import _compat

    cache_dir = tmp_path / "c"
    compile_encoder(cache_dir)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    load = _compat.load_compiled_artifact
    seen = []

    def watched(path):
        seen.append([p for p in os.listdir(scratch) if p.startswith("trt_subgraph")])
        return load(path)

    monkeypatch.setattr(_compat, "load_compiled_artifact", watched)
    report = compile_encoder(cache_dir)
    assert {s.status for s in report.subgraphs} == {"disk_hit"}
    assert len(seen) == len(report.subgraphs) and all(listing == [] for listing in seen), seen


@pytest.fixture
def process_settings():
    """This process's numerics settings, restored after the test."""
    from torch._inductor import config as inductor_config

    from trt_subgraph import _compat

    settings, threads = _compat.compile_settings(), inductor_config.compile_threads
    yield
    _compat.apply_compile_settings(settings)
    inductor_config.compile_threads = threads


NUMERICS = {  # a process setting that changes what float32 code computes: how to change it
    "tf32 matmuls": lambda: torch.set_float32_matmul_precision("high"),
    "bf16 matmuls": lambda: torch.set_float32_matmul_precision("medium"),
    "cudnn tf32 off": lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
    "deterministic": lambda: torch.use_deterministic_algorithms(True),
    "deterministic, warn only": lambda: torch.use_deterministic_algorithms(True, warn_only=True),
    "default dtype": lambda: torch.set_default_dtype(torch.float64),
    "bf16 reduced-precision reductions off": lambda: setattr(
        torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False
    ),
}


def _key(sub):
    from trt_subgraph.cache import make_key
    from trt_subgraph.engines.eager import EagerEngine
    from trt_subgraph.options import Options

    return make_key(build.ArtifactStore(EagerEngine(), Options(cache=False)).key_parts(sub))


@pytest.mark.parametrize("change", list(NUMERICS))
def test_every_numerics_setting_is_in_the_key(process_settings, change):
    sub = types.SimpleNamespace(fingerprint="0" * 32, example_inputs=[torch.zeros(2, device="meta")])
    before = _key(sub)
    NUMERICS[change]()
    assert _key(sub) != before  # `make_key` takes plain data only: no dtype slipped in


def test_the_thread_count_is_in_the_key_of_cpu_subgraphs_only(process_settings):
    cpu, meta = (
        types.SimpleNamespace(fingerprint="0" * 32, example_inputs=[torch.zeros(2, device=device)])
        for device in ("cpu", "meta")
    )
    before = _key(cpu), _key(meta)
    torch.set_num_threads(1 if torch.get_num_threads() != 1 else 2)
    assert _key(cpu) != before[0] and _key(meta) == before[1]


def test_an_entry_built_under_other_numerics_settings_is_not_loaded(tmp_path, process_settings):
    """Loaded under the settings it was built with; built again, and kept apart, under others."""
    cache_dir = tmp_path / "c"
    assert {s.status for s in compile_encoder(cache_dir).subgraphs} == {"built"}
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = False
    assert {s.status for s in compile_encoder(cache_dir).subgraphs} == {"built"}
    assert {s.status for s in compile_encoder(cache_dir).subgraphs} == {"disk_hit"}
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True
    assert {s.status for s in compile_encoder(cache_dir).subgraphs} == {"disk_hit"}


def test_a_worker_takes_on_the_numerics_settings_it_is_sent(process_settings):
    """`apply_compile_settings` reproduces `process_state`, so worker builds match the keys."""
    from trt_subgraph import _compat

    for change in NUMERICS.values():
        change()
    want = _compat.compile_settings()
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True
    torch.use_deterministic_algorithms(False)
    torch.set_default_dtype(torch.float32)
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    assert _compat.process_state() != want["process"]
    _compat.apply_compile_settings(want)
    assert _compat.process_state() == want["process"]


def test_disk_cache_loads_start_the_engines_set_up_first(tmp_path, monkeypatch):
    """A batch of disk-cache loads starts the engine's one-time set-up (see
    `Engine.start_setup`) for the devices of what it loads; a build does not."""
    from trt_subgraph.engines.inductor import InductorEngine

    started = []
    monkeypatch.setattr(InductorEngine, "start_setup", lambda self, devices: started.append(list(devices)))
    cache_dir = tmp_path / "c"
    compile_encoder(cache_dir, plan_cache=False)
    assert started == []
    report = compile_encoder(cache_dir, plan_cache=False)
    assert {s.status for s in report.subgraphs} == {"disk_hit"}
    assert started == [["cpu"]]
