"""Persistent, bounded, multi-process-safe disk cache for built engines.

One file per key, ``<key>.entry``::

    MAGIC (8 bytes) | format version (u32 BE) | header length (u32 BE) | header (UTF-8 JSON) | payload

The header holds the key, format version, engine name, the caller's ``versions`` and
``info``, the creation time, payload size, payload xxh3_128 and an authentication tag.
Nothing is unpickled or executed while loading, but an inductor payload is a compiled
artifact that torch *will* run later, so :meth:`DiskCache.get` only returns payloads whose
tag (HMAC-SHA256 over magic, format, header-without-tag and payload) verifies with a
per-user secret kept outside the cache directory (:func:`default_key_file`). Whoever can
write the cache directory but cannot read that key file cannot make us run their code.
A cache shared between users therefore needs the same key file for all of them (point
``TRT_SUBGRAPH_KEY_FILE`` at one file readable by exactly those users); an entry written
with another key is treated as damaged and removed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import pathlib
import re
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import filelock
import xxhash

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_SIZE_LIMIT",
    "FORMAT_VERSION",
    "DiskCache",
    "EntryInfo",
    "add_cli",
    "default_cache_dir",
    "default_key_file",
    "make_key",
]

log = logging.getLogger("trt_subgraph.cache")

FORMAT_VERSION = 1  # bump when the entry layout changes; callers put it in their keys too
DEFAULT_SIZE_LIMIT = 4 << 30  # 4 GiB
DEFAULT_LOCK_TIMEOUT = 30 * 60.0  # seconds; longer than any sane engine build
TEMP_MAX_AGE = 5 * 60.0  # a live writer touches its temp file far more often than this

MAGIC = b"TRT-SGC\n"
_PREFIX = struct.Struct(">II")  # format version, header length
_PREFIX_LEN = len(MAGIC) + _PREFIX.size
_MAX_HEADER = 1 << 20
_KEY_RE = re.compile(r"[0-9a-f]{32}")
_TEMP_RE = re.compile(r"\.[0-9a-f]{32}\..*\.tmp")
_SECRET_LEN = 32
_META_KEYS = ("engine", "versions", "info")
_HEADER_TYPES: dict[str, type | tuple[type, ...]] = {
    "key": str,
    "format": int,
    "engine": str,
    "versions": dict,
    "info": dict,
    "created": (int, float),
    "payload_size": int,
    "payload_xxh3_128": str,
    "tag": str,
}


# --------------------------------------------------------------------------- locations

def _env_path(name: str, *, absolute_only: bool = False) -> pathlib.Path | None:
    """An env var as a path; empty (and, for XDG vars, relative) values count as unset, per the XDG spec."""
    value = os.environ.get(name, "")
    if not value:
        return None
    path = pathlib.Path(value).expanduser()
    if absolute_only and not path.is_absolute():
        return None
    return path


def default_cache_dir() -> pathlib.Path:
    """``$TRT_SUBGRAPH_CACHE_DIR`` > ``$XDG_CACHE_HOME/trt_subgraph`` > ``~/.cache/trt_subgraph``."""
    explicit = _env_path("TRT_SUBGRAPH_CACHE_DIR")
    if explicit is not None:
        return explicit
    xdg = _env_path("XDG_CACHE_HOME", absolute_only=True)
    return (xdg if xdg is not None else pathlib.Path.home() / ".cache") / "trt_subgraph"


def default_key_file() -> pathlib.Path:
    """``$TRT_SUBGRAPH_KEY_FILE`` > ``$XDG_CONFIG_HOME/trt_subgraph/cache.key`` > ``~/.config/...``.

    Deliberately outside the cache directory: the secret must not be readable by whoever can
    only write the cache.
    """
    explicit = _env_path("TRT_SUBGRAPH_KEY_FILE")
    if explicit is not None:
        return explicit
    xdg = _env_path("XDG_CONFIG_HOME", absolute_only=True)
    return (xdg if xdg is not None else pathlib.Path.home() / ".config") / "trt_subgraph" / "cache.key"


def _make_private_dir(path: pathlib.Path, mode: int = 0o700) -> None:
    """Create ``path`` and its missing parents with ``mode`` (0700, as XDG asks for its base dirs).

    Each created directory is chmodded too, because the umask can strip bits from mkdir's mode;
    existing directories are left as they are.
    """
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=mode)
        except FileExistsError:
            if not p.is_dir():
                raise
            continue  # another process was faster
        if stat.S_IMODE(p.stat().st_mode) != mode:
            os.chmod(p, mode)


def _read_secret(path: pathlib.Path) -> bytes:
    data = path.read_bytes()
    if len(data) != _SECRET_LEN:
        raise ValueError(f"key file {path} holds {len(data)} bytes, expected {_SECRET_LEN}")
    return data


def _load_or_create_secret(path: pathlib.Path) -> bytes:
    """Read the per-user secret, creating it (32 random bytes, mode 0600) on first use.

    Creation writes a private temp file and hard-links it into place: like O_EXCL, exactly one
    racing process wins, and unlike a bare O_EXCL create nobody can read a half-written key.
    The losers read the winner's key.
    """
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    _make_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=".cache.key.", dir=path.parent)  # O_EXCL
    try:
        os.fchmod(fd, 0o600)  # mkstemp's 0600 is still subject to the umask
        secret = os.urandom(_SECRET_LEN)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_secret(path)
        log.info("created cache key file %s", path)
        return secret
    finally:
        os.unlink(tmp)


# --------------------------------------------------------------------------- keys

_ALLOWED = "str, int, float, bool, None, and dict (str keys) / list / tuple / set / frozenset of those"


def _normalise(value: Any, where: str) -> Any:
    """JSON-ready copy of ``value`` whose encoding cannot depend on hash seed or insertion order."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}; only finite floats can be part of a cache key")
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; dict keys must be str")
            out[k] = _normalise(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_normalise(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [_normalise(v, f"{where}{{...}}") for v in value]
        return sorted(items, key=_canonical_json)
    raise TypeError(f"{where} is a {type(value).__name__}; allowed: {_ALLOWED}")


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def make_key(parts: dict) -> str:
    """xxh3_128 hex digest of the canonical JSON of ``parts``.

    Sorted dict keys, tuples as lists and sets as sorted lists make the key independent of
    insertion order, PYTHONHASHSEED and the process; anything else that is not plain data
    (paths, dtypes, objects) is refused so that it cannot sneak a process detail in.
    """
    if not isinstance(parts, dict):
        raise TypeError(f"make_key expects a dict, got {type(parts).__name__}")
    return xxhash.xxh3_128_hexdigest(_canonical_json(_normalise(parts, "parts")).encode())


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"cache key must be 32 lowercase hex chars as returned by make_key, got {key!r}")
    return key


def _check_meta(meta: object) -> dict:
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict with keys {_META_KEYS}, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(_META_KEYS))
    if unknown:
        raise ValueError(f"meta has unknown keys {unknown}; allowed: {list(_META_KEYS)}")
    engine = meta.get("engine")
    if not isinstance(engine, str) or not engine:
        raise ValueError(f"meta['engine'] must be a non-empty str naming the engine, got {engine!r}")
    out = {"engine": engine}
    for name in ("versions", "info"):
        value = meta.get(name, {})
        if not isinstance(value, dict):
            raise TypeError(f"meta[{name!r}] must be a dict, got {type(value).__name__}")
        out[name] = _normalise(value, f"meta[{name!r}]")
    return out


# --------------------------------------------------------------------------- entry format

class _Damaged(Exception):
    """An entry failed a check; the message is the reason shown to the user."""


def _tag(secret: bytes, header_wo_tag: dict, payload: bytes | memoryview) -> str:
    body = _canonical_json(header_wo_tag).encode()
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    mac.update(MAGIC)
    mac.update(_PREFIX.pack(header_wo_tag["format"], len(body)))
    mac.update(body)
    mac.update(payload)
    return mac.hexdigest()


def _encode_prefix_and_header(key: str, payload: bytes | memoryview, meta: dict, secret: bytes) -> bytes:
    header = {
        "key": key,
        "format": FORMAT_VERSION,
        **meta,
        "created": time.time(),
        "payload_size": len(payload),
        "payload_xxh3_128": xxhash.xxh3_128_hexdigest(payload),
    }
    header["tag"] = _tag(secret, header, payload)
    body = _canonical_json(header).encode()
    return MAGIC + _PREFIX.pack(FORMAT_VERSION, len(body)) + body


def _read_header(f) -> dict:
    """Parse magic, version and header from an open entry; raise _Damaged on any mismatch."""
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        raise _Damaged("not a regular file")
    prefix = f.read(_PREFIX_LEN)
    if len(prefix) < _PREFIX_LEN or prefix[: len(MAGIC)] != MAGIC:
        raise _Damaged("not a trt_subgraph cache entry (bad magic)")
    version, length = _PREFIX.unpack(prefix[len(MAGIC):])
    if version != FORMAT_VERSION:
        raise _Damaged(f"entry format version {version}, this build reads version {FORMAT_VERSION}")
    if length > _MAX_HEADER:
        raise _Damaged(f"header length {length} exceeds {_MAX_HEADER}")
    raw = f.read(length)
    if len(raw) != length:
        raise _Damaged(f"truncated header ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _Damaged(f"unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise _Damaged("malformed header (not a JSON object)")
    for name, types in _HEADER_TYPES.items():
        if not isinstance(header.get(name), types) or isinstance(header.get(name), bool):
            raise _Damaged(f"malformed header (field {name!r} missing or of the wrong type)")
    if header["format"] != version:
        raise _Damaged(f"header says format {header['format']}, prefix says {version}")
    return header


def _read_entry(f, key: str, secret: bytes) -> tuple[dict, bytes]:
    """Fully verify an open entry and return (header, payload); raise _Damaged on any failure."""
    header = _read_header(f)
    if header["key"] != key:
        raise _Damaged(f"header belongs to key {header['key']!r}")
    payload = f.read()
    if len(payload) != header["payload_size"]:
        raise _Damaged(f"payload is {len(payload)} bytes, header says {header['payload_size']} (truncated?)")
    if xxhash.xxh3_128_hexdigest(payload) != header["payload_xxh3_128"]:
        raise _Damaged("payload checksum mismatch")
    tag = header.pop("tag")
    if not hmac.compare_digest(tag, _tag(secret, header, payload)):
        raise _Damaged("authentication tag mismatch (tampered, or written with another key file)")
    return header, payload


# --------------------------------------------------------------------------- cache

@dataclasses.dataclass(frozen=True)
class EntryInfo:
    key: str
    engine: str  # "?" when the header is unreadable (verify() will say why)
    size: int  # bytes on disk, header included
    last_used: float  # mtime: set by put and by every successful get
    created: float | None
    path: pathlib.Path
    versions: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)


def _open_nofollow(path: str, flags: int) -> int:
    """Entries are regular files we wrote: a planted symlink is not followed, a planted FIFO cannot block."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class DiskCache:
    """Bounded on-disk engine cache shared by all processes of one user (or of users sharing a key file).

    ``size_limit`` bounds the bytes of all entries. After each ``put`` the directory is
    rescanned (so other processes' entries count) and least-recently-used entries are evicted
    until the total is under the limit, skipping the entry just written and any entry whose
    build lock another process holds. An entry larger than the whole limit is not stored (it
    would flush everything else and still not fit). Construction never evicts, so a tool
    opening the cache with a smaller limit does not shrink it by accident.

    "Last used" is the file's mtime, set by ``put`` and by each successful ``get``: reads of
    ``verify``/``ls`` and relatime/noatime mounts would make atime unreliable.

    A directory created here is private (0700, entries 0600). In a directory made shared
    beforehand (say group rwx + setgid), entries are group-readable and locks group-writable;
    all its users must then use the same key file.

    Faults never raise into the caller: an unwritable or full directory makes ``put`` return
    False, a damaged, foreign or stale entry makes ``get`` return None; each with one warning.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        size_limit: int = DEFAULT_SIZE_LIMIT,
        *,
        key_file: str | os.PathLike | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        if isinstance(size_limit, bool) or not isinstance(size_limit, int):
            raise TypeError(f"size_limit must be an int number of bytes, got {type(size_limit).__name__}")
        if size_limit <= 0:
            raise ValueError(f"size_limit must be > 0 bytes, got {size_limit}")
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not lock_timeout >= 0:
            raise ValueError(f"lock_timeout must be seconds >= 0 (math.inf: wait forever), got {lock_timeout!r}")
        self.directory = pathlib.Path(directory).expanduser().absolute()
        self.size_limit = size_limit
        self.key_file = pathlib.Path(key_file).expanduser() if key_file is not None else default_key_file()
        self.lock_timeout = float(lock_timeout)
        self._secret_value: bytes | None = None
        self._secret_error: str | None = None
        self._bad: dict[str, tuple] = {}  # key -> identity of a damaged file we could not remove
        self._warned: set[tuple] = set()
        self._unusable: str | None = None
        self._shared_bits = 0
        try:
            _make_private_dir(self.directory)
            self._shared_bits = stat.S_IMODE(self.directory.stat().st_mode) & 0o077
            self._scan(clean_temps=True)
        except OSError as e:
            self._unusable = str(e)
            log.warning("disk cache at %s disabled: %s", self.directory, e)

    def __repr__(self) -> str:
        return f"DiskCache({str(self.directory)!r}, size_limit={self.size_limit})"

    # ---------------------------------------------------------------- helpers

    def _warn_once(self, tag: tuple, msg: str, *args: Any) -> None:
        if tag in self._warned:
            log.debug(msg, *args)
        else:
            self._warned.add(tag)
            log.warning(msg, *args)

    def _path(self, key: str) -> pathlib.Path:
        return self.directory / f"{key}.entry"

    def _lock(self, key: str) -> filelock.FileLock:
        """The flock of ``key`` (lock files live in ``locks/``, never deleted: see clear())."""
        # whoever may write the cache directory must be able to lock too
        _make_private_dir(self.directory / "locks", 0o700 | self._shared_bits)
        mode = 0o600 | (self._shared_bits & 0o066)
        return filelock.FileLock(self.directory / "locks" / f"{key}.lock", mode=mode)

    def _secret(self) -> bytes | None:
        if self._secret_value is None and self._secret_error is None:
            try:
                self._secret_value = _load_or_create_secret(self.key_file)
            except (OSError, ValueError) as e:
                self._secret_error = str(e)
                log.warning("disk cache at %s disabled: cannot use key file %s: %s", self.directory, self.key_file, e)
        return self._secret_value

    def _scan(self, *, clean_temps: bool) -> list[tuple[str, pathlib.Path, os.stat_result]]:
        """(key, path, stat) of every entry with a valid name; optionally delete stale temp files."""
        found = []
        now = time.time()
        try:
            it = os.scandir(self.directory)
        except FileNotFoundError:
            return found
        with it:
            for de in it:
                name = de.name
                try:
                    if name.endswith(".entry") and _KEY_RE.fullmatch(name[: -len(".entry")]):
                        st = de.stat(follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            found.append((name[: -len(".entry")], pathlib.Path(de.path), st))
                    elif clean_temps and _TEMP_RE.fullmatch(name):
                        if now - de.stat(follow_symlinks=False).st_mtime > TEMP_MAX_AGE:
                            os.unlink(de.path)
                            log.info("removed temp file %s left by a crashed writer", de.path)
                except OSError:
                    continue  # vanished meanwhile or not removable: not ours to fail on
        return found

    def _drop(self, key: str, path: pathlib.Path, st: os.stat_result) -> str:
        """Remove a damaged entry (unless another process replaced it meanwhile); return what happened."""
        try:
            if _identity(os.stat(path, follow_symlinks=False)) != _identity(st):
                return "left alone: another process replaced it meanwhile"
            os.unlink(path)
            return "removed"
        except FileNotFoundError:
            return "removed"
        except OSError as e:
            self._bad[key] = _identity(st)
            return f"could not remove it: {e.strerror or e}"

    # ---------------------------------------------------------------- API

    def get(self, key: str, expect_versions: dict | None = None) -> bytes | None:
        """The verified payload for ``key``, or None (missing, damaged, foreign, stale or unreadable).

        ``expect_versions``: if given, an entry whose stored ``versions`` differ is stale.
        A damaged entry is warned about once and removed; success marks the entry used (LRU).
        """
        _check_key(key)
        if expect_versions is not None:
            if not isinstance(expect_versions, dict):
                raise TypeError(f"expect_versions must be a dict or None, got {type(expect_versions).__name__}")
            expected = _canonical_json(_normalise(expect_versions, "expect_versions"))
        if self._unusable is not None:
            return None
        path = self._path(key)
        try:
            with open(path, "rb", opener=_open_nofollow) as f:
                st = os.fstat(f.fileno())
                if self._bad.get(key) == _identity(st):
                    return None  # already warned about, could not remove
                secret = self._secret()
                if secret is None:
                    return None
                try:
                    header, payload = _read_entry(f, key, secret)
                    if expect_versions is not None and _canonical_json(header["versions"]) != expected:
                        raise _Damaged(
                            f"stale: built for versions {_canonical_json(header['versions'])}, expected {expected}"
                        )
                except _Damaged as d:
                    outcome = self._drop(key, path, st)
                    log.warning("cache entry %s rejected: %s; %s", key, d, outcome)
                    return None
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn_once(("read", key), "cannot read cache entry %s: %s", path, e)
            return None
        try:
            os.utime(path)
        except OSError:
            pass  # read-only cache: LRU order just does not move
        return payload

    def put(self, key: str, payload: bytes | bytearray | memoryview, meta: dict) -> bool:
        """Store ``payload`` atomically (temp file, fsync, rename); False with one warning on failure.

        ``meta``: ``engine`` (str, required), ``versions`` and ``info`` (plain-data dicts, stored
        in the header; ``versions`` is what ``get(expect_versions=...)`` compares).
        """
        _check_key(key)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes-like, got {type(payload).__name__}")
        meta = _check_meta(meta)
        if self._unusable is not None:
            return False
        secret = self._secret()
        if secret is None:
            return False
        head = _encode_prefix_and_header(key, payload, meta, secret)
        size = len(head) + len(payload)
        if size > self.size_limit:
            log.warning(
                "cache entry %s (%s engine, %d bytes) exceeds the cache size limit of %d bytes; not stored",
                key, meta["engine"], size, self.size_limit,
            )
            return False
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.directory)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(fd, 0o600 | (self._shared_bits & 0o044))  # readable by whoever may read the directory
                f.write(head)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())  # a crash must leave the old entry or the new one, never a hole
            os.replace(tmp, self._path(key))
            tmp = None
        except OSError as e:
            self._warn_once(
                ("put", e.errno), "cannot write to disk cache %s (%s); engines will not be persisted",
                self.directory, e.strerror or e,
            )
            return False
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        try:
            self._enforce_limit(protect=key)
        except OSError as e:
            log.debug("eviction in %s failed: %s", self.directory, e)
        return True

    def _enforce_limit(self, protect: str) -> None:
        found = self._scan(clean_temps=True)
        total = sum(st.st_size for _, _, st in found)
        if total <= self.size_limit:
            return
        for key, path, st in sorted(found, key=lambda e: e[2].st_mtime_ns):
            if total <= self.size_limit:
                break
            if key == protect:
                continue
            try:
                lock = self._lock(key)
                lock.acquire(timeout=0)
            except filelock.Timeout:
                log.debug("not evicting %s: another process holds its lock", key)
                continue
            except OSError as e:
                log.debug("not evicting %s: cannot lock it (%s)", key, e)
                continue
            try:
                os.unlink(path)
                log.info("evicted cache entry %s (%d bytes)", key, st.st_size)
                total -= st.st_size
            except FileNotFoundError:
                total -= st.st_size
            except OSError as e:
                log.debug("cannot evict %s: %s", key, e)
            finally:
                lock.release()
        if total > self.size_limit:
            log.info("disk cache %s stays over its limit (%d > %d bytes): remaining entries are in use",
                     self.directory, total, self.size_limit)

    @contextlib.contextmanager
    def build_lock(self, key: str, timeout: float | None = None) -> Iterator[None]:
        """Per-key inter-process lock around "get, else build and put", so N processes build once.

        An flock: the kernel drops it when its holder dies, so a killed process cannot block
        the others. After ``timeout`` seconds (default ``lock_timeout``) we go on without the
        lock (worst case: a duplicate build; puts stay atomic). Where no lock file can be
        created (read-only directory) the lock is a no-op.
        """
        _check_key(key)
        timeout = self.lock_timeout if timeout is None else timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"timeout must be seconds >= 0 (math.inf: wait forever), got {timeout!r}")
        lock = None
        if self._unusable is None:
            try:
                lock = self._lock(key)
                lock.acquire(timeout=-1 if math.isinf(timeout) else timeout)
            except filelock.Timeout:
                log.warning("waited %.0f s for the build lock of %s; building without it", timeout, key)
                lock = None
            except OSError as e:
                self._warn_once(
                    ("lock",), "cannot lock in disk cache %s (%s); concurrent processes may build the same engine",
                    self.directory, e.strerror or e,
                )
                lock = None
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def entries(self) -> list[EntryInfo]:
        """All entries, from their headers only (not verified; see verify())."""
        out = []
        for key, path, st in self._scan(clean_temps=False):
            try:
                with open(path, "rb", opener=_open_nofollow) as f:
                    h = _read_header(f)
                out.append(EntryInfo(key, h["engine"], st.st_size, st.st_mtime, h["created"], path,
                                     h["versions"], h["info"]))
            except (OSError, _Damaged):
                out.append(EntryInfo(key, "?", st.st_size, st.st_mtime, None, path))
        return out

    def stats(self) -> dict:
        found = self._scan(clean_temps=False)
        return {
            "entries": len(found),
            "bytes": sum(st.st_size for _, _, st in found),
            "limit": self.size_limit,
            "directory": str(self.directory),
            "key_file": str(self.key_file),
        }

    def verify(self) -> dict:
        """Fully check every entry; remove damaged ones. Returns {"ok": [keys], "removed": [(key, reason)]}.

        Unlike get/put, never creates the key file, and raises RuntimeError if it is missing or
        unusable: with a fresh key every entry would look foreign and be wiped.
        """
        if self._unusable is not None:
            raise RuntimeError(f"cannot verify {self.directory}: {self._unusable}")
        try:
            secret = self._secret_value or _read_secret(self.key_file)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot verify {self.directory} without the key file that signed it: {e}") from None
        ok, removed = [], []
        for key, path, st in self._scan(clean_temps=True):
            try:
                with open(path, "rb", opener=_open_nofollow) as f:
                    _read_entry(f, key, secret)
                ok.append(key)
            except _Damaged as d:
                outcome = self._drop(key, path, st)
                log.warning("cache entry %s rejected: %s; %s", key, d, outcome)
                removed.append((key, str(d) if outcome == "removed" else f"{d}; {outcome}"))
            except FileNotFoundError:
                continue
        for p in sorted(self.directory.glob("*.entry")):
            if not _KEY_RE.fullmatch(p.stem):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append((p.stem, "file name is not a cache key"))
        return {"ok": ok, "removed": removed}

    def clear(self) -> int:
        """Remove every entry (lock files stay: removing them could let two processes lock at once)."""
        n = 0
        for _, path, _ in self._scan(clean_temps=True):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                n += 1
        return n


# --------------------------------------------------------------------------- CLI

def _human_size(n: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    x, i = float(n), 0
    while x >= 1024 and i < len(units) - 1:
        x /= 1024
        i += 1
    return f"{n} B" if i == 0 else f"{x:.1f} {units[i]}"


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _run(args: argparse.Namespace) -> int:
    directory = pathlib.Path(args.dir).expanduser()
    if not directory.is_dir():  # do not create a cache just to look at it
        empty = {"ls": [], "stats": {"entries": 0, "bytes": 0, "directory": str(directory)},
                 "verify": {"ok": [], "removed": []}}.get(args.cache_command)
        print(json.dumps(empty) if getattr(args, "json", False) else f"no cache at {directory}")
        return 0
    cache = DiskCache(directory)
    if args.cache_command == "ls":
        infos = sorted(cache.entries(), key=lambda e: e.last_used, reverse=True)
        if args.json:
            print(json.dumps([{**dataclasses.asdict(e), "path": str(e.path)} for e in infos], indent=2))
            return 0
        rows = [("KEY", "ENGINE", "SIZE", "LAST USE")]
        rows += [(e.key, e.engine, _human_size(e.size), _when(e.last_used)) for e in infos]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
        print(f"{len(infos)} entries, {_human_size(sum(e.size for e in infos))} in {cache.directory}")
        return 0
    if args.cache_command == "stats":
        s = cache.stats()
        if args.json:
            print(json.dumps(s, indent=2))
        else:
            print(f"directory  {s['directory']}\nentries    {s['entries']}\n"
                  f"size       {_human_size(s['bytes'])} ({s['bytes']} bytes)\n"
                  f"limit      {_human_size(s['limit'])} (default; each process applies its own)\n"
                  f"key file   {s['key_file']}")
        return 0
    if args.cache_command == "verify":
        try:
            result = cache.verify()
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            for key, reason in result["removed"]:
                print(f"removed  {key}  {reason}")
            print(f"{len(result['ok'])} ok, {len(result['removed'])} damaged")
        return 1 if result["removed"] else 0
    n = cache.clear()
    print(f"removed {n} entries from {cache.directory}")
    return 0


def add_cli(subparsers) -> None:
    """Register ``trt-subgraph cache ls|stats|verify|clear``."""
    p = subparsers.add_parser("cache", help="inspect or clean the persistent engine cache")
    sub = p.add_subparsers(dest="cache_command", required=True, metavar="{ls,stats,verify,clear}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=str(default_cache_dir()),
                        help="cache directory (default: %(default)s, from TRT_SUBGRAPH_CACHE_DIR / XDG_CACHE_HOME)")
    with_json = argparse.ArgumentParser(add_help=False)
    with_json.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("ls", parents=[common, with_json], help="list entries: key, engine, size, last use")
    sub.add_parser("stats", parents=[common, with_json], help="entry count, bytes, limit")
    sub.add_parser("verify", parents=[common, with_json],
                   help="check every entry, remove damaged ones (exit 1 if any, 2 if the key file is unusable)")
    sub.add_parser("clear", parents=[common], help="remove every entry")
    p.set_defaults(func=_run)
