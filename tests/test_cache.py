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


FAULTS = {
    "truncated": (_truncate, "truncated"),
    "flipped_payload_byte": (_flip_payload, "checksum"),
    "flipped_header_byte_valid_json": (_flip_header_valid_json, "authentication"),
    "flipped_header_byte_invalid_json": (_flip_header_invalid_json, "unreadable header"),
    "forged_payload_with_matching_checksum": (_consistent_forgery, "authentication"),
    "other_format_version": (_other_format_version, f"format version {cachemod.FORMAT_VERSION + 1}"),
    "garbage": (_garbage, "bad magic"),
    "empty": (_empty, "bad magic"),
    "missing_payload": (_header_only, "payload is 0 bytes"),
    "entry_of_other_key": (_entry_of_other_key, "belongs to key"),
    "foreign_key_file": (_foreign_key_file, "another key file"),
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


def test_bad_key_file_disables_cache_without_wiping_it(cache, env, caplog, monkeypatch):
    k = key(0)
    cache.put(k, b"payload", META)
    bad = env.parent / "bad.key"
    bad.write_bytes(b"short")
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

        def inside(p) -> bool:
            return isinstance(p, (str, os.PathLike)) and (os.path.abspath(p) + os.sep).startswith(root + os.sep)

        def guard(fn, writes=lambda *a, **k: True):
            def wrapper(p, *a, **k):
                if inside(p) and writes(p, *a, **k):
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


def test_stale_temp_files_cleaned_at_scan(env):
    env.mkdir(mode=0o700)
    old, young = env / f".{key(0)}.abc123.tmp", env / f".{key(1)}.def456.tmp"
    old.write_bytes(b"partial")
    young.write_bytes(b"being written")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    DiskCache(env)
    assert not old.exists() and young.exists()


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
    (cache.directory / "notakey.entry").write_bytes(b"junk")
    mtimes = {k: (cache.directory / f"{k}.entry").stat().st_mtime_ns for k in (key(0), key(2), key(4))}
    caplog.clear()
    result = cache.verify()
    assert sorted(result["ok"]) == sorted([key(0), key(2), key(4)])
    reasons = dict(result["removed"])
    assert set(reasons) == {key(1), key(3), "notakey"}
    assert "checksum" in reasons[key(1)] and "truncated" in reasons[key(3)]
    assert len(cache_warnings(caplog)) == 2
    assert entry_files(cache.directory) == set(mtimes)
    assert {k: (cache.directory / f"{k}.entry").stat().st_mtime_ns for k in mtimes} == mtimes
    assert cache.clear() == 3 and entry_files(cache.directory) == set() and cache.stats()["entries"] == 0


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
    _garbage(cache.directory / f"{key(1)}.entry")
    assert _cli("cache", "ls", "--dir", d, "--json") == 0
    assert {e["key"]: e["engine"] for e in json.loads(capsys.readouterr().out)}[key(1)] == "?"
    assert _cli("cache", "verify", "--dir", d) == 1
    out = capsys.readouterr().out
    assert f"removed  {key(1)}  not a trt_subgraph cache entry" in out and "1 ok, 1 damaged" in out
    assert _cli("cache", "verify", "--dir", d, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"ok": [key(0)], "removed": []}
    assert _cli("cache", "clear", "--dir", d) == 0
    assert "removed 1 entries" in capsys.readouterr().out
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
    assert "not a regular file" in w and not (cache.directory / f"{k}.entry").exists()
