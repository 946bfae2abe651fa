"""A warm start on CPU compiles nothing: the compiled C++ kernels (and inductor's vector-ISA
check programs) come back from trt_subgraph's disk cache, not from the C++ compiler.

The end-to-end test runs two fresh processes with their own, empty inductor caches that share one
trt_subgraph disk cache, and counts compiler runs through a ``CXX`` wrapper that logs each one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from compiler_log import compiles, logging_compiler, needs_compiler

from trt_subgraph import _compat
from trt_subgraph.engines import inductor

CHILD = r"""
import json, sys, torch, torch.nn as nn
import trt_subgraph

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

torch.manual_seed(0)
model = nn.Sequential(*[Block() for _ in range(3)]).eval()
x = torch.randn(2, 4, 16)
options = {"engine": "inductor", "cache_dir": sys.argv[1], "build_workers": int(sys.argv[3])}
with torch.no_grad():
    out = torch.compile(model, backend="trt_subgraph", options=options)(x)
    ref = model(x)
report = trt_subgraph.last_report()
json.dump({
    "out": out.flatten().tolist(),
    "ref": ref.flatten().tolist(),
    "statuses": sorted({s.status for s in report.subgraphs}),
}, open(sys.argv[2], "w"))
"""


@needs_compiler
def test_a_warm_process_with_an_empty_inductor_cache_compiles_nothing(tmp_path):
    wrapper = logging_compiler(tmp_path)
    (tmp_path / "child.py").write_text(CHILD)
    runs = {}
    for run in ("cold", "warm"):
        env = {
            **os.environ,
            "CXX": str(wrapper),
            "CXX_LOG": str(tmp_path / f"{run}.log"),
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{run}"),  # each process's own, empty
        }
        out = tmp_path / f"{run}.json"
        subprocess.run(
            # The cold process builds in a worker process, as machines with 4 cores or more do.
            [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "trt"), str(out), str(int(run == "cold"))],
            env=env,
            check=True,
            timeout=600,
        )
        runs[run] = json.loads(out.read_text())
    assert runs["cold"]["statuses"] == ["built"] and compiles(tmp_path / "cold.log")
    assert runs["warm"]["statuses"] == ["disk_hit"]
    assert compiles(tmp_path / "warm.log") == []
    assert runs["warm"]["out"] == runs["cold"]["out"]  # the same kernels: bit for bit
    warm = torch.tensor(runs["warm"]["out"])
    torch.testing.assert_close(warm, torch.tensor(runs["warm"]["ref"]), rtol=1e-5, atol=1e-5)


def test_packed_files_round_trip_and_a_short_pack_is_refused():
    files = {"ab/cabc.main.so": b"\x7fELF library", "cd/ccd.so": b""}
    packed = inductor._pack_files(files)
    assert inductor._unpack_files(packed) == files
    with pytest.raises(ValueError, match="middle of a file"):
        inductor._unpack_files(packed[:-3])


@pytest.mark.parametrize(
    "name", ["../ab/cab.so", "/tmp/ab/cab.so", "ab/cab.py", "ab/../../cab.so", "abc/cab.so", "ab/cxy.so"]
)
def test_restoring_refuses_names_outside_inductors_cache_layout(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="not a compiled file"):
        _compat.restore_inductor_files({name: b"x"})
    assert list(tmp_path.iterdir()) == []


def test_restoring_keeps_a_file_already_there(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "cab.main.so").write_bytes(b"inductor's own")
    _compat.restore_inductor_files({"ab/cab.main.so": b"restored", "cd/ccd.main.so": b"new"})
    assert (tmp_path / "ab" / "cab.main.so").read_bytes() == b"inductor's own"
    assert (tmp_path / "cd" / "ccd.main.so").read_bytes() == b"new"


class _Artifact:
    """Stands in for a compiled artifact (the section only needs its identity)."""


def test_an_artifact_without_cpu_kernels_gets_no_section(tmp_path):
    gpu, gone, plain = _Artifact(), _Artifact(), object()
    inductor._keep_cpu_kernels(gpu, [])
    inductor._keep_cpu_kernels(gone, [str(tmp_path / "ab" / "cab.main.so")])  # deleted since
    inductor._keep_cpu_kernels(plain, [str(tmp_path / "ab" / "cab.main.so")])  # no weak references
    assert [inductor._cpu_kernels_section(a) for a in (gpu, gone, plain)] == [b"", b"", b""]


def test_inductor_set_up_runs_once_in_the_background_and_loads_wait_for_it(monkeypatch):
    """The source hash every first build or load computes runs in a thread started early; a
    batch of loads waits for it instead of computing it again beside it."""
    import threading
    import time

    import torch._inductor.codecache as codecache

    started, release, calls = threading.Event(), threading.Event(), []

    def slow_torch_key():
        calls.append(threading.current_thread().name)
        started.set()
        release.wait(10)
        return b"key"

    monkeypatch.setattr(codecache, "torch_key", slow_torch_key)
    monkeypatch.setattr(_compat, "_SETUP", {})
    _compat.start_inductor_setup(cuda=False)
    assert started.wait(10)
    _compat.start_inductor_setup(cuda=False)  # once per process
    entered = threading.Event()
    loader = threading.Thread(target=lambda: (_compat.loading_artifacts(), entered.set()))
    loader.start()
    time.sleep(0.2)
    assert not entered.is_set()  # waiting for the set-up
    release.set()
    loader.join(10)
    assert entered.is_set() and calls == ["trt_subgraph-setup"]


def test_a_failing_set_up_step_is_left_to_its_first_user(monkeypatch):
    import torch._inductor.codecache as codecache

    def broken():
        raise OSError("unreadable source file")

    monkeypatch.setattr(codecache, "torch_key", broken)
    monkeypatch.setattr(_compat, "_SETUP", {})
    _compat.start_inductor_setup(cuda=False)
    _compat.wait_inductor_setup()
    assert not _compat._SETUP["torch"].is_alive()
    with _compat.loading_artifacts():  # no error here: the load that needs the key raises
        pass


def test_a_torch_without_the_set_up_functions_loads_as_before(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_torch_key(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "torch._inductor.codecache" and "torch_key" in (fromlist or ()):
            raise ImportError("cannot import name 'torch_key'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", without_torch_key)
    monkeypatch.setattr(_compat, "_SETUP", {})
    _compat.start_inductor_setup(cuda=True)  # no error: the loads compute the values themselves
    assert _compat._SETUP == {}
