"""Disk cache: format, faults, eviction, locking and CLI (CPU only, no torch)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xxhash

import trt_subgraph.cache as cachemod
import trt_subgraph.cache.entry as entrymod
from trt_subgraph.cache import DiskCache, make_key
from trt_subgraph.cli import cache as cache_cli

META = {"engine": "eager", "versions": {"torch": "2.13.0", "format": cachemod.FORMAT_VERSION}}

# Children import the cache package, which imports no torch (a child starts in well under a second).
CHILD_PRELUDE = """
import os, sys, time
import xxhash
import trt_subgraph.cache as cache
assert "torch" not in sys.modules
"""


def child(code: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + code, *map(str, args)], text=True, **popen)


def run_child(code: str, *args: str, env: dict | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CHILD_PRELUDE + code, *map(str, args)],
        text=True,
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def cache_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("trt_subgraph.cache") and r.levelno == logging.WARNING
    ]


def key(i: int | str) -> str:
    return make_key({"test": i})


def payload_for(i: int, size: int = 10_000) -> bytes:
    return os.urandom(16) + bytes([i % 256]) * (size - 16)


@pytest.fixture
def env(tmp_path, monkeypatch, caplog):
    """Private key file and cache dir under tmp_path; never touches the user's real ones."""
    monkeypatch.setenv("TRT_SUBGRAPH_KEY_FILE", str(tmp_path / "conf" / "cache.key"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg_config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
    monkeypatch.delenv("TRT_SUBGRAPH_CACHE_DIR", raising=False)
    caplog.set_level(logging.INFO, logger="trt_subgraph.cache")
    return tmp_path / "cache"


@pytest.fixture
def cache(env) -> DiskCache:
    return DiskCache(env, size_limit=1 << 20)


def entry_files(directory: Path) -> set[str]:
    return {p.name[: -len(".entry")] for p in directory.glob("*.entry")}


# ----------------------------------------------------------------------------- basics


def test_round_trip_and_inspection(cache):
    k = key(0)
    data = payload_for(0)
    assert cache.get(k) is None
    assert cache.put(k, data, {**META, "info": {"fingerprint": "f" * 32}})
    assert cache.get(k) == data
    for other in (bytearray(b"abc"), memoryview(b"defg")):
        assert cache.put(key(1), other, META) and cache.get(key(1)) == bytes(other)
    raw = (cache.directory / f"{k}.entry").read_bytes()
    assert raw.startswith(cachemod.MAGIC) and raw.endswith(data)
    [info] = [e for e in cache.entries() if e.key == k]
    assert (info.engine, info.size, info.versions, info.info) == (
        "eager",
        len(raw),
        META["versions"],
        {"fingerprint": "f" * 32},
    )
    assert abs(info.created - time.time()) < 60
    s = cache.stats()
    assert s["entries"] == 2 and s["bytes"] == sum(e.size for e in cache.entries())
    assert s["limit"] == 1 << 20 and s["directory"] == str(cache.directory)


def test_get_marks_entry_used(cache):
    k = key(0)
    cache.put(k, b"x" * 100, META)
    path = cache.directory / f"{k}.entry"
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    assert cache.entries()[0].last_used < time.time() - 3000
    assert cache.get(k) == b"x" * 100
    assert cache.entries()[0].last_used > time.time() - 60


def test_put_replaces_entry_atomically(cache):
    k = key(0)
    assert cache.put(k, b"old", META) and cache.put(k, b"new", META)
    assert cache.get(k) == b"new"
    assert [p.name for p in cache.directory.iterdir() if p.is_file()] == [f"{k}.entry"]


def test_bad_arguments(env):
    with pytest.raises(ValueError, match="size_limit"):
        DiskCache(env, size_limit=0)
    with pytest.raises(TypeError, match="size_limit"):
        DiskCache(env, size_limit=1.5)
    c = DiskCache(env)
    with pytest.raises(ValueError, match="32 lowercase hex"):
        c.get("../etc/passwd")
    with pytest.raises(ValueError, match="unknown keys"):
        c.put(key(0), b"x", {**META, "colour": "red"})
    with pytest.raises(ValueError, match="engine"):
        c.put(key(0), b"x", {"versions": {}})
    with pytest.raises(TypeError, match="bytes-like"):
        c.put(key(0), "text", META)
    with pytest.raises(TypeError, match=r"meta\['versions'\]\['torch'\]"):
        c.put(key(0), b"x", {"engine": "eager", "versions": {"torch": object()}})
    with pytest.raises(ValueError, match="timeout"), c.build_lock(key(0), timeout=-1):
        pass


def test_second_instance_and_second_process_read_entries(cache, env):
    k1, k2 = key(1), key(2)
    data = payload_for(1)
    assert cache.put(k1, data, META)
    assert DiskCache(env).get(k1) == data
    out = run_child(
        "c = cache.DiskCache(sys.argv[1])\n"
        "p = c.get(sys.argv[2]); print(xxhash.xxh3_128_hexdigest(p) if p else None)\n"
        "assert c.put(sys.argv[3], b'from child', {'engine': 'eager'})\n",
        env,
        k1,
        k2,
    )
    assert out.strip() == xxhash.xxh3_128_hexdigest(data)
    assert cache.get(k2) == b"from child"


# ----------------------------------------------------------------------------- faults


def _split(path: Path) -> tuple[bytes, dict, bytes]:
    data = path.read_bytes()
    hlen = struct.unpack(">I", data[12:16])[0]
    return data[: 16 + hlen], json.loads(data[16 : 16 + hlen]), data[16 + hlen :]


def _truncate(path, **_):
    path.write_bytes(path.read_bytes()[:-7])


def _flip_payload(path, **_):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_header_valid_json(path, **_):
    data = path.read_bytes()
    assert data.count(b'"engine":"eager"') == 1
    path.write_bytes(data.replace(b'"engine":"eager"', b'"engine":"eagex"'))


def _flip_header_invalid_json(path, **_):
    data = bytearray(path.read_bytes())
    data[16] ^= 0x40  # the opening '{'
    path.write_bytes(bytes(data))


def _consistent_forgery(path, **_):
    """An attacker who can write the directory but lacks the key: new payload, matching size and checksum."""
    _, header, _ = _split(path)
    evil = b"import os; os.system('echo pwned')"
    header.update(payload_size=len(evil), payload_xxh3_128=xxhash.xxh3_128_hexdigest(evil))
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(cachemod.MAGIC + struct.pack(">II", cachemod.FORMAT_VERSION, len(body)) + body + evil)


def _other_format_version(path, cache, k, monkeypatch, **_):
    with monkeypatch.context() as m:
        m.setattr(entrymod, "FORMAT_VERSION", cachemod.FORMAT_VERSION + 1)
        assert cache.put(k, b"written by a future version", META)


def _garbage(path, **_):
    path.write_bytes(os.urandom(5000))


def _empty(path, **_):
    path.write_bytes(b"")


def _header_only(path, **_):
    path.write_bytes(_split(path)[0])


def _entry_of_other_key(path, cache, **_):
    cache.put(key("other"), b"other payload", META)
    path.write_bytes((cache.directory / f"{key('other')}.entry").read_bytes())


def _foreign_key_file(path, cache, k, **_):
    foreign = DiskCache(cache.directory, key_file=cache.directory.parent / "someone_else.key")
    assert foreign.put(k, b"signed by someone else", META)
    assert foreign.get(k) == b"signed by someone else"


def _deeply_nested_header(path, **_):
    """200,000 nested JSON arrays in a well-formed prefix (under 1 MiB): json.loads recurses."""
    body = b"[" * 200_000 + b"]" * 200_000
    path.write_bytes(cachemod.MAGIC + struct.pack(">II", cachemod.FORMAT_VERSION, len(body)) + body)


def _nan_created(path, **_):
    _, header, payload = _split(path)
    body = json.dumps({**header, "created": float("nan")}, sort_keys=True, separators=(",", ":")).encode()
    assert b"NaN" in body
    path.write_bytes(cachemod.MAGIC + struct.pack(">II", cachemod.FORMAT_VERSION, len(body)) + body + payload)


FAULTS = {
    "truncated": (_truncate, "truncated"),
    "flipped_payload_byte": (_flip_payload, "checksum"),
    "flipped_header_byte_valid_json": (_flip_header_valid_json, "authentication"),
    "flipped_header_byte_invalid_json": (_flip_header_invalid_json, "unreadable header"),
    "forged_payload_with_matching_checksum": (_consistent_forgery, "authentication"),
    "missing_payload": (_header_only, "payload is 0 bytes"),
    "entry_of_other_key": (_entry_of_other_key, "belongs to key"),
    "foreign_key_file": (_foreign_key_file, "another key file"),
    "deeply_nested_header": (_deeply_nested_header, "nested too deeply"),
    "nan_in_header": (_nan_created, "not a finite number"),
}

# Files under an entry's name that this release does not judge: a miss, never removed.
NOT_JUDGED = {
    "other_format_version": (_other_format_version, f"format version {cachemod.FORMAT_VERSION + 1}", False),
    "garbage": (_garbage, "bad magic", True),
    "empty": (_empty, "bad magic", True),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_entry_detected_warned_once_removed(cache, caplog, monkeypatch, fault):
    damage, reason = FAULTS[fault]
    k = key(0)
    data = payload_for(0)
    assert cache.put(k, data, META)
    path = cache.directory / f"{k}.entry"
    damage(path=path, cache=cache, k=k, monkeypatch=monkeypatch)
    caplog.clear()
    assert cache.get(k) is None
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and k in warnings[0] and reason in warnings[0], warnings
    assert not path.exists()
    assert cache.get(k) is None and len(cache_warnings(caplog)) == 1
    assert cache.put(k, data, META) and cache.get(k) == data  # rebuilt


@pytest.mark.parametrize("fault", NOT_JUDGED)
def test_files_not_judged_are_a_miss_and_left_alone(cache, caplog, monkeypatch, fault):
    """Another release's entries and files that are not entries are never removed; verify counts them."""
    damage, reason, warned = NOT_JUDGED[fault]
    k = key(0)
    assert cache.put(k, payload_for(0), META)
    path = cache.directory / f"{k}.entry"
    damage(path=path, cache=cache, k=k, monkeypatch=monkeypatch)
    before = path.read_bytes()
    caplog.clear()
    assert cache.get(k) is None and cache.get(k) is None
    assert len(cache_warnings(caplog)) == int(warned)
    assert any(reason in r.getMessage() for r in caplog.records)
    result = cache.verify()
    assert result["removed"] == [] and [x for x, _ in result["skipped"]] == [k]
    assert path.read_bytes() == before
    assert cache.put(k, b"this release's", META) and cache.get(k) == b"this release's"  # the key's owner may replace it


def test_bad_key_file_disables_cache_without_wiping_it(cache, env, caplog, monkeypatch):
    k = key(0)
    cache.put(k, b"payload", META)
    bad = env.parent / "bad.key"
    bad.write_bytes(b"short")
    bad.chmod(0o600)
    caplog.clear()
    c = DiskCache(env, key_file=bad)
    assert c.get(k) is None and c.get(k) is None and not c.put(key(1), b"x", META)
    [w] = cache_warnings(caplog)
    assert "bad.key" in w and "5 bytes" in w
    with pytest.raises(RuntimeError, match="cannot verify"):
        c.verify()
    assert cache.get(k) == b"payload"


def test_verify_never_creates_a_key_file(cache, env, capsys, monkeypatch):
    """`sudo trt-subgraph cache verify` (another HOME, no key yet) must not wipe the user's cache."""
    k = key(0)
    cache.put(k, b"payload", META)
    missing = env.parent / "nobody" / "cache.key"
    with pytest.raises(RuntimeError, match="without the key file"):
        DiskCache(env, key_file=missing).verify()
    monkeypatch.setenv("TRT_SUBGRAPH_KEY_FILE", str(missing))
    assert _cli("cache", "verify", "--dir", str(env)) == 2
    assert "without the key file" in capsys.readouterr().err
    assert not missing.exists() and cache.get(k) == b"payload"


def test_unusable_directory_degrades(env, caplog):
    env.parent.mkdir(exist_ok=True)
    env.write_bytes(b"a file where the cache directory should be")
    c = DiskCache(env)
    assert len(cache_warnings(caplog)) == 1 and "disabled" in cache_warnings(caplog)[0]
    assert c.get(key(0)) is None and not c.put(key(0), b"x", META)
    ran = False
    with c.build_lock(key(0)):
        ran = True
    assert ran and len(cache_warnings(caplog)) == 1


# ----------------------------------------------------------------------------- read-only, full disk


@pytest.fixture
def read_only(monkeypatch):
    """Make a directory read-only. As root chmod does not stop writes, so then every write
    syscall into the directory fails with EROFS, as on a read-only mount."""
    changed: list[Path] = []
    chmod = os.chmod  # the simulation patches os.chmod; teardown needs the real one

    def make(directory: Path) -> str:
        for d in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
            os.chmod(d, 0o500)
            changed.append(d)
        try:
            (directory / ".probe").touch()
        except PermissionError:
            return "chmod"
        (directory / ".probe").unlink()
        root = os.path.abspath(directory)

        def inside(p, dir_fd=None) -> bool:
            if not isinstance(p, (str, os.PathLike)):
                return False
            if dir_fd is not None:  # a path relative to an open directory (the cache opens locks/ so)
                p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
            return (os.path.abspath(p) + os.sep).startswith(root + os.sep)

        def guard(fn, writes=lambda *a, **k: True):
            def wrapper(p, *a, **k):
                if inside(p, k.get("dir_fd")) and writes(p, *a, **k):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))
                return fn(p, *a, **k)

            return wrapper

        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        monkeypatch.setattr(os, "open", guard(os.open, lambda p, flags, *a, **k: flags & write_flags))
        for name in ("unlink", "remove", "mkdir", "rmdir", "replace", "rename", "link", "utime", "chmod"):
            monkeypatch.setattr(os, name, guard(getattr(os, name)))
        return "simulated EROFS"

    yield make
    for d in changed:
        chmod(d, 0o700)


def test_read_only_directory(cache, caplog, read_only):
    good, bad = key("good"), key("bad")
    cache.put(good, b"good payload", META)
    cache.put(bad, b"bad payload", META)
    _flip_payload(cache.directory / f"{bad}.entry")
    with cache.build_lock(good):
        pass  # creates locks/ while still writable
    mode = read_only(cache.directory)
    caplog.clear()
    c = DiskCache(cache.directory)
    assert c.get(good) == b"good payload", mode  # a read-only shared cache still serves hits
    # put fails: one warning for the directory, not one per put
    assert not c.put(key(1), b"x", META) and not c.put(key(2), b"y", META)
    assert len(cache_warnings(caplog)) == 1 and "cannot write" in cache_warnings(caplog)[0]
    assert entry_files(c.directory) == {good, bad}
    assert not [p for p in c.directory.iterdir() if p.name.endswith(".tmp")]
    # damaged entry that cannot be removed: warned about once, never returned
    caplog.clear()
    assert c.get(bad) is None and c.get(bad) is None
    [w] = cache_warnings(caplog)
    assert "checksum" in w and "could not remove" in w
    assert (c.directory / f"{bad}.entry").exists()
    # locks degrade to a no-op with one warning
    caplog.clear()
    ran = 0
    for k in (key(1), key(2)):
        with c.build_lock(k):
            ran += 1
    assert ran == 2
    [w] = cache_warnings(caplog)
    assert "cannot lock" in w


@pytest.mark.parametrize("call, err", [("fsync", errno.ENOSPC), ("replace", errno.EROFS)])
def test_write_failure_keeps_old_entry(cache, caplog, monkeypatch, call, err):
    k = key(0)
    assert cache.put(k, b"version 1", META)

    def fail(*a, **kw):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, call, fail)
    caplog.clear()
    assert cache.put(k, b"version 2", META) is False
    [w] = cache_warnings(caplog)
    assert os.strerror(err) in w
    monkeypatch.undo()
    assert [p.name for p in cache.directory.iterdir() if p.is_file()] == [f"{k}.entry"]  # temp file cleaned
    assert cache.get(k) == b"version 1"


def test_abandoned_temp_files_cleaned_by_writers_only(env):
    """Temp files of dead writers go at the next put, past or future-dated; `ls`/`stats` touch nothing."""
    env.mkdir(mode=0o700)
    old, future, young = (env / f".{key(i)}.abc12{i}.tmp" for i in range(3))
    for p in (old, future, young):
        p.write_bytes(b"partial")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    os.utime(future, (time.time() + 3600, time.time() + 3600))  # written on a host whose clock runs ahead
    c = DiskCache(env)
    c.entries(), c.stats()
    assert _cli("cache", "ls", "--dir", str(env)) == 0 and _cli("cache", "stats", "--dir", str(env)) == 0
    assert old.exists() and future.exists() and young.exists()
    assert c.put(key(9), b"x", META)
    assert not old.exists() and not future.exists() and young.exists()


# ----------------------------------------------------------------------------- eviction


def _sized_cache(directory: Path, n_entries: float) -> tuple[DiskCache, int]:
    probe = DiskCache(directory)
    probe.put(key("probe"), payload_for(0), META)
    size = (directory / f"{key('probe')}.entry").stat().st_size
    probe.clear()
    return DiskCache(directory, size_limit=int(size * n_entries)), size


def _put_aged(c: DiskCache, i: int, age: float) -> None:
    assert c.put(key(i), payload_for(i), META)
    t = time.time() - age
    os.utime(c.directory / f"{key(i)}.entry", (t, t))


def test_eviction_is_lru_and_keeps_under_limit(env):
    c, _ = _sized_cache(env, 3.5)
    for i, age in enumerate((300, 200, 100)):
        _put_aged(c, i, age)
    assert c.get(key(0)) is not None  # the oldest entry is used again ...
    _put_aged(c, 3, 50)
    assert entry_files(env) == {key(0), key(2), key(3)}  # ... so the least recently *used* one goes
    for i in range(4, 10):
        _put_aged(c, i, 40 - i)
        assert c.stats()["bytes"] <= c.size_limit
        assert len(entry_files(env)) == 3
    assert entry_files(env) == {key(0), key(8), key(9)}  # key(0) was used after all of them


def test_accounting_rebuilt_from_disk(env):
    _, size = _sized_cache(env, 1)
    big = DiskCache(env)
    for i in range(5):
        _put_aged(big, i, 100 - i)
    total = sum(p.stat().st_size for p in env.glob("*.entry"))
    c = DiskCache(env, size_limit=int(size * 2.5))
    assert c.stats()["bytes"] == total  # known before this instance wrote anything
    assert len(entry_files(env)) == 5  # and construction alone evicts nothing
    c.put(key(9), payload_for(9), META)
    assert entry_files(env) == {key(4), key(9)}


def test_entry_larger_than_limit_not_stored(env, caplog):
    c, size = _sized_cache(env, 2.5)
    _put_aged(c, 0, 10)
    caplog.clear()
    assert c.put(key(1), payload_for(1, size=3 * size), META) is False
    [w] = cache_warnings(caplog)
    assert "exceeds the cache size limit" in w
    assert entry_files(env) == {key(0)}


def test_entry_locked_by_other_process_not_evicted(env):
    c, _ = _sized_cache(env, 3.5)
    for i, age in enumerate((300, 200, 100)):
        _put_aged(c, i, age)
    holder = child(
        "c = cache.DiskCache(sys.argv[1])\n"
        "with c.build_lock(sys.argv[2]):\n"
        "    print('locked', flush=True); sys.stdin.readline()\n",
        env,
        key(0),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        _put_aged(c, 3, 50)
        assert entry_files(env) == {key(0), key(2), key(3)}  # key(0) is oldest but in use
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    _put_aged(c, 4, 40)
    assert entry_files(env) == {key(2), key(3), key(4)}


# ----------------------------------------------------------------------------- locking


def test_four_processes_build_once(env, tmp_path):
    """Started together, with a key file none of them has yet: exactly one builds, all get its payload."""
    count = tmp_path / "builds"
    code = (
        "c = cache.DiskCache(sys.argv[1])\n"
        "k, count, start = sys.argv[2], sys.argv[3], float(sys.argv[4])\n"
        "while time.time() < start: time.sleep(0.001)\n"
        "with c.build_lock(k):\n"
        "    p = c.get(k)\n"
        "    if p is None:\n"
        "        fd = os.open(count, os.O_WRONLY | os.O_CREAT | os.O_APPEND)\n"
        "        os.write(fd, b'%d\\n' % os.getpid()); os.close(fd)\n"
        "        time.sleep(0.3)\n"
        "        p = os.urandom(1000)\n"
        "        assert c.put(k, p, {'engine': 'eager'})\n"
        "print(xxhash.xxh3_128_hexdigest(p))\n"
    )
    assert not Path(os.environ["TRT_SUBGRAPH_KEY_FILE"]).exists()
    start = time.time() + 1.5  # all four past their imports, then go together
    procs = [child(code, env, key(0), count, start, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert len(count.read_text().split()) == 1
    digests = {o[0].strip() for o in outs}
    assert len(digests) == 1
    assert xxhash.xxh3_128_hexdigest(DiskCache(env).get(key(0))) == digests.pop()


def test_lock_of_killed_process_does_not_block(env, caplog):
    c = DiskCache(env)
    k = key(0)
    holder = child(
        "c = cache.DiskCache(sys.argv[1])\n"
        "with c.build_lock(sys.argv[2]):\n"
        "    print('locked', flush=True); time.sleep(600)\n",
        env,
        k,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        caplog.clear()
        with c.build_lock(k, timeout=0.3):  # really held: we time out and go on without it
            pass
        [w] = cache_warnings(caplog)
        assert "building without it" in w
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    caplog.clear()
    t0 = time.monotonic()
    with c.build_lock(k, timeout=20):
        elapsed = time.monotonic() - t0
    assert elapsed < 2 and cache_warnings(caplog) == []


# ----------------------------------------------------------------------------- keys

KEY_PARTS = {
    "fingerprint": "0123456789abcdef0123456789abcdef",
    "engine": "inductor",
    "settings": {
        "mode": "max-autotune",
        "flags": {"alpha", "beta", "gamma", "delta", "epsilon"},
        "frozen": frozenset({"x", "y", "z"}),
        "shape": (1, 128, 768),
        "fp16": False,
        "ws": None,
    },
    "versions": {"torch": "2.13.0", "cache_format": 1},
    "device": {"cc": [8, 0], "name": "NVIDIA H100"},
}


def test_make_key_stable_across_hash_seeds():
    expected = make_key(KEY_PARTS)
    assert len(expected) == 32 and int(expected, 16) >= 0
    code = f"print(cache.make_key({KEY_PARTS!r}))"
    for seed in ("0", "1", "4242"):
        out = run_child(code, env={**os.environ, "PYTHONHASHSEED": seed})
        assert out.strip() == expected, seed
    reordered = {k: KEY_PARTS[k] for k in reversed(list(KEY_PARTS))}
    reordered["settings"] = dict(reversed(list(KEY_PARTS["settings"].items())))
    assert make_key(reordered) == expected


def _mutations():
    """One copy of KEY_PARTS per leaf, with only that leaf changed."""

    def walk(value, set_value):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, lambda new, k=k: set_value({**value, k: new}))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from walk(v, lambda new, i=i: set_value(type(value)([*value[:i], new, *value[i + 1 :]])))
        elif isinstance(value, (set, frozenset)):
            yield set_value(type(value)(value | {"extra"}))
        elif isinstance(value, bool):
            yield set_value(not value)
        elif isinstance(value, (int, float)):
            yield set_value(value + 1)
        elif isinstance(value, str):
            yield set_value(value + "_")
        else:  # None
            yield set_value(0)

    yield from walk(KEY_PARTS, lambda new: new)


def test_make_key_sensitive_to_each_part():
    keys = [make_key(m) for m in _mutations()]
    assert len(keys) >= 14
    assert len(set(keys) | {make_key(KEY_PARTS)}) == len(keys) + 1
    assert make_key({"a": True}) != make_key({"a": 1}) != make_key({"a": 1.0})
    assert make_key({"a": (1, 2)}) == make_key({"a": [1, 2]})


@pytest.mark.parametrize(
    "parts, exc, match",
    [
        ({"settings": {"dtype": object()}}, TypeError, r"parts\['settings'\]\['dtype'\] is a object"),
        ({"path": Path("/tmp")}, TypeError, r"parts\['path'\] is a PosixPath"),
        ({"blob": b"x"}, TypeError, r"parts\['blob'\] is a bytes"),
        ({"m": {1: "a"}}, TypeError, r"parts\['m'\] has a key 1"),
        ({"lr": float("nan")}, ValueError, r"parts\['lr'\] is nan"),
    ],
)
def test_make_key_rejects_non_plain_data(parts, exc, match):
    with pytest.raises(exc, match=match):
        make_key(parts)
    with pytest.raises(TypeError, match="expects a dict"):
        make_key([("a", 1)])


# ----------------------------------------------------------------------------- locations, permissions


def test_default_locations(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("TRT_SUBGRAPH_CACHE_DIR", "XDG_CACHE_HOME", "TRT_SUBGRAPH_KEY_FILE", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert cachemod.default_cache_dir() == tmp_path / "home" / ".cache" / "trt_subgraph"
    assert cachemod.default_key_file() == tmp_path / "home" / ".config" / "trt_subgraph" / "cache.key"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cachemod.default_cache_dir() == tmp_path / "home" / ".cache" / "trt_subgraph"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xc"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xg"))
    assert cachemod.default_cache_dir() == tmp_path / "xc" / "trt_subgraph"
    assert cachemod.default_key_file() == tmp_path / "xg" / "trt_subgraph" / "cache.key"
    monkeypatch.setenv("TRT_SUBGRAPH_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("TRT_SUBGRAPH_KEY_FILE", str(tmp_path / "my.key"))
    assert cachemod.default_cache_dir() == tmp_path / "mine"
    assert cachemod.default_key_file() == tmp_path / "my.key"


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_directories_0700_key_file_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        c = DiskCache(tmp_path / "a" / "cache", key_file=tmp_path / "conf" / "trt" / "cache.key")
        assert c.put(key(0), b"x", META)
        with c.build_lock(key(0)):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "cache").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "cache" / "locks").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "conf" / "trt").stat().st_mode) == 0o700
    key_file = tmp_path / "conf" / "trt" / "cache.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_bytes()) == 32
    assert stat.S_IMODE((tmp_path / "a" / "cache" / f"{key(0)}.entry").stat().st_mode) == 0o600


# ----------------------------------------------------------------------------- verify, clear, CLI


def test_verify_removes_only_damaged_and_keeps_lru_order(cache, caplog):
    for i in range(5):
        _put_aged(cache, i, 100 - i)
    _flip_payload(cache.directory / f"{key(1)}.entry")
    _truncate(cache.directory / f"{key(3)}.entry")
    journal = cache.directory / "journal.entry"  # a user's file: not a key, not ours to judge
    journal.write_bytes(b"dear diary")
    mtimes = {k: (cache.directory / f"{k}.entry").stat().st_mtime_ns for k in (key(0), key(2), key(4))}
    caplog.clear()
    result = cache.verify()
    assert sorted(result["ok"]) == sorted([key(0), key(2), key(4)])
    reasons = dict(result["removed"])
    assert set(reasons) == {key(1), key(3)} and result["skipped"] == []
    assert "checksum" in reasons[key(1)] and "truncated" in reasons[key(3)]
    assert cache_warnings(caplog) == []  # the result reports them; a warning would say it twice
    assert entry_files(cache.directory) == {*mtimes, "journal"}
    assert {k: (cache.directory / f"{k}.entry").stat().st_mtime_ns for k in mtimes} == mtimes
    assert cache.clear() == 3 and entry_files(cache.directory) == {"journal"} and cache.stats()["entries"] == 0
    assert journal.read_bytes() == b"dear diary"


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="trt-subgraph")
    cache_cli.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli(cache, capsys):
    d = str(cache.directory)
    cache.put(key(0), payload_for(0, 3000), {**META, "info": {"fingerprint": "f" * 32}})
    cache.put(key(1), b"tiny", {"engine": "inductor"})
    assert _cli("cache", "ls", "--dir", d) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["KEY", "FINGERPRINT", "ENGINE", "SIZE", "LAST", "USE"]
    assert any(key(0) in ln and "f" * 32 in ln and "eager" in ln and "KiB" in ln for ln in lines)
    assert any(key(1) in ln and "inductor" in ln for ln in lines)
    assert _cli("cache", "ls", "--dir", d, "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert {e["key"]: e["engine"] for e in listed} == {key(0): "eager", key(1): "inductor"}
    assert _cli("cache", "stats", "--dir", d, "--json") == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 2
    assert _cli("cache", "stats", "--dir", d) == 0
    assert "entries    2" in capsys.readouterr().out
    _flip_payload(cache.directory / f"{key(1)}.entry")
    _garbage(cache.directory / f"{key(2)}.entry")
    assert _cli("cache", "ls", "--dir", d, "--json") == 0
    assert {e["key"]: e["engine"] for e in json.loads(capsys.readouterr().out)}[key(2)] == "?"
    assert _cli("cache", "verify", "--dir", d) == 1
    out = capsys.readouterr().out
    assert f"removed  {key(1)}  payload checksum mismatch" in out
    assert f"skipped  {key(2)}  not a trt_subgraph cache entry" in out and "1 ok, 1 damaged, 1 skipped" in out
    assert _cli("cache", "verify", "--dir", d, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["ok"], result["removed"], [k for k, _ in result["skipped"]]) == ([key(0)], [], [key(2)])
    assert _cli("cache", "clear", "--dir", d) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert entry_files(cache.directory) == {key(2)}  # not an entry: clear leaves it too
    missing = str(cache.directory.parent / "nope")
    assert _cli("cache", "ls", "--dir", missing, "--json") == 0
    assert json.loads(capsys.readouterr().out) == [] and not Path(missing).exists()


def test_shared_directory_modes_follow_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o750)
    c = DiskCache(shared, key_file=tmp_path / "k")
    assert c.put(key(0), b"x", META)
    with c.build_lock(key(0)):
        pass
    assert stat.S_IMODE((shared / f"{key(0)}.entry").stat().st_mode) == 0o640
    assert stat.S_IMODE((shared / "locks").stat().st_mode) == 0o750
    assert stat.S_IMODE((shared / "locks" / f"{key(0)}.lock").stat().st_mode) == 0o640
    assert stat.S_IMODE(shared.stat().st_mode) == 0o750  # an existing directory is not chmodded


def test_entry_just_written_survives_clock_skew(env):
    """Entries stamped in the future (another host's clock on a shared disk) must not make us evict our own."""
    c, _ = _sized_cache(env, 2.5)
    for i in range(2):
        _put_aged(c, i, -3600 - i)  # mtime an hour ahead
    assert c.put(key(9), payload_for(9), META)
    assert key(9) in entry_files(env) and len(entry_files(env)) == 2
    assert c.get(key(9)) is not None


def test_symlinked_entry_not_followed(cache, caplog, tmp_path):
    """A valid entry planted as a symlink (e.g. to a file the attacker cannot write itself) is not read."""
    k = key(0)
    cache.put(k, b"real", META)
    elsewhere = tmp_path / "elsewhere.entry"
    os.replace(cache.directory / f"{k}.entry", elsewhere)
    os.symlink(elsewhere, cache.directory / f"{k}.entry")
    caplog.clear()
    assert cache.get(k) is None and cache.get(k) is None
    [w] = cache_warnings(caplog)
    assert "cannot read" in w


def test_planted_fifo_does_not_block(cache, caplog):
    k = key(0)
    os.mkfifo(cache.directory / f"{k}.entry")
    caplog.clear()
    assert cache.get(k) is None
    [w] = cache_warnings(caplog)
    assert "not a regular file" in w and stat.S_ISFIFO((cache.directory / f"{k}.entry").stat().st_mode)
    assert cache.put(k, b"x", META) and cache.get(k) == b"x"


# ----------------------------------------------------------------------------- what the cache trusts

NOBODY = 65534  # another user (the conventional "nobody")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create files as another user (CI runs as root)")


def as_other_user(cwd: Path, code: str) -> None:
    """Run `code` in a child that is another user, its working directory `cwd` (entered before the
    switch, so the directories above need not be open to that user)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.chdir(cwd)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            exec(code, {"os": os})
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _key_file_refused(env, caplog, key_file: Path, *expected: str) -> None:
    """The cache is off (no get, no put, verify refuses) with one warning naming the file and saying why."""
    good = DiskCache(env, key_file=env.parent / "good.key")
    assert good.put(key(0), b"payload", META)
    before = entry_files(env)
    caplog.clear()
    for _ in range(3):  # three objects, as three compiled graphs make: still one warning
        c = DiskCache(env, key_file=key_file)
        assert c.get(key(0)) is None and not c.put(key(1), b"x", META)
    [w] = cache_warnings(caplog)
    assert str(key_file) in w and "fix:" in w and all(e in w for e in expected), w
    with pytest.raises(RuntimeError, match="refused"):
        c.verify()
    assert entry_files(env) == before  # nothing wiped


def test_key_file_readable_by_others_is_refused(env, caplog):
    key_file = env.parent / "loose.key"
    DiskCache(env, key_file=key_file).put(key(5), b"x", META)  # creates it, 0600
    os.chmod(key_file, 0o644)
    _key_file_refused(env, caplog, key_file, "mode 0644", f"chmod 600 {key_file}")
    os.chmod(key_file, 0o640)  # shared with its group: accepted
    assert DiskCache(env, key_file=key_file).get(key(5)) == b"x"


def test_key_file_in_a_directory_others_can_write_is_refused(env, caplog):
    shared = env.parent / "shared"
    shared.mkdir()
    key_file = shared / "cache.key"
    DiskCache(env, key_file=key_file).put(key(5), b"x", META)
    os.chmod(shared, 0o777)
    _key_file_refused(env, caplog, key_file, f"directory {shared} is writable by other users", "chmod go-w")
    os.chmod(shared, 0o1777)  # sticky, as /tmp: only a file's owner may replace it there
    assert DiskCache(env, key_file=key_file).get(key(5)) == b"x"


@as_root
def test_key_file_created_by_another_user_is_refused(env, caplog):
    key_file = env.parent / "planted.key"
    key_file.write_bytes(os.urandom(32))  # whoever created it knows the key
    os.chmod(key_file, 0o600)
    os.chown(key_file, NOBODY, NOBODY)
    _key_file_refused(env, caplog, key_file, f"belongs to uid {NOBODY}")


def test_key_file_that_is_a_fifo_is_refused_without_blocking(env, tmp_path):
    """A FIFO at the key path used to block the process forever (a child, so a hang fails the test)."""
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    out = run_child(
        "import logging; logging.basicConfig()\n"
        "c = cache.DiskCache(sys.argv[1], key_file=sys.argv[2])\n"
        "print(c.get(sys.argv[3]), c.put(sys.argv[3], b'x', {'engine': 'eager'}))\n",
        env,
        fifo,
        key(0),
    )
    assert out.split() == ["None", "False"]


def _shared_cache(tmp_path: Path) -> DiskCache:
    """A cache directory every user may write (0777, as on a shared scratch disk), locks/ made."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    c = DiskCache(shared, key_file=tmp_path / "k")
    with c.build_lock(key(1)):
        pass
    assert stat.S_IMODE((shared / "locks").stat().st_mode) == 0o777
    return c


def plant(c: DiskCache, code: str) -> None:
    """Run `code` in the cache directory as another user where possible (root), else as ourselves:
    the cache's defence does not depend on who planted the file."""
    if os.geteuid() == 0:
        as_other_user(c.directory, code)
    else:
        cwd = os.getcwd()
        os.chdir(c.directory)
        try:
            exec(code, {"os": os})
        finally:
            os.chdir(cwd)


def test_planted_lock_symlink_is_not_followed(tmp_path, caplog):
    """With filelock 3.x, a link at locks/<key>.lock made the victim truncate and chmod 0666 its own file."""
    c = _shared_cache(tmp_path)
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=$HOME/bin:$PATH\n")
    os.chmod(victim, 0o644)
    plant(c, f"os.symlink({str(victim)!r}, 'locks/{key(0)}.lock')")
    assert os.path.islink(c.directory / "locks" / f"{key(0)}.lock")
    caplog.clear()
    ran = False
    with c.build_lock(key(0)):
        ran = True
    assert ran and c.put(key(0), b"built without the lock", META)
    [w] = cache_warnings(caplog)
    assert "symbolic link" in w and f"{key(0)}.lock" in w
    assert victim.read_text() == "export PATH=$HOME/bin:$PATH\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_planted_locks_directory_symlink_is_refused(tmp_path, caplog):
    c = _shared_cache(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chmod(elsewhere, 0o777)
    plant(c, f"os.rename('locks', 'old_locks'); os.symlink({str(elsewhere)!r}, 'locks')")
    caplog.clear()
    with c.build_lock(key(0)):
        pass
    [w] = cache_warnings(caplog)
    assert "locks is not a directory" in w
    assert list(elsewhere.iterdir()) == []  # no lock file created through the link


# ----------------------------------------------------------------------------- bounded parsing


def _plant_sparse_entry(path: Path, k: str, size: int, *, checksum_ok: bool) -> None:
    """A well-formed header for a `size`-byte payload of zeros (a sparse file: no disk used), with
    the right checksum when `checksum_ok`; only the tag (which needs the key) is wrong."""
    digest = xxhash.xxh3_128()
    if checksum_ok:
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            digest.update(block)
    header = {
        "key": k,
        "format": cachemod.FORMAT_VERSION,
        "engine": "inductor",
        "versions": {},
        "info": {},
        "created": time.time(),
        "payload_size": size,
        "payload_xxh3_128": digest.hexdigest(),
        "tag": "0" * 64,
    }
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(cachemod.MAGIC + struct.pack(">II", cachemod.FORMAT_VERSION, len(body)) + body)
        f.truncate(f.tell() + size)


def test_planted_multi_gib_entry_costs_bounded_memory(env):
    """A 2 GiB sparse entry whose checksum matches (only its tag is forged) is checked in chunks:
    the process's peak memory stays small, the entry is removed, the other entries stay."""
    size = 2 << 30
    # VmHWM: this process's peak resident memory (ru_maxrss would include the parent's, from before exec)
    peak = "print(next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')), flush=True)\n"
    proc = child(
        "c = cache.DiskCache(sys.argv[1], size_limit=8 << 30)\n"
        "assert c.put(sys.argv[2], b'a real engine', {'engine': 'eager'})\n" + peak + "sys.stdin.readline()\n"
        "print(c.get(sys.argv[3]), c.get(sys.argv[2]))\n" + peak,
        env,
        key(0),
        key(1),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        before = proc.stdout.readline().strip()
        _plant_sparse_entry(env / f"{key(1)}.entry", key(1), size, checksum_ok=True)
        out, _ = proc.communicate("go\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0
    result, after = out.strip().splitlines()
    assert result == "None b'a real engine'"
    assert int(after) < 256 * 1024, (before, after)  # KiB: far below the 2 GiB payload
    assert entry_files(env) == {key(0)}


def test_entry_larger_than_the_limit_is_not_read_and_goes_at_the_next_put(env, caplog):
    c = DiskCache(env, size_limit=1 << 30)
    assert c.put(key(0), b"a real engine", META)
    _plant_sparse_entry(env / f"{key(1)}.entry", key(1), 6 << 30, checksum_ok=False)
    caplog.clear()
    assert c.get(key(1)) is None and cache_warnings(caplog) == []  # not read: a miss, logged at INFO
    assert any("larger than this cache's size limit" in r.getMessage() for r in caplog.records)
    assert c.put(key(2), b"another engine", META)  # the total is over the limit: it is evicted
    assert entry_files(env) == {key(0), key(2)}


def test_deeply_nested_header_is_harmless_to_ls_and_verify(cache, capsys):
    d = str(cache.directory)
    cache.put(key(0), b"good", META)
    cache.put(key(1), b"to be damaged", META)
    _deeply_nested_header(cache.directory / f"{key(1)}.entry")
    assert _cli("cache", "ls", "--dir", d) == 0
    assert key(1) in capsys.readouterr().out
    assert _cli("cache", "verify", "--dir", d) == 1  # damaged (1), not "key file unusable" (2)
    assert "nested too deeply" in capsys.readouterr().out
    assert entry_files(cache.directory) == {key(0)}


def test_ls_json_is_strict_json(cache, capsys):
    cache.put(key(0), b"good", META)
    cache.put(key(1), b"to be damaged", META)
    _nan_created(cache.directory / f"{key(1)}.entry")
    assert _cli("cache", "ls", "--dir", str(cache.directory), "--json") == 0

    def refuse(name):
        raise AssertionError(f"{name} in JSON output")

    listed = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert {e["key"]: e["created"] for e in listed}[key(1)] is None


# ----------------------------------------------------------------------------- only its own files


def test_empty_directory_is_refused_everywhere(tmp_path, monkeypatch, capsys):
    """An unset shell variable (--dir "$CACHE") or cache_dir="" must not make the cache the working directory."""
    from trt_subgraph.options import Options

    monkeypatch.chdir(tmp_path)
    mine = tmp_path / f"{key(0)}.entry"
    mine.write_bytes(b"a file of the user's that happens to have an entry's name")
    (tmp_path / f".{key(1)}.x.tmp").write_bytes(b"and an old temp-like file")
    os.utime(tmp_path / f".{key(1)}.x.tmp", (0, 0))
    for command in ("ls", "stats", "verify", "clear"):
        assert _cli("cache", command, "--dir", "") == 2
        assert "--dir is empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="empty path"):
        DiskCache("")
    with pytest.raises(ValueError, match="option 'cache_dir' is an empty path"):
        Options.from_user({"cache_dir": ""})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, f".{key(1)}.x.tmp"])


def test_unlistable_directory_is_an_error_not_a_traceback(cache, capsys, monkeypatch):
    d = str(cache.directory)
    cache.put(key(0), b"x", META)
    scandir = os.scandir

    def denied(path="."):
        if os.fspath(path) == d:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), d)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    for command in ("ls", "stats", "clear", "verify"):
        assert _cli("cache", command, "--dir", d) == 2
        err = capsys.readouterr().err
        assert f"cannot use the cache directory {d}: Permission denied" in err


def test_stats_json_has_the_same_keys_for_a_missing_directory(cache, capsys):
    assert _cli("cache", "stats", "--dir", str(cache.directory), "--json") == 0
    present = json.loads(capsys.readouterr().out)
    assert _cli("cache", "stats", "--dir", str(cache.directory.parent / "missing"), "--json") == 0
    missing = json.loads(capsys.readouterr().out)
    assert set(missing) == set(present) and missing["entries"] == 0


# ----------------------------------------------------------------------------- no silent hangs


HOLDER = (
    "c = cache.DiskCache(sys.argv[1])\n"
    "with c.build_lock(sys.argv[2]):\n"
    "    print('locked', flush=True); time.sleep(float(sys.argv[3]))\n"
)


def _wait_in_thread(c: DiskCache, k: str) -> tuple[float, bool]:
    """(seconds waited, whether the wait ended) for build_lock(k) in a thread; fails instead of hanging."""
    import threading

    done = []

    def wait():
        t0 = time.monotonic()
        with c.build_lock(k):
            done.append(time.monotonic() - t0)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    t.join(timeout=60)
    return (done[0], True) if done else (60.0, False)


def test_stopped_lock_holder_is_named_then_not_waited_for(env, caplog, monkeypatch):
    """Ctrl-Z or a debugger on the process that builds: the others say whom they wait for, then build."""
    monkeypatch.setattr(cachemod.disk, "WAIT_NOTICE_S", 0.5)
    k = key(0)
    holder = child(HOLDER, env, k, 600, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGSTOP)
        caplog.clear()
        waited, ended = _wait_in_thread(DiskCache(env, stall_timeout=3), k)
        assert ended, "still waiting for a stopped holder"
        assert 3 <= waited < 30
        notice, gave_up = cache_warnings(caplog)
        assert "waiting for the build lock" in notice and k in notice and f"pid {holder.pid}" in notice
        assert "no sign of life" in gave_up and f"pid {holder.pid}" in gave_up
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_live_lock_holder_is_waited_for_past_the_stall_timeout(env, caplog):
    """Its heartbeat shows it is alive: a holder that builds for longer than the stall timeout keeps the lock."""
    k = key(0)
    holder = child(HOLDER, env, k, 6, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        caplog.clear()
        waited, ended = _wait_in_thread(DiskCache(env, stall_timeout=4), k)  # 4 beats: room for a loaded machine
        assert ended and waited > 4.5
        assert not any("no sign of life" in w for w in cache_warnings(caplog))
    finally:
        assert holder.wait(timeout=30) == 0


# ----------------------------------------------------------------------------- clocks


def test_future_dated_entry_is_evicted_in_its_turn(env):
    """An mtime in the future (a host whose clock runs ahead, or a planted file) counts as now."""
    c, _ = _sized_cache(env, 2.5)
    _put_aged(c, 0, -365 * 86400)  # a year ahead
    for i in (1, 2, 3):
        time.sleep(0.05)  # file times have a coarse clock
        assert c.put(key(i), payload_for(i), META)
        assert key(0) not in entry_files(env) or (env / f"{key(0)}.entry").stat().st_mtime <= time.time() + 1
    assert entry_files(env) == {key(2), key(3)}


def test_live_writers_temp_file_survives_skewed_clocks(cache, monkeypatch):
    """A writer's temp file is locked until renamed: another process cleaning up does not remove it,
    whatever its mtime says (the clock of the host that wrote it may be far off)."""
    other = DiskCache(cache.directory)
    fsync = os.fsync
    seen = []

    def during_write(fd):
        fsync(fd)
        if seen:
            return  # the other process's own put
        [tmp] = [p for p in cache.directory.iterdir() if p.name.endswith(".tmp")]
        seen.append(tmp)
        for skew in (-3600, 3600):
            os.utime(tmp, (time.time() + skew, time.time() + skew))
            assert other.put(key(skew), b"another process's put", META)
            assert tmp.exists()

    assert cache.put(key(9), b"creates the key file first", META)
    monkeypatch.setattr(os, "fsync", during_write)
    assert cache.put(key(0), b"mine", META)
    assert seen and cache.get(key(0)) == b"mine"


def _planted_header(path: Path, **fields) -> None:
    """Rewrite an entry's header with `fields` changed (its tag no longer matches: it is damaged)."""
    _, header, payload = _split(path)
    body = json.dumps({**header, **fields}, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(cachemod.MAGIC + struct.pack(">II", cachemod.FORMAT_VERSION, len(body)) + body + payload)


def test_ls_of_planted_headers_shows_no_control_characters_and_never_fails(cache, capsys):
    """Deep nesting that json.loads accepts (but indenting it would not), terminal escapes, far-off times."""
    deep: list = []
    for _ in range(500):
        deep = [deep]
    for i, fields in enumerate(
        [{"info": {"deep": deep}}, {"engine": "\x1b]0;owned\x07\x1b[2J"}, {"created": 1e300}, {"created": -1e300}]
    ):
        cache.put(key(i), b"x", META)
        _planted_header(cache.directory / f"{key(i)}.entry", **fields)
    d = str(cache.directory)
    assert _cli("cache", "ls", "--dir", d) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b" in out
    assert _cli("cache", "ls", "--dir", d, "--json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert all(cache.get(key(i)) is None for i in range(4)) and entry_files(cache.directory) == set()
