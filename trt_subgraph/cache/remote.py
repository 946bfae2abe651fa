"""A cache level shared by a fleet of processes on many machines, under memory and local disk.

Entries are the disk cache's (:mod:`trt_subgraph.cache.entry`): the same header, checksum and
HMAC tag, made with the same key file, so every process of a fleet must use one key file (an
entry signed with another key is rejected, warned about and rebuilt). Nothing read from the
server is trusted before its tag verifies.

:class:`RemoteCache` is the level: verification, the build lease protocol, entry size limit,
fault handling. A store implements its few primitives (read, write, list, delete, and a lease:
a value set only if absent, with an expiry, renewed and released by its owner);
:class:`RedisCache` is the one implemented and tested (redis-py against a real
``redis-server``). An object store (fsspec, ``s3://``) would implement the same primitives.

Build once per fleet: before building a key, a process takes the key's *lease* (Redis ``SET NX
PX`` through redis-py's :class:`redis.lock.Lock`), renewed by a thread every third of
:data:`LEASE_TTL_S` while the build runs, and released (only if still its own) once the entry
is stored. The other processes poll for the entry and load it. A holder that dies stops
renewing: its lease expires after at most :data:`LEASE_TTL_S` and a waiter takes it over. A
waiter that waits longer than ``wait_timeout`` builds itself, with a warning.

Faults never raise into the caller and never cost more than a bounded wait: connecting times
out after :data:`CONNECT_TIMEOUT_S`, a read that receives nothing for :data:`SOCKET_TIMEOUT_S`
fails, there are no retries, and after a failure the level is off for this process for
:data:`RETRY_AFTER_S` seconds (one warning per outage): lookups miss, stores are skipped,
builds go ahead locally. Imports no torch; imports redis-py only when a Redis URL is opened.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import os
import pathlib
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from .._state import on_reset, warn_once
from .entry import (
    FORMAT_VERSION,
    Damaged,
    Foreign,
    check_key,
    check_meta,
    decode_entry,
    encode_entry,
    parse_header,
)
from .paths import default_key_file, read_secret, usable_secret

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_ENTRY_LIMIT",
    "DEFAULT_TTL_S",
    "DEFAULT_WAIT_S",
    "LEASE_TTL_S",
    "RETRY_AFTER_S",
    "SCHEMES",
    "SOCKET_TIMEOUT_S",
    "RedisCache",
    "RemoteCache",
    "RemoteEntryInfo",
    "check_url",
    "open_remote",
]

log = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix")  # what redis-py's Redis.from_url accepts
DEFAULT_TTL_S = 7 * 24 * 3600  # an entry nobody read for a week expires (each hit renews it)
DEFAULT_ENTRY_LIMIT = 256 << 20  # bytes; Redis refuses values over 512 MB (proto-max-bulk-len)
DEFAULT_WAIT_S = 30 * 60.0  # seconds a process waits for another's build; as the disk cache's lock
# Connecting to a live server on the same network takes milliseconds: one second tells a
# stopped or unreachable server apart without holding a forward up for long.
CONNECT_TIMEOUT_S = 1.0
# Per socket read, not per command: a 100 MB entry arriving at any pace keeps within it, a
# server that stops answering does not.
SOCKET_TIMEOUT_S = 2.0
RETRY_AFTER_S = 60.0  # the level stays off this long after a fault, so that one outage costs one wait
LEASE_TTL_S = 30.0  # a lease's expiry; a dead holder's lease lapses after at most this long
WAIT_NOTICE_S = 5.0  # a waiting process says what it waits for after this long
HEAD_BYTES = 64 << 10  # read for a listing: the cache's headers are about 1 KiB
_PAUSE_MAX = 0.5  # seconds between two polls of a waiting process


@dataclasses.dataclass(frozen=True)
class RemoteEntryInfo:
    """One remote entry as :meth:`RemoteCache.entries` lists it, read from its header only
    (not verified): cache key, engine, size, creation time (Unix seconds; None where the header
    cannot be read), the versions it was built with and the engine's notes (``info``)."""

    key: str
    engine: str  # "?" where the header cannot be read (verify() says why)
    size: int  # bytes, header included
    created: float | None
    versions: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)


def check_url(url: object) -> str:
    """``url`` if it is a URL of a remote cache this release implements; ValueError otherwise
    (naming the schemes allowed). Imports nothing."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"a remote cache is a URL such as 'redis://host:6379/0', got {url!r}")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in SCHEMES:
        raise ValueError(
            f"remote cache URL {url!r}: scheme {parsed.scheme or '(none)'!r} is not supported; "
            f"allowed: {', '.join(s + '://' for s in SCHEMES)} (Redis), such as 'redis://host:6379/0'"
        )
    if parsed.scheme != "unix" and not parsed.hostname:
        raise ValueError(f"remote cache URL {url!r} names no host; write it as 'redis://host:6379/0'")
    try:
        parsed.port  # noqa: B018  (urllib checks the port when it is read)
    except ValueError:
        raise ValueError(
            f"remote cache URL {url!r}: the port is not a number from 0 to 65535; write it as 'redis://host:6379/0'"
        ) from None
    return url


class RemoteCache(abc.ABC):
    """One fleet-wide cache level; see the module. Subclasses implement the primitives.

    ``url``: where it is (shown in messages). ``ttl``: seconds an entry lives after it was
    last written or read (None: until deleted). ``entry_limit``: largest entry in bytes, header
    included; larger ones are neither stored nor read. ``key_file``: the fleet's key file
    (default :func:`~trt_subgraph.cache.paths.default_key_file`; created where missing, as the
    disk cache does). ``wait_timeout``: seconds a process waits for another's build at most.
    Raises ValueError for a ``ttl`` or ``entry_limit`` that is not positive, or a negative
    ``wait_timeout``.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl: float | None = DEFAULT_TTL_S,
        entry_limit: int = DEFAULT_ENTRY_LIMIT,
        key_file: str | os.PathLike | None = None,
        wait_timeout: float = DEFAULT_WAIT_S,
    ) -> None:
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0):
            raise ValueError(f"ttl must be seconds > 0 or None (no expiry), got {ttl!r}")
        if isinstance(entry_limit, bool) or not isinstance(entry_limit, int) or entry_limit <= 0:
            raise ValueError(f"entry_limit must be an int number of bytes > 0, got {entry_limit!r}")
        if isinstance(wait_timeout, bool) or not isinstance(wait_timeout, (int, float)) or not wait_timeout >= 0:
            raise ValueError(f"wait_timeout must be seconds >= 0, got {wait_timeout!r}")
        self.url = url
        self.ttl = ttl
        self.entry_limit = entry_limit
        self.key_file = pathlib.Path(key_file).expanduser() if key_file is not None else default_key_file()
        self.wait_timeout = float(wait_timeout)
        self._off_until = 0.0
        self._down = False  # since the last fault, nothing succeeded: further faults are not warned about
        self._state_lock = threading.Lock()  # `_down` and `_off_until` of threads that look up at once
        self._secret_value: bytes | None = None
        self._secret_error: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shown_url!r})"

    @property
    def shown_url(self) -> str:
        """The URL without its password, for messages."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.password is None:
            return self.url
        host = parts.netloc.rpartition("@")[2]  # as written: an IPv6 address keeps its brackets
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))

    # ---------------------------------------------------------------- primitives

    @abc.abstractmethod
    def _size(self, key: str) -> int:
        """Bytes stored under ``key``; 0 where there is nothing."""

    @abc.abstractmethod
    def _read(self, key: str) -> bytes | None:
        """The bytes stored under ``key`` (None: nothing), renewing its ``ttl``."""

    @abc.abstractmethod
    def _head(self, key: str, n: int) -> bytes | None:
        """The first ``n`` bytes stored under ``key`` (None: nothing); does not renew it."""

    @abc.abstractmethod
    def _write(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (readers see the old bytes or the new), with ``ttl``."""

    @abc.abstractmethod
    def _delete(self, key: str) -> None:
        """Remove what is stored under ``key``, if anything."""

    @abc.abstractmethod
    def _keys(self) -> Iterable[str]:
        """The keys of every stored entry."""

    @abc.abstractmethod
    def _take_lease(self, key: str, token: str, ttl: float) -> bool:
        """Make ``token`` the holder of ``key``'s lease for ``ttl`` seconds if nobody holds it."""

    @abc.abstractmethod
    def _renew_lease(self, key: str, token: str, ttl: float) -> bool:
        """Extend the lease to ``ttl`` seconds from now if ``token`` still holds it; whether it does."""

    @abc.abstractmethod
    def _release_lease(self, key: str, token: str) -> None:
        """Release the lease if ``token`` holds it (never another holder's)."""

    @abc.abstractmethod
    def _lease_holder(self, key: str) -> str | None:
        """The token holding ``key``'s lease, or None."""

    # ---------------------------------------------------------------- faults

    @property
    def available(self) -> bool:
        """False during the :data:`RETRY_AFTER_S` seconds after a fault."""
        return time.monotonic() >= self._off_until

    def _call(self, what: str, default: Any, fn, *args) -> Any:
        """``fn(*args)``, or ``default`` while the level is off or when it fails (which turns the
        level off for :data:`RETRY_AFTER_S` seconds; one warning per outage, and one when it ends)."""
        if not self.available:
            return default
        try:
            result = fn(*args)
        except Exception as e:  # any fault of the client, the network or the server
            with self._state_lock:  # concurrent lookups that fail together: one warning
                self._off_until = time.monotonic() + RETRY_AFTER_S
                first, self._down = not self._down, True
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "remote cache %s failed (%s while trying to %s: %s); building and caching locally, "
                "trying it again in %.0f s",
                self.shown_url,
                type(e).__name__,
                what,
                e,
                RETRY_AFTER_S,
            )
            return default
        with self._state_lock:
            back, self._down = self._down, False
        if back:
            log.warning("remote cache %s answers again", self.shown_url)
        return result

    def _secret(self) -> bytes | None:
        if self._secret_value is None and self._secret_error is None:
            self._secret_value, self._secret_error = usable_secret(self.key_file)
            if self._secret_error is not None:
                warn_once(
                    log,
                    ("remote cache key file", str(self.key_file)),
                    "remote cache %s disabled: %s",
                    self.shown_url,
                    self._secret_error,
                )
        return self._secret_value

    # ---------------------------------------------------------------- API

    def get(self, key: str) -> tuple[dict, bytes] | None:
        """(header, payload) of ``key``'s entry once its tag verifies with the key file, else
        None (missing, larger than ``entry_limit``, rejected, the server unreachable). A rejected
        entry is warned about once and left for the rebuild's :meth:`put` to replace."""
        check_key(key)
        secret = self._secret()
        if secret is None:
            return None
        size = self._call("look up an entry", 0, self._size, key)
        if not size:
            return None
        if size > self.entry_limit:
            warn_once(
                log,
                ("remote too large", self.url, key),
                "remote cache entry %s (%d bytes) is larger than the entry limit (%d bytes); not read",
                key,
                size,
                self.entry_limit,
                level=logging.INFO,
            )
            return None
        data = self._call("read an entry", None, self._read, key)
        if data is None:
            return None
        try:
            return decode_entry(data, key, secret)
        except Exception as e:  # whatever is wrong with it (Damaged, Foreign, ...), it is not loaded
            warn_once(
                log,
                ("remote rejected", self.url, key),
                "remote cache entry %s rejected: %s; rebuilding it (every process of a fleet must use the "
                "same key file)",
                key,
                e,
            )
            return None

    def put(self, key: str, payload: bytes | memoryview, meta: dict) -> bool:
        """Sign and store ``payload`` under ``key`` (``meta`` as :meth:`DiskCache.put
        <trt_subgraph.cache.DiskCache.put>` takes it); False when not stored (too large, key
        file unusable, the server unreachable)."""
        check_key(key)
        meta = check_meta(meta)
        secret = self._secret()
        if secret is None or not self.available:
            return False
        data = encode_entry(key, payload, meta, secret)
        if len(data) > self.entry_limit:
            warn_once(
                log,
                ("remote put too large", self.url, key),
                "cache entry %s (%s engine, %d bytes) exceeds the remote cache's entry limit of %d bytes; "
                "not stored there",
                key,
                meta["engine"],
                len(data),
                self.entry_limit,
            )
            return False
        return self._call("store an entry", False, lambda: self._write(key, data) or True)

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[tuple[dict, bytes] | None]:
        """Wait until ``key``'s entry is there or this process holds its build lease.

        Yields (header, payload) when the entry is there (stored by another process, maybe
        while this one waited), else None: build, :meth:`put`, then leave the block, which
        releases the lease. Also yields None (build without the lease) while the level is off,
        when the server fails meanwhile, when the key file is unusable (nothing could be shared),
        or after ``wait_timeout`` seconds with a warning.
        While held, the lease is renewed every third of :data:`LEASE_TTL_S`.
        """
        check_key(key)
        token = f"{os.getpid()} {socket.gethostname() or '?'} {uuid.uuid4().hex}"
        found, held = self._wait(key, token) if self._secret() is not None else (None, False)
        stop = threading.Event()
        beat = None
        if held:
            beat = threading.Thread(
                target=self._renew_until, args=(key, token, stop), name="trt_subgraph-lease", daemon=True
            )
            beat.start()
        try:
            yield found
        finally:
            if beat is not None:
                stop.set()
                beat.join()
                self._call("release a build lease", None, self._release_lease, key, token)

    def _wait(self, key: str, token: str) -> tuple[tuple[dict, bytes] | None, bool]:
        """(entry, False) once the entry is there, (None, True) once the lease is ours, or
        (None, False) to build without it."""
        start = time.monotonic()
        pause = 0.02
        announced = False
        while True:
            taken = self._call("take a build lease", None, self._take_lease, key, token, LEASE_TTL_S)
            if taken is None:
                return None, False
            found = self.get(key)  # also after taking it: the last holder may just have stored it
            if found is not None:
                if taken:
                    self._call("release a build lease", None, self._release_lease, key, token)
                return found, False
            if taken:
                return None, True
            waited = time.monotonic() - start
            if waited >= self.wait_timeout:
                log.warning(
                    "waited %.0f s for another process's build of remote cache entry %s; building it here",
                    waited,
                    key,
                )
                return None, False
            if not announced and waited >= WAIT_NOTICE_S:
                holder = self._call("read a build lease", None, self._lease_holder, key)
                warn_once(
                    log,
                    ("remote wait", self.url),
                    "waiting for remote cache entry %s, which %s is building",
                    key,
                    _holder_name(holder),
                )
                announced = True
            time.sleep(pause)
            pause = min(pause * 2, _PAUSE_MAX)

    def _renew_until(self, key: str, token: str, stop: threading.Event) -> None:
        while not stop.wait(LEASE_TTL_S / 3):
            if not self._call("renew a build lease", True, self._renew_lease, key, token, LEASE_TTL_S):
                log.info("lost the build lease of remote cache entry %s (expired); building on", key)
                return

    def entries(self) -> list[RemoteEntryInfo]:
        """Every entry, from its header only (not verified); engine "?" where the header cannot
        be read. Raises what the store raises (the server unreachable)."""
        out = []
        for key in self._keys():
            size = self._size(key)
            if not size:
                continue  # expired or removed meanwhile
            try:
                h = parse_header(self._head(key, HEAD_BYTES) or b"")
                out.append(RemoteEntryInfo(key, h["engine"], size, h["created"], h["versions"], h["info"]))
            except (Damaged, Foreign):
                out.append(RemoteEntryInfo(key, "?", size, None))
        return out

    def stats(self) -> dict:
        """{"entries", "bytes", "url", "ttl", "entry_limit", "key_file"}. Raises what the store
        raises (the server unreachable)."""
        sizes = [self._size(key) for key in self._keys()]
        return {
            "entries": sum(1 for n in sizes if n),
            "bytes": sum(sizes),
            "url": self.shown_url,
            "ttl": self.ttl,
            "entry_limit": self.entry_limit,
            "key_file": str(self.key_file),
        }

    def verify(self) -> dict:
        """Fully check every entry with the key file; remove those that fail. Returns {"ok":
        [keys], "removed": [(key, reason)], "skipped": [(key, reason)]} (skipped: larger than
        ``entry_limit``, not read). Never creates the key file: raises RuntimeError when it is
        missing or unusable. Raises what the store raises (the server unreachable)."""
        try:
            secret = read_secret(self.key_file)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot verify {self.shown_url} without the key file that signed it: {e}") from None
        result: dict[str, list] = {"ok": [], "removed": [], "skipped": []}
        for key in self._keys():
            size = self._size(key)
            if size > self.entry_limit:
                result["skipped"].append((key, f"{size} bytes, over the entry limit of {self.entry_limit}; not read"))
                continue
            data = self._head(key, size) if size else None
            if data is None:
                continue
            try:
                decode_entry(data, key, secret)
                result["ok"].append(key)
            except Exception as e:  # as get() does: whatever fails is removed
                self._delete(key)
                result["removed"].append((key, str(e)))
        return result

    def clear(self) -> int:
        """Remove every entry; returns how many. Leases stay (they expire by themselves).
        Raises what the store raises (the server unreachable)."""
        n = 0
        for key in list(self._keys()):
            self._delete(key)
            n += 1
        return n


def _holder_name(token: str | None) -> str:
    """Who holds a build lease, from its token (``"<pid> <host> <uuid>"``, see :meth:`RemoteCache.claim`)."""
    parts = (token or "").split()
    if len(parts) == 3 and parts[0].isdigit():
        return f"pid {parts[0]} on host {parts[1]}"
    return "another process"


class RedisCache(RemoteCache):
    """:class:`RemoteCache` on a Redis server (6.2 or later; Valkey too), through redis-py.

    Entries are Redis strings under ``trt_subgraph:<format>:entry:<key>``, leases under
    ``trt_subgraph:<format>:lease:<key>`` (redis-py's :class:`redis.lock.Lock`: ``SET NX PX``,
    renewed and released by compare-and-set scripts). ``url``: ``redis://[user:password@]host:port/db``,
    ``rediss://`` (TLS) or ``unix://path?db=N``, as :meth:`redis.Redis.from_url` reads it.
    Other arguments as :class:`RemoteCache`. Raises ValueError for a URL of another scheme,
    ImportError (naming the install command) when redis-py is not installed.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        check_url(url)
        super().__init__(url, **kwargs)
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ImportError(
                "the remote cache needs redis-py: pip install 'trt_subgraph[remote]' (or pip install redis)"
            ) from None
        self._redis = redis
        self.client = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),  # one failure turns the level off; retries would multiply the wait
        )
        self._prefix = f"trt_subgraph:{FORMAT_VERSION}:"
        self._locks: dict[tuple[str, str], Any] = {}
        self._guard = threading.Lock()

    def _name(self, key: str) -> str:
        return f"{self._prefix}entry:{key}"

    def _size(self, key: str) -> int:
        return int(self.client.strlen(self._name(key)))

    @property
    def _expiry(self) -> int | None:
        """``ttl`` in whole seconds as Redis takes it (at least 1), or None."""
        return None if self.ttl is None else max(1, int(self.ttl))

    def _read(self, key: str) -> bytes | None:
        name = self._name(key)
        return self.client.getex(name, ex=self._expiry) if self._expiry is not None else self.client.get(name)

    def _head(self, key: str, n: int) -> bytes | None:
        return self.client.getrange(self._name(key), 0, n - 1) or None

    def _write(self, key: str, data: bytes) -> None:
        self.client.set(self._name(key), data, ex=self._expiry)

    def _delete(self, key: str) -> None:
        self.client.delete(self._name(key))

    def _keys(self) -> Iterator[str]:
        start = len(self._name(""))
        for name in self.client.scan_iter(match=self._name("*"), count=1000):
            key = name[start:].decode("ascii", "replace")
            try:
                yield check_key(key)
            except ValueError:
                continue  # not one of ours

    def _lock(self, key: str, token: str) -> Any:
        with self._guard:
            lock = self._locks.get((key, token))
            if lock is None:
                # thread_local=False: the renewing thread must see the token the waiting thread set
                lock = self._redis.lock.Lock(self.client, f"{self._prefix}lease:{key}", thread_local=False)
                self._locks[(key, token)] = lock
            return lock

    def _take_lease(self, key: str, token: str, ttl: float) -> bool:
        lock = self._lock(key, token)
        lock.timeout = ttl
        taken = False
        try:
            taken = lock.acquire(blocking=False, token=token)
        finally:
            if not taken:  # held by another, or the server failed: nothing of ours to renew or release
                self._forget(key, token)
        return taken

    def _renew_lease(self, key: str, token: str, ttl: float) -> bool:
        try:
            self._lock(key, token).extend(ttl, replace_ttl=True)
            return True
        except self._redis.exceptions.LockError:
            return False

    def _release_lease(self, key: str, token: str) -> None:
        try:
            self._lock(key, token).release()
        except self._redis.exceptions.LockError:
            pass  # expired and maybe taken over: not ours to release
        finally:
            self._forget(key, token)

    def _forget(self, key: str, token: str) -> None:
        with self._guard:
            self._locks.pop((key, token), None)

    def _lease_holder(self, key: str) -> str | None:
        token = self.client.get(f"{self._prefix}lease:{key}")
        return None if token is None else token.decode("ascii", "replace")


_OPEN: dict[tuple, RemoteCache] = {}
_OPEN_GUARD = threading.Lock()


@on_reset
def _forget_open() -> None:
    """``trt_subgraph.reset()``: reconnect, and forget that a server was down."""
    with _OPEN_GUARD:
        _OPEN.clear()


def open_remote(
    url: str,
    *,
    ttl: float | None = DEFAULT_TTL_S,
    entry_limit: int = DEFAULT_ENTRY_LIMIT,
    key_file: str | os.PathLike | None = None,
) -> RemoteCache:
    """This process's :class:`RemoteCache` for ``url`` and these settings, opened once (one
    connection pool, one record of faults); raises as :class:`RedisCache` does."""
    key_path = pathlib.Path(key_file).expanduser() if key_file is not None else default_key_file()
    ident = (url, ttl, entry_limit, str(key_path))
    with _OPEN_GUARD:
        cache = _OPEN.get(ident)
        if cache is None:
            cache = _OPEN[ident] = RedisCache(url, ttl=ttl, entry_limit=entry_limit, key_file=key_path)
        return cache
