"""The disk cache directory: entries, per-key build locks, LRU eviction, verification.

Imports no torch: ``trt-subgraph cache`` uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pathlib
import re
import stat
import tempfile
import time
from collections.abc import Iterator

import filelock

from .._state import warn_once
from .entry import KEY_RE, Damaged, check_key, check_meta, encode_head, read_entry, read_header
from .paths import default_key_file, load_or_create_secret, make_private_dir, read_secret

__all__ = ["DEFAULT_LOCK_TIMEOUT", "DEFAULT_SIZE_LIMIT", "DiskCache", "EntryInfo"]

log = logging.getLogger(__name__)

DEFAULT_SIZE_LIMIT = 4 << 30  # 4 GiB
DEFAULT_LOCK_TIMEOUT = 30 * 60.0  # seconds; longer than any sane engine build
TEMP_MAX_AGE = 5 * 60.0  # a live writer touches its temp file far more often than this
_TEMP_RE = re.compile(r"\.[0-9a-f]{32}\..*\.tmp")


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
        self._warned: set[tuple] = set()  # faults warned about: once per kind and cache object
        self._unusable: str | None = None
        self._shared_bits = 0
        try:
            make_private_dir(self.directory)
            self._shared_bits = stat.S_IMODE(self.directory.stat().st_mode) & 0o077
            self._scan(clean_temps=True)
        except OSError as e:
            self._unusable = str(e)
            log.warning("disk cache at %s disabled: %s", self.directory, e)

    def __repr__(self) -> str:
        return f"DiskCache({str(self.directory)!r}, size_limit={self.size_limit})"

    # ---------------------------------------------------------------- helpers

    def _path(self, key: str) -> pathlib.Path:
        return self.directory / f"{key}.entry"

    def _lock(self, key: str) -> filelock.FileLock:
        """The flock of ``key`` (lock files live in ``locks/``, never deleted: see clear())."""
        # whoever may write the cache directory must be able to lock too
        make_private_dir(self.directory / "locks", 0o700 | self._shared_bits)
        mode = 0o600 | (self._shared_bits & 0o066)
        return filelock.FileLock(self.directory / "locks" / f"{key}.lock", mode=mode)

    def _secret(self) -> bytes | None:
        if self._secret_value is None and self._secret_error is None:
            try:
                self._secret_value = load_or_create_secret(self.key_file)
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
                    if name.endswith(".entry") and KEY_RE.fullmatch(name[: -len(".entry")]):
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

    def get(self, key: str) -> bytes | None:
        """The verified payload for ``key``, or None (missing, damaged, foreign, stale or unreadable).

        A damaged entry is warned about once and removed; success marks the entry used (LRU).
        """
        check_key(key)
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
                    _, payload = read_entry(f, key, secret)
                except Damaged as d:
                    outcome = self._drop(key, path, st)
                    log.warning("cache entry %s rejected: %s; %s", key, d, outcome)
                    return None
        except FileNotFoundError:
            return None
        except OSError as e:
            warn_once(log, ("read", key), "cannot read cache entry %s: %s", path, e, seen=self._warned)
            return None
        try:
            os.utime(path)
        except OSError:
            pass  # read-only cache: LRU order just does not move
        return payload

    def put(self, key: str, payload: bytes | bytearray | memoryview, meta: dict) -> bool:
        """Store ``payload`` atomically (temp file, fsync, rename); False with one warning on failure.

        ``meta``: ``engine`` (str, required), ``versions`` and ``info`` (plain-data dicts, stored
        in the header and shown by ``entries()``).
        """
        check_key(key)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes-like, got {type(payload).__name__}")
        meta = check_meta(meta)
        if self._unusable is not None:
            return False
        secret = self._secret()
        if secret is None:
            return False
        head = encode_head(key, payload, meta, secret)
        size = len(head) + len(payload)
        if size > self.size_limit:
            log.warning(
                "cache entry %s (%s engine, %d bytes) exceeds the cache size limit of %d bytes; not stored",
                key,
                meta["engine"],
                size,
                self.size_limit,
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
            warn_once(
                log,
                ("put", e.errno),
                "cannot write to disk cache %s (%s); engines will not be persisted",
                self.directory,
                e.strerror or e,
                seen=self._warned,
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
            log.info(
                "disk cache %s stays over its limit (%d > %d bytes): remaining entries are in use",
                self.directory,
                total,
                self.size_limit,
            )

    @contextlib.contextmanager
    def build_lock(self, key: str, timeout: float | None = None) -> Iterator[None]:
        """Per-key inter-process lock around "get, else build and put", so N processes build once.

        An flock: the kernel drops it when its holder dies, so a killed process cannot block
        the others. After ``timeout`` seconds (default ``lock_timeout``) we go on without the
        lock (worst case: a duplicate build; puts stay atomic). Where no lock file can be
        created (read-only directory) the lock is a no-op.
        """
        check_key(key)
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
                warn_once(
                    log,
                    ("lock",),
                    "cannot lock in disk cache %s (%s); concurrent processes may build the same engine",
                    self.directory,
                    e.strerror or e,
                    seen=self._warned,
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
                    h = read_header(f)
                out.append(
                    EntryInfo(key, h["engine"], st.st_size, st.st_mtime, h["created"], path, h["versions"], h["info"])
                )
            except (OSError, Damaged):
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
            secret = self._secret_value or read_secret(self.key_file)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot verify {self.directory} without the key file that signed it: {e}") from None
        ok, removed = [], []
        for key, path, st in self._scan(clean_temps=True):
            try:
                with open(path, "rb", opener=_open_nofollow) as f:
                    read_entry(f, key, secret)
                ok.append(key)
            except Damaged as d:
                outcome = self._drop(key, path, st)
                log.warning("cache entry %s rejected: %s; %s", key, d, outcome)
                removed.append((key, str(d) if outcome == "removed" else f"{d}; {outcome}"))
            except FileNotFoundError:
                continue
        for p in sorted(self.directory.glob("*.entry")):
            if not KEY_RE.fullmatch(p.stem):
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
