"""The fleet's remote cache level against a real redis-server (see conftest's ``redis_servers``):
build once per fleet, leases of dead builders, a server that stops or stalls, rejected entries,
the ``cache --remote`` commands."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

import trt_subgraph
from trt_subgraph import build
from trt_subgraph.bench import models
from trt_subgraph.cache import make_key, remote
from trt_subgraph.cache.paths import load_or_create_secret
from trt_subgraph.cli import main
from trt_subgraph.options import Options

TIGHT = dict(rtol=1e-5, atol=1e-5)
META = {"engine": "inductor", "versions": {"torch": "x"}, "info": {"fingerprint": "f" * 32}}

# One process of a fleet: its own disk cache (argv[2]), the shared Redis (argv[1]); the same
# model and inputs in every process (seeded). Prints its report's counts and saves its output.
CHILD = r"""
import json, sys, torch, trt_subgraph
from trt_subgraph.bench import models
torch.manual_seed(0)
model, inputs = models.build("encoder", depth=2, width=32, batch=2, seq=8)
options = {"engine": "inductor", "cache_dir": sys.argv[2], "remote_cache": sys.argv[1], "build_workers": 0}
with torch.no_grad():
    out = torch.compile(model, backend="trt_subgraph", options=options)(*inputs)
    err = (out - model(*inputs)).abs().max().item()
torch.save(out, sys.argv[3])
r = trt_subgraph.last_report().to_dict()
print(json.dumps({"totals": r["totals"], "statuses": [s["status"] for s in r["subgraphs"]], "err": err}))
"""

# A builder that takes a lease and hangs in the engine's build until it is killed.
HANGING = r"""
import sys, time, torch
from trt_subgraph.bench import models
from trt_subgraph.cache import remote
from trt_subgraph.engines.inductor import InductorEngine
remote.LEASE_TTL_S = 2.0
def hang(self, sub, weights):
    print("building", flush=True)
    time.sleep(600)
InductorEngine.build = hang
model, inputs = models.build("encoder", depth=2, width=32, batch=2, seq=8)
options = {"engine": "inductor", "cache_dir": sys.argv[2], "remote_cache": sys.argv[1], "build_workers": 0}
with torch.no_grad():
    torch.compile(model, backend="trt_subgraph", options=options)(*inputs)
"""


def open_cache(url, tmp_path, **kwargs):
    return remote.RedisCache(url, key_file=tmp_path / "cache.key", **kwargs)


def compile_encoder(url, cache_dir, **options):
    torch.manual_seed(0)
    model, inputs = models.build("encoder", depth=2, width=32, batch=2, seq=8)
    torch.compiler.reset()
    build.clear_memory_cache()
    options = {"engine": "inductor", "cache_dir": cache_dir, "remote_cache": url, "build_workers": 0, **options}
    with torch.no_grad():
        out = torch.compile(model, backend="trt_subgraph", options=options)(*inputs)
        torch.testing.assert_close(out, model(*inputs), **TIGHT)
    return trt_subgraph.last_report()


def test_options_take_a_redis_url_from_the_option_or_the_environment(monkeypatch):
    assert Options.from_user({}).remote_cache is None
    monkeypatch.setenv("TRT_SUBGRAPH_REMOTE_CACHE", "redis://cache.internal:6379/2")
    assert Options.from_user({}).remote_cache == "redis://cache.internal:6379/2"
    assert Options.from_user({"remote_cache": None}).remote_cache is None
    with pytest.raises(ValueError, match=r"TRT_SUBGRAPH_REMOTE_CACHE.*scheme 's3' is not supported; allowed: redis://"):
        monkeypatch.setenv("TRT_SUBGRAPH_REMOTE_CACHE", "s3://bucket/engines")
        Options.from_user({})
    monkeypatch.delenv("TRT_SUBGRAPH_REMOTE_CACHE")
    with pytest.raises(ValueError, match="names no host"):
        Options.from_user({"remote_cache": "redis:///0"})
    for port in ("port", "70000"):  # redis-py would fail at the first call
        with pytest.raises(ValueError, match="the port is not a number from 0 to 65535"):
            Options.from_user({"remote_cache": f"redis://cache.internal:{port}/0"})
    with pytest.raises(ValueError, match="remote_cache_ttl"):
        Options.from_user({"remote_cache_ttl": 0})
    with pytest.raises(ValueError, match="remote_cache_entry_limit"):
        Options.from_user({"remote_cache_entry_limit": 1.5})


def test_entries_round_trip_with_ttl_limit_and_listing(redis_url, tmp_path):
    cache = open_cache(redis_url, tmp_path, ttl=3600, entry_limit=4096)
    key = make_key({"k": 1})
    assert cache.get(key) is None
    assert cache.put(key, b"payload", META)
    header, payload = cache.get(key)
    assert payload == b"payload" and header["engine"] == "inductor"
    assert 0 < cache.client.ttl(f"trt_subgraph:1:entry:{key}") <= 3600
    assert not cache.put(make_key({"k": 2}), b"x" * 5000, META), "over the entry limit"
    (info,) = cache.entries()
    assert (info.key, info.engine, info.info["fingerprint"]) == (key, "inductor", "f" * 32)
    assert cache.stats()["entries"] == 1
    assert cache.verify() == {"ok": [key], "removed": [], "skipped": []}
    assert cache.clear() == 1 and cache.entries() == []


def test_a_ttl_under_one_second_keeps_entries_a_second_and_the_level_on(redis_url, tmp_path):
    cache = open_cache(redis_url, tmp_path, ttl=0.5)
    key = make_key({"k": "sub-second"})
    assert cache.put(key, b"payload", META)
    assert cache.get(key)[1] == b"payload", "a read renews with Redis's smallest expiry, 1 s"
    assert cache.available
    assert 0 < cache.client.pttl(f"trt_subgraph:1:entry:{key}") <= 1000


def test_saving_takes_an_artifact_that_only_the_remote_cache_holds(redis_url, tmp_path, monkeypatch):
    from trt_subgraph import saved
    from trt_subgraph.engines.inductor import InductorEngine
    from trt_subgraph.report import SubgraphRecord

    monkeypatch.setenv("TRT_SUBGRAPH_KEY_FILE", str(tmp_path / "cache.key"))
    options = Options.from_user({"cache_dir": str(tmp_path / "disk"), "remote_cache": redis_url})
    store = build.ArtifactStore(InductorEngine(), options)
    key = make_key({"k": "remote only"})
    assert store.remote.put(key, b"artifact", META) and store.disk.get(key) is None
    assert saved._artifact_bytes(store, key, SubgraphRecord(fingerprint="f" * 32, nodes=1)) == b"artifact"
    assert store.disk.get(key) == b"artifact", "a remote hit is written to the disk cache too"


def test_a_lease_request_that_fails_keeps_no_lock(redis_url, tmp_path, monkeypatch):
    import redis

    def refuse(self, *args, **kwargs):
        raise redis.ConnectionError("connection reset")

    cache = open_cache(redis_url, tmp_path)
    monkeypatch.setattr(redis.lock.Lock, "acquire", refuse)
    with cache.claim(make_key({"k": "refused"})) as found:
        assert found is None, "builds without the lease"
    assert cache._locks == {} and not cache.available


def test_messages_hide_the_urls_password(tmp_path):
    shown = {url: open_cache(url, tmp_path).shown_url for url in ("redis://u:pw@h:6379/0", "redis://:pw@[::1]:6379/1")}
    assert shown == {
        "redis://u:pw@h:6379/0": "redis://u:***@h:6379/0",
        "redis://:pw@[::1]:6379/1": "redis://:***@[::1]:6379/1",
    }


def test_a_waiting_process_loads_what_the_lease_holder_stored(redis_url, tmp_path, caplog):
    holder, waiter = open_cache(redis_url, tmp_path), open_cache(redis_url, tmp_path)
    impatient = open_cache(redis_url, tmp_path, wait_timeout=0)
    key = make_key({"k": 3})
    got = []

    def wait():
        with waiter.claim(key) as found:
            got.append(found)

    with holder.claim(key) as found:
        assert found is None  # the lease is ours: build
        with caplog.at_level(logging.WARNING), impatient.claim(key) as other:
            assert other is None  # waited its (zero) time: builds itself
        assert "building it here" in caplog.text
        thread = threading.Thread(target=wait)
        thread.start()
        thread.join(0.5)
        assert not got, "the waiter waits while the lease is held"
        holder.put(key, b"built once", META)
    thread.join(10)
    assert got and got[0][1] == b"built once"


def test_a_builder_killed_mid_build_loses_its_lease_and_another_process_builds(redis_url, tmp_path, caplog):
    load_or_create_secret(tmp_path / "cache.key")
    child = subprocess.Popen(
        [sys.executable, "-c", HANGING, redis_url, str(tmp_path / "dead")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "building"
        leases = open_cache(redis_url, tmp_path).client.keys("trt_subgraph:*:lease:*")
        assert len(leases) == 1
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with caplog.at_level(logging.INFO):
        report = compile_encoder(redis_url, tmp_path / "alive")
    assert report.totals["builds"] == report.totals["unique_subgraphs"]
    assert report.totals["remote_hits"] == 0


def test_processes_of_a_fleet_build_each_subgraph_once(redis_url, tmp_path):
    load_or_create_secret(tmp_path / "cache.key")  # the fleet's one key file
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, redis_url, str(tmp_path / f"disk{i}"), str(tmp_path / f"out{i}.pt")],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    unique = results[0]["totals"]["unique_subgraphs"]
    assert unique >= 2
    assert sum(r["totals"]["builds"] for r in results) == unique
    assert sum(r["totals"]["remote_hits"] for r in results) == 3 * unique
    assert all(r["err"] < 1e-5 for r in results)
    outs = [torch.load(tmp_path / f"out{i}.pt") for i in range(4)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    listing = subprocess.run(
        [sys.executable, "-m", "trt_subgraph", "cache", "ls", "--remote", redis_url, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    keys = {e["key"] for e in json.loads(listing.stdout)}
    assert len(keys) == unique
    for i in range(4):  # what the fleet shares is in every local disk cache too (remote hits fill it)
        assert keys <= {p.name.removesuffix(".entry") for p in (tmp_path / f"disk{i}").glob("*.entry")}


def test_entries_signed_with_another_key_or_damaged_are_rejected_and_rebuilt(redis_url, tmp_path, caplog):
    first = compile_encoder(redis_url, tmp_path / "a")
    cache = open_cache(redis_url, tmp_path)
    keys = [info.key for info in cache.entries()]
    assert len(keys) == first.totals["unique_subgraphs"]
    forger = remote.RedisCache(redis_url, key_file=tmp_path / "other.key")
    damaged = keys[0]
    name = f"trt_subgraph:1:entry:{damaged}"
    data = bytearray(cache.client.get(name))
    data[-10] ^= 0xFF
    cache.client.set(name, bytes(data))
    for key in keys[1:]:  # the same payload, signed with another key
        _, payload = cache.get(key)
        forger.put(key, payload, META)
    with caplog.at_level(logging.WARNING):
        second = compile_encoder(redis_url, tmp_path / "b")
    assert {s.status for s in second.subgraphs} == {"built"}
    assert "checksum" in caplog.text and "authentication tag mismatch" in caplog.text
    assert set(cache.verify()["ok"]) == set(keys), "the rebuilt entries were stored"
    third = compile_encoder(redis_url, tmp_path / "c")
    assert {s.status for s in third.subgraphs} == {"remote_hit"}


def test_a_server_stopped_mid_run_gives_warnings_and_correct_outputs(redis_servers, tmp_path, caplog, monkeypatch):
    from trt_subgraph.engines.inductor import InductorEngine

    server = redis_servers()
    real_build = InductorEngine.build

    def build_then_stop(self, sub, weights):
        server.stop()  # after the first lookups and lease, before the first store
        return real_build(self, sub, weights)

    monkeypatch.setattr(InductorEngine, "build", build_then_stop)
    with caplog.at_level(logging.WARNING, logger="trt_subgraph.cache.remote"):
        report = compile_encoder(server.url, tmp_path / "a")
    assert report.totals["builds"] == report.totals["unique_subgraphs"] >= 2
    warnings = [r for r in caplog.records if r.name == "trt_subgraph.cache.remote"]
    assert len(warnings) == 1 and "building and caching locally" in warnings[0].getMessage()


def test_a_stalled_server_costs_one_bounded_wait_and_one_warning(redis_servers, tmp_path, caplog):
    server = redis_servers()
    compile_encoder(server.url, tmp_path / "a")
    os.kill(server.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        with caplog.at_level(logging.WARNING, logger="trt_subgraph.cache.remote"):
            report = compile_encoder(server.url, tmp_path / "b")
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert {s.status for s in report.subgraphs} == {"built"}
    warnings = [r for r in caplog.records if r.name == "trt_subgraph.cache.remote"]
    assert len(warnings) == 1 and "TimeoutError" in warnings[0].getMessage()


def test_lookups_that_fail_together_warn_once(tmp_path, caplog):
    """Fetch threads look up several subgraphs at once; when the server stalls they fail at about
    the same moment, and the outage must still cost one warning (two were logged)."""
    cache = open_cache("redis://127.0.0.1:1/0", tmp_path)  # no connection is made by _call itself
    together = threading.Barrier(8)

    def stalled() -> None:
        together.wait()
        raise TimeoutError("Timeout reading from socket")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often, as they do on a loaded machine
    try:
        with caplog.at_level(logging.WARNING, logger="trt_subgraph.cache.remote"):
            threads = [threading.Thread(target=cache._call, args=("look up", None, stalled)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(interval)
    warnings = [r for r in caplog.records if r.name == "trt_subgraph.cache.remote"]
    assert len(warnings) == 1 and "TimeoutError" in warnings[0].getMessage()
    assert not cache.available


def test_cache_commands_on_the_remote(redis_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRT_SUBGRAPH_KEY_FILE", str(tmp_path / "cache.key"))
    cache = open_cache(redis_url, tmp_path)
    good, bad = make_key({"k": 5}), make_key({"k": 6})
    cache.put(good, b"good", META)
    cache.client.set(f"trt_subgraph:1:entry:{bad}", b"not an entry")
    assert main(["cache", "ls", "--remote", redis_url]) == 0
    out = capsys.readouterr().out
    assert good in out and bad in out and "2 entries" in out
    assert main(["cache", "stats", "--remote", redis_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 2
    assert main(["cache", "verify", "--remote", redis_url]) == 1
    assert f"removed  {bad}" in capsys.readouterr().out
    assert main(["cache", "clear", "--remote", redis_url]) == 0
    assert cache.entries() == []
    assert main(["cache", "ls", "--remote", "redis://127.0.0.1:1/0"]) == 2
    assert "cannot use the remote cache" in capsys.readouterr().err
    assert main(["cache", "ls", "--remote", "s3://bucket"]) == 2
    assert "allowed: redis://" in capsys.readouterr().err


def test_without_redis_py_the_option_and_the_client_say_what_to_install(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "redis" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"redis-py is not installed; pip install 'trt_subgraph\[remote\]'"):
        Options.from_user({"remote_cache": "redis://127.0.0.1:6379/0"})
    assert Options.from_user({}).remote_cache is None  # unset: nothing needs it
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'trt_subgraph\[remote\]'"):
        remote.RedisCache("redis://127.0.0.1:6379/0")
