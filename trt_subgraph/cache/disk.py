"""The disk cache directory: entries, per-key build locks, LRU eviction, verification.

Imports no torch: ``trt-subgraph cache`` uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import pathlib
import re
import stat
import tempfile
import time
from collections.abc import Iterator

from .._state import warn_once
from . import locks
from .entry import (
    KEY_RE,
    MAGIC,
    Damaged,
    Foreign,
    OtherFormat,
    check_key,
    check_meta,
    encode_head,
    read_entry,
    read_header,
)
from .paths import default_key_file, make_private_dir, read_secret, usable_secret

__all__ = ["DEFAULT_LOCK_TIMEOUT", "DEFAULT_SIZE_LIMIT", "DEFAULT_STALL_TIMEOUT", "DiskCache", "EntryInfo"]

log = logging.getLogger(__name__)

DEFAULT_SIZE_LIMIT = 4 << 30  # 4 GiB
DEFAULT_LOCK_TIMEOUT = 30 * 60.0  # seconds; longer than any sane engine build
DEFAULT_STALL_TIMEOUT = 60.0  # seconds without a heartbeat (one a second) from a lock's holder
WAIT_NOTICE_S = 5.0  # a process waiting for a build lock says so after this many seconds
# A temp file whose mtime is this close to now (either side) may belong to a writer that has
# not locked it yet, or to an older release that does not lock temp files: never cleaned.
TEMP_MAX_AGE = 5 * 60.0
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
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)


def _has_magic(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file that starts like a cache entry (of any format version)."""
    with open(path, "rb", opener=_open_nofollow) as f:
        return stat.S_ISREG(os.fstat(f.fileno()).st_mode) and f.read(len(MAGIC)) == MAGIC


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class DiskCache:
    """Bounded on-disk engine cache shared by all processes of one user (or of users sharing a key file).

    ``size_limit`` bounds the bytes of all entries. After each ``put`` the directory is
    rescanned (so other processes' entries count) and least-recently-used entries are evicted
    until the total is under the limit, skipping the entry just written and any entry whose
    build lock another process holds. An entry larger than the whole limit is not stored (it
    would flush everything else and still not fit), and one that is there anyway goes first. Construction never evicts, so a tool
    opening the cache with a smaller limit does not shrink it by accident.

    "Last used" is the file's mtime, set by ``put`` and by each successful ``get``: reads of
    ``verify``/``ls`` and relatime/noatime mounts would make atime unreliable.

    A directory created here is private (0700, entries 0600). In a directory made shared
    beforehand (say group rwx + setgid), entries are group-readable and locks group-writable;
    all its users must then use the same key file.

    What it touches: only ``<key>.entry`` files that start with the cache's magic, its own temp
    files (``.<key>.*.tmp``) once no writer holds them, and ``locks/``. A file under an entry's
    name that is not an entry (no magic, not a regular file, a symbolic link) is left alone, and
    an entry of another format version is skipped, never removed (another release may use it).
    Reading an entry costs bounded memory until it has been authenticated (see
    :func:`~trt_subgraph.cache.entry.read_entry`); an entry larger than ``size_limit`` is not
    read at all. mtimes are not trusted blindly: one in the future counts as now, and is set to
    now when the directory is next trimmed, so that such an entry ages and can be evicted.

    Faults never raise into the caller: an unwritable or full directory makes ``put`` return
    False, a damaged, foreign or stale entry makes ``get`` return None, an untrusted key file
    (see :func:`~trt_subgraph.cache.paths.read_secret`) turns the cache off; each fault is
    warned about once per process (``trt_subgraph.reset()`` forgets which were).

    Raises (constructor): ValueError for an empty ``directory`` (as an unset shell variable
    gives; it would mean the working directory), a ``size_limit`` <= 0, or a negative
    ``lock_timeout``/``stall_timeout``; TypeError for a ``size_limit`` that is not an int.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        size_limit: int = DEFAULT_SIZE_LIMIT,
        *,
        key_file: str | os.PathLike | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        """``size_limit``: bytes of all entries. ``lock_timeout``: seconds a process waits for a
        build lock at most (``math.inf``: no limit). ``stall_timeout``: seconds after which a
        waiter stops waiting for a holder whose heartbeat (one a second) has not changed, as a
        stopped process's does not. ``key_file``: default :func:`default_key_file`."""
        if not os.fspath(directory):
            raise ValueError("the cache directory is an empty path (an unset variable?); give a directory")
        if isinstance(size_limit, bool) or not isinstance(size_limit, int):
            raise TypeError(f"size_limit must be an int number of bytes, got {type(size_limit).__name__}")
        if size_limit <= 0:
            raise ValueError(f"size_limit must be > 0 bytes, got {size_limit}")
        for name, value in (("lock_timeout", lock_timeout), ("stall_timeout", stall_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be seconds >= 0 (math.inf: wait forever), got {value!r}")
        self.directory = pathlib.Path(directory).expanduser().absolute()
        self.size_limit = size_limit
        self.key_file = pathlib.Path(key_file).expanduser() if key_file is not None else default_key_file()
        self.lock_timeout = float(lock_timeout)
        self.stall_timeout = float(stall_timeout)
        self._secret_value: bytes | None = None
        self._secret_error: str | None = None
        self._bad: dict[str, tuple] = {}  # key -> identity of a damaged file we could not remove
        self._unusable: str | None = None
        self._shared_bits = 0
        try:
            make_private_dir(self.directory)
            self._shared_bits = stat.S_IMODE(self.directory.stat().st_mode) & 0o077
        except OSError as e:
            self._unusable = str(e)
            self._warn(("unusable",), "disk cache at %s disabled: %s", self.directory, e)

    def __repr__(self) -> str:
        return f"DiskCache({str(self.directory)!r}, size_limit={self.size_limit})"

    # ---------------------------------------------------------------- helpers

    def _path(self, key: str) -> pathlib.Path:
        return self.directory / f"{key}.entry"

    def _warn(self, what: tuple, msg: str, *args, level: int = logging.WARNING) -> None:
        """Log once per process for this directory and ``what`` (one fault, one warning)."""
        warn_once(log, ("disk cache", str(self.directory), *what), msg, *args, level=level)

    def _lock(self, key: str) -> locks.BuildLock:
        """The lock file of ``key``, open (lock files live in ``locks/``, never deleted: see clear())."""
        # whoever may write the cache directory must be able to lock too
        return locks.BuildLock(
            str(self.directory), key, dir_mode=0o700 | self._shared_bits, mode=0o600 | (self._shared_bits & 0o066)
        )

    def _secret(self) -> bytes | None:
        if self._secret_value is None and self._secret_error is None:
            self._secret_value, self._secret_error = usable_secret(self.key_file)
            if self._secret_error is not None:
                warn_once(
                    log,
                    ("disk cache key file", str(self.key_file)),
                    "disk cache at %s disabled: %s",
                    self.directory,
                    self._secret_error,
                )
        return self._secret_value

    def _scan(self, *, clean_temps: bool) -> list[tuple[str, pathlib.Path, os.stat_result]]:
        """(key, path, stat) of every regular file with an entry's name; optionally delete abandoned
        temp files. A missing directory has none; OSError when it cannot be listed."""
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
                        self._clean_temp(de.path, now)
                except OSError:
                    continue  # vanished meanwhile or not removable: not ours to fail on
        return found

    @staticmethod
    def _clean_temp(path: str, now: float) -> None:
        """Remove a temp file whose writer is gone: its flock is free (a writer holds it from
        creation to rename) and its mtime is not within TEMP_MAX_AGE of now."""
        with open(path, "rb", opener=_open_nofollow) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or abs(now - st.st_mtime) <= TEMP_MAX_AGE:
                return
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # its writer is alive (whatever its clock says)
            if _identity(os.stat(path, follow_symlinks=False)) == _identity(st):
                os.unlink(path)
                log.info("removed temp file %s left by a writer that died", path)

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

    def _check(
        self, f, key: str, path: pathlib.Path, st: os.stat_result, secret: bytes, *, payload: bool = True
    ) -> tuple[str, bytes | None, str]:
        """(outcome, payload, reason): outcome "ok"; "other format" or "foreign" for what this
        release does not judge (left alone); or "removed" for a damaged entry, which is removed
        (reason then says whether that worked). Any exception that reading the entry raises
        (RecursionError, MemoryError, EIO, ...) counts as damage."""
        try:
            return "ok", read_entry(f, key, secret, payload=payload)[1], ""
        except OtherFormat as e:
            return "other format", None, f"{e}; skipped"
        except Foreign as e:
            return "foreign", None, f"{e}; left alone"
        except Exception as e:
            reason = str(e) if isinstance(e, Damaged) else f"unreadable ({type(e).__name__}: {e})"
            outcome = self._drop(key, path, st)
            return "removed", None, reason if outcome == "removed" else f"{reason}; {outcome}"

    # ---------------------------------------------------------------- API

    def get(self, key: str) -> bytes | None:
        """The verified payload for ``key``, or None (missing, damaged, foreign, stale or unreadable).

        A damaged entry is warned about once and removed; a file that is not an entry is warned
        about once and left alone; an entry of another format version or larger than
        ``size_limit`` is a miss (logged at INFO once). Success marks the entry used (LRU).
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
                if stat.S_ISREG(st.st_mode) and st.st_size > self.size_limit:
                    self._warn(
                        ("too large", key, _identity(st)),
                        "cache entry %s (%d bytes) is larger than this cache's size limit (%d bytes); not read",
                        key,
                        st.st_size,
                        self.size_limit,
                        level=logging.INFO,
                    )
                    return None
                secret = self._secret()
                if secret is None:
                    return None
                outcome, payload, reason = self._check(f, key, path, st, secret)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn(("read", key), "cannot read cache entry %s: %s", path, e)
            return None
        if outcome == "removed":
            self._warn(("damaged", key, _identity(st)), "cache entry %s rejected: %s", key, reason)
            return None
        if outcome != "ok":
            self._warn(
                (outcome, key, _identity(st)),
                "cache entry %s not used: %s",
                key,
                reason,
                level=logging.INFO if outcome == "other format" else logging.WARNING,
            )
            return None
        try:
            os.utime(path)
        except OSError:
            pass  # read-only cache: LRU order just does not move
        return payload

    def put(self, key: str, payload: bytes | bytearray | memoryview, meta: dict) -> bool:
        """Store ``payload`` atomically (temp file, fsync, rename); False with one warning on failure.

        ``meta``: ``engine`` (str, required), ``versions`` and ``info`` (plain-data dicts, stored
        in the header and shown by ``entries()``). The temp file is flocked until renamed, so no
        other process cleans it up while it is written, whatever the clocks say.
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
                fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed, after the rename
                os.fchmod(fd, 0o600 | (self._shared_bits & 0o044))  # readable by whoever may read the directory
                f.write(head)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())  # a crash must leave the old entry or the new one, never a hole
                os.replace(tmp, self._path(key))
                tmp = None
        except OSError as e:
            self._warn(
                ("put", e.errno),
                "cannot write to disk cache %s (%s); engines will not be persisted",
                self.directory,
                e.strerror or e,
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
        now = time.time()
        last_use = {}
        for key, path, st in found:
            last_use[key] = min(st.st_mtime, now)
            if st.st_mtime > now + 1.0:  # another host's clock, or planted: age it from now on
                with contextlib.suppress(OSError):
                    os.utime(path, (now, now))
        total = sum(st.st_size for _, _, st in found)
        if total <= self.size_limit:
            return
        # An entry larger than the whole limit (a process with a larger limit wrote it, or it was
        # planted) goes first: keeping it would flush every other entry.
        for key, path, st in sorted(found, key=lambda e: (e[2].st_size <= self.size_limit, last_use[e[0]])):
            if total <= self.size_limit:
                break
            if key == protect:
                continue
            try:
                if not _has_magic(path):
                    log.debug("not evicting %s: not a cache entry", path)
                    continue
                lock = self._lock(key)
            except (OSError, locks.Refused) as e:
                log.debug("not evicting %s: %s", key, e)
                continue
            try:
                if not lock.try_acquire():
                    log.debug("not evicting %s: another process holds its lock", key)
                    continue
                os.unlink(path)
                log.info("evicted cache entry %s (%d bytes)", key, st.st_size)
                total -= st.st_size
            except FileNotFoundError:
                total -= st.st_size
            except OSError as e:
                log.debug("cannot evict %s: %s", key, e)
            finally:
                lock.close()
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
        the others. A waiter says what it waits for (key, holder's pid and host) after
        WAIT_NOTICE_S seconds, and goes on without the lock (worst case: a duplicate build;
        puts stay atomic) when the holder's heartbeat has not changed for ``stall_timeout``
        seconds (a stopped process) or after ``timeout`` seconds (default ``lock_timeout``).
        Where no lock file can be used (read-only directory, a planted link) the lock is a
        no-op, with one warning. Raises ValueError for a negative ``timeout``.
        """
        check_key(key)
        timeout = self.lock_timeout if timeout is None else timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"timeout must be seconds >= 0 (math.inf: wait forever), got {timeout!r}")
        lock = self._acquire(key, timeout) if self._unusable is None else None
        try:
            yield
        finally:
            if lock is not None:
                lock.close()

    def _acquire(self, key: str, timeout: float) -> locks.BuildLock | None:
        try:
            lock = self._lock(key)
        except locks.Refused as e:
            self._warn(("lock refused",), "disk cache %s: %s; building without the lock", self.directory, e)
            return None
        except OSError as e:
            self._warn(
                ("lock",),
                "cannot lock in disk cache %s (%s); concurrent processes may build the same engine",
                self.directory,
                e.strerror or e,
            )
            return None
        start = changed = time.monotonic()
        seen = lock.holder()
        announced = False
        pause = 0.01
        while not lock.try_acquire():
            now = time.monotonic()
            holder = lock.holder()
            if holder != seen:
                seen, changed = holder, now
            who = locks.describe_holder(holder)
            if now - changed >= self.stall_timeout:
                log.warning(
                    "the build lock of %s is held by %s, which has shown no sign of life for %.0f s "
                    "(stopped, or in a debugger?); building without the lock",
                    key,
                    who,
                    now - changed,
                )
                lock.close()
                return None
            if not math.isinf(timeout) and now - start >= timeout:
                log.warning("waited %.0f s for the build lock of %s; building without it", timeout, key)
                lock.close()
                return None
            if not announced and now - start >= WAIT_NOTICE_S:
                warn_once(
                    log,
                    ("lock wait", str(self.directory)),
                    "waiting for the build lock of cache entry %s, held by %s (it is building that engine)",
                    key,
                    who,
                )
                announced = True
            time.sleep(pause)
            pause = min(pause * 2, 0.25)
        return lock

    def entries(self) -> list[EntryInfo]:
        """All entries, from their headers only (not verified; see verify()); engine "?" where the
        header cannot be read (another format, not an entry, damaged). Never modifies anything.
        Raises OSError when the directory cannot be listed."""
        out = []
        for key, path, st in self._scan(clean_temps=False):
            try:
                with open(path, "rb", opener=_open_nofollow) as f:
                    h = read_header(f)
                out.append(
                    EntryInfo(key, h["engine"], st.st_size, st.st_mtime, h["created"], path, h["versions"], h["info"])
                )
            except Exception:  # whatever is wrong with it, listing goes on
                out.append(EntryInfo(key, "?", st.st_size, st.st_mtime, None, path))
        return out

    def stats(self) -> dict:
        """{"entries", "bytes", "limit", "directory", "key_file"}; never modifies anything.
        Raises OSError when the directory cannot be listed."""
        found = self._scan(clean_temps=False)
        return {
            "entries": len(found),
            "bytes": sum(st.st_size for _, _, st in found),
            "limit": self.size_limit,
            "directory": str(self.directory),
            "key_file": str(self.key_file),
        }

    def verify(self) -> dict:
        """Fully check every entry; remove damaged ones. Returns {"ok": [keys], "removed": [(key,
        reason)], "skipped": [(key, reason)]}; skipped are files under an entry's name that this
        release does not judge (another format version, not an entry, unreadable): never removed.
        Damage is logged at INFO only, as the result reports it.

        Unlike get/put, never creates the key file, and raises RuntimeError if it is missing or
        unusable: with a fresh key every entry would look foreign and be wiped. Raises OSError
        when the directory cannot be listed.
        """
        if self._unusable is not None:
            raise RuntimeError(f"cannot verify {self.directory}: {self._unusable}")
        try:
            secret = self._secret_value or read_secret(self.key_file)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot verify {self.directory} without the key file that signed it: {e}") from None
        result: dict[str, list] = {"ok": [], "removed": [], "skipped": []}
        for key, path, st in self._scan(clean_temps=True):
            try:
                with open(path, "rb", opener=_open_nofollow) as f:
                    outcome, _, reason = self._check(f, key, path, st, secret, payload=False)
            except FileNotFoundError:
                continue
            except OSError as e:  # only open() raises here: _check counts read errors as damage
                outcome, reason = "foreign", f"cannot read it ({e.strerror or e}); left alone"
            if outcome == "ok":
                result["ok"].append(key)
            elif outcome == "removed":
                result["removed"].append((key, reason))
                log.info("cache entry %s rejected: %s", key, reason)
            else:
                result["skipped"].append((key, reason))
        return result

    def clear(self) -> int:
        """Remove every entry of any format version, and temp files no writer holds; returns how
        many entries. Files under an entry's name that are not entries stay, and so do lock
        files (removing them could let two processes lock at once). Raises OSError when the
        directory cannot be listed."""
        n = 0
        for _, path, _ in self._scan(clean_temps=True):
            try:
                ours = _has_magic(path)
            except OSError:
                continue  # vanished, or unreadable: not judged, not touched
            if ours:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    n += 1
        return n
