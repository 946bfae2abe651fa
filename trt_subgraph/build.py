"""Build each unique subgraph once: process memory first, then the disk cache, then the engine.

The key is the fingerprint plus everything else that changes an artifact (engine settings,
versions, device), so a hit is always an artifact built for exactly this subgraph here.
:class:`Builds` gets all the artifacts of one graph together: disk loads concurrently, builds
in worker processes concurrently (`trt_subgraph.workers`).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from . import __version__, ranks, symbolic, workers
from ._compat import (
    apply_compile_settings,
    compile_settings,
    fp32_precision_in_effect,
    graph_pickle,
    graph_unpickle,
    new_fake_mode,
    process_state,
)
from ._state import on_reset, warn_once
from .cache import FORMAT_VERSION as CACHE_FORMAT  # the entry format is part of every key
from .engines.base import CanonicalSubgraph, Engine, device_types
from .fingerprint import fingerprint
from .options import Options
from .report import SubgraphRecord
from .workers import WorkerPool

log = logging.getLogger(__name__)

_MEMORY: dict[str, Any] = {}


@on_reset
def clear_memory_cache() -> None:
    """Forget the artifacts built or loaded in this process (``trt_subgraph.reset()`` does this)."""
    _MEMORY.clear()


def remembered(key: str) -> Any:
    """The artifact built or loaded under cache key `key` in this process, or None."""
    return _MEMORY.get(key)


def remember(key: str, artifact: Any) -> None:
    """Keep `artifact` (loaded from elsewhere, a saved plan) as this process's artifact of `key`."""
    _MEMORY[key] = artifact


def process_key(sub: CanonicalSubgraph) -> dict[str, Any]:
    """The process settings an artifact's numbers depend on (`trt_subgraph._compat.process_state`:
    TF32 and other float32 precisions, the default dtype, deterministic algorithms,
    reduced-precision reductions), as plain data; the CPU thread count only where the subgraph
    has CPU tensors, since only C++ kernels specialize on it."""
    state = process_state()
    state["default_dtype"] = str(state["default_dtype"]).removeprefix("torch.")
    state["fp32_precision"] = fp32_precision_in_effect(state["fp32_precision"])
    if not any(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in sub.example_inputs):
        del state["num_threads"]
    return state


def device_key(sub: CanonicalSubgraph) -> dict[str, Any]:
    devices = sorted({v.device for v in sub.example_inputs if isinstance(v, torch.Tensor)}, key=str)
    key: dict[str, Any] = {"devices": [d.type for d in devices]}
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda:
        index = cuda[0].index if cuda[0].index is not None else torch.cuda.current_device()
        key["gpu"] = torch.cuda.get_device_name(index)
        key["capability"] = list(torch.cuda.get_device_capability(index))
    return key


HITS = ("disk_hit", "remote_hit")  # the statuses of an artifact loaded from a persistent cache
_SOURCES = {"disk_hit": "from the disk cache", "remote_hit": "from the remote cache", "received": "from another rank"}
# The most seconds `trt_subgraph.save` and the end of the process wait for background builds.
BACKGROUND_WAIT_S = 300.0
# Builds with background builds under way (see `wait_for_background_builds`).
_BACKGROUND: weakref.WeakSet[Builds] = weakref.WeakSet()


class ArtifactStore:
    """Finds or builds the artifact for a canonical subgraph and says where it came from.

    Levels: this process's memory, the local disk cache (`disk`), the fleet's remote cache
    (`remote`, :class:`~trt_subgraph.cache.remote.RemoteCache`; a remote hit is written to the
    disk cache too), then a build under the disk cache's per-key lock and the remote cache's
    build lease (:meth:`claim`), stored in both.
    """

    def __init__(self, engine: Engine, options: Options) -> None:
        self.engine = engine
        self.disk = None
        self.remote = None
        if options.disk_cache_dir is not None and engine.persistable:
            from .cache import DiskCache

            self.disk = DiskCache(options.disk_cache_dir, options.cache_size_limit)
            engine.attach_disk_cache(self.disk)
        if options.remote_cache is not None and options.cache and engine.persistable:
            from .cache.remote import open_remote

            self.remote = open_remote(
                options.remote_cache, ttl=options.remote_cache_ttl, entry_limit=options.remote_cache_entry_limit
            )

    def key_parts(self, sub: CanonicalSubgraph, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "fingerprint": sub.fingerprint,
            "settings": self.engine.settings(),
            "versions": {"torch": torch.__version__, "trt_subgraph": __version__},
            "device": device_key(sub),
            "codegen": self.engine.codegen_key(sub),
            "process": process_key(sub),
            "extra": extra or {},
        }

    def get(
        self, sub: CanonicalSubgraph, weights: list[torch.Tensor], extra: dict[str, Any] | None = None
    ) -> tuple[Any, str, float]:
        """(artifact, status, seconds) with status ``memory_hit``, ``disk_hit``, ``remote_hit`` or ``built``."""
        from .cache import make_key

        parts = self.key_parts(sub, extra)
        key = make_key(parts)
        if key in _MEMORY:
            return _MEMORY[key], "memory_hit", 0.0
        start = time.perf_counter()
        artifact, status = self.load_or_build(sub, weights, key, parts)
        _MEMORY[key] = artifact
        return artifact, status, time.perf_counter() - start

    def load_or_build(
        self, sub: CanonicalSubgraph, weights: list[torch.Tensor], key: str, parts: dict[str, Any], *, load: bool = True
    ) -> tuple[Any, str]:
        """(artifact, ``disk_hit``, ``remote_hit`` or ``built``): under the key's build lock and
        lease (:meth:`claim`), the cached artifact (unless `load` is False), else one built here
        and stored."""
        with self.claim(key, load=load) as found:
            artifact = self._load(key, sub, found[0]) if found is not None else None
            if artifact is not None:
                return artifact, found[1]
            artifact = self.engine.build(sub, weights)
            self._store(key, artifact, parts)
            return artifact, "built"

    def lookup(self, key: str) -> tuple[bytes, str] | None:
        """(payload, ``disk_hit`` or ``remote_hit``) of `key` from the disk cache, else from the
        remote cache (then stored on disk too), else None. Waits for nobody."""
        payload = self.disk.get(key) if self.disk is not None else None
        if payload is not None:
            return payload, "disk_hit"
        found = self.remote.get(key) if self.remote is not None else None
        return None if found is None else self._remote_hit(key, found)

    def _remote_hit(self, key: str, found: tuple[dict, bytes]) -> tuple[bytes, str]:
        header, payload = found
        if self.disk is not None:
            self.disk.put(key, payload, {name: header[name] for name in ("engine", "versions", "info")})
        return payload, "remote_hit"

    @contextlib.contextmanager
    def claim(self, key: str, *, load: bool = True, lease: bool = True) -> Iterator[tuple[bytes, str] | None]:
        """Hold `key`'s disk-cache build lock, and yield :meth:`lookup`'s find (unless `load` is
        False). On a miss (and `lease`): wait for the remote cache's build lease of `key`, and
        yield the entry another process stored meanwhile, or None with the lease held: the
        caller builds and :meth:`put` s before leaving the block. Without a remote cache (or
        without `lease`) a miss yields None at once. Never raises for a cache's faults."""
        with self.disk.build_lock(key) if self.disk is not None else contextlib.nullcontext():
            found = self.lookup(key) if load else None
            if found is not None or not lease:
                yield found
                return
            with self.lease(key) as found:
                yield found

    @contextlib.contextmanager
    def lease(self, key: str) -> Iterator[tuple[bytes, str] | None]:
        """Wait for the remote cache's build lease of `key` (see :meth:`RemoteCache.claim
        <trt_subgraph.cache.remote.RemoteCache.claim>`): yields (payload, ``remote_hit``) once
        another process stored the entry (written to the disk cache too), else None with the
        lease held until the block ends (build and :meth:`put` inside it). Without a remote
        cache, yields None at once. Never raises for the remote cache's faults."""
        if self.remote is None:
            yield None
            return
        with self.remote.claim(key) as entry:
            yield None if entry is None else self._remote_hit(key, entry)

    def _load(self, key: str, sub: CanonicalSubgraph, payload: bytes) -> Any:
        try:
            with self.engine.loading():
                return self.engine.deserialize(payload, sub)
        except Exception as exc:  # a verified entry the installed engine cannot load: rebuild
            log.warning("trt_subgraph: cache entry %s could not be loaded (%s); rebuilding", key, exc)
            return None

    def _store(self, key: str, artifact: Any, parts: dict[str, Any]) -> None:
        if self.disk is None and self.remote is None:
            return
        try:
            payload = self.engine.serialize(artifact)
        except Exception as exc:
            log.warning("trt_subgraph: %s artifact could not be serialized (%s); not cached", self.engine.name, exc)
            return
        if payload is not None:
            self.put(key, payload, parts)

    def put(self, key: str, payload: bytes, parts: dict[str, Any], *, remote: bool = True) -> None:
        """Store an artifact's bytes in the disk and remote caches (those there are; the disk
        cache only unless `remote`) under `key` (whose :meth:`key_parts` are `parts`)."""
        meta = {
            "engine": self.engine.name,
            "versions": parts["versions"],
            "info": {"fingerprint": parts["fingerprint"]},
        }
        if self.disk is not None:
            self.disk.put(key, payload, meta)
        if self.remote is not None and remote:
            self.remote.put(key, payload, meta)


@dataclasses.dataclass(eq=False)
class Pending:
    """One artifact that a graph asked :class:`Builds` for. :meth:`Builds.finish` sets
    `artifact` (None where the engine failed: PyTorch runs the subgraph) and fills `record`."""

    sub: CanonicalSubgraph
    weights: list[torch.Tensor]
    record: SubgraphRecord
    key: str = ""
    parts: dict[str, Any] = dataclasses.field(default_factory=dict)
    first: Pending | None = None  # the request that gets this key's artifact (maybe this one)
    artifact: Any = None
    done: bool = False
    # Between fetching and loading: the artifact's bytes, where they came from, when the fetch
    # began, whether a disk entry may be loaded by a build here, and why a worker build failed.
    payload: bytes | None = None
    status: str = ""
    start: float = 0.0
    load_disk: bool = True
    worker_error: str | None = None
    job: concurrent.futures.Future | None = None  # the build queued for a worker
    # Built in the background (see `Builds.request`). Set once the disk cache was looked up, and
    # once the fetch is over.
    background: bool = False
    looked_up: threading.Event = dataclasses.field(default_factory=threading.Event)
    fetched: threading.Event = dataclasses.field(default_factory=threading.Event)
    # A miss's job for a worker (None: build it here), made in the main thread.
    task: dict[str, Any] | None = None
    task_ready: threading.Event = dataclasses.field(default_factory=threading.Event)


class Builds:
    """The artifacts one Dynamo graph needs, found or built together.

    Lowering asks for each unique subgraph with :meth:`request`, which builds nothing (the
    piece runs in PyTorch until it is bound). :meth:`finish` then gets them all: artifacts this
    process holds at once; disk-cache lookups in threads, then loads (at once where the engine's
    loads allow it). Where `pool` is given and the engine builds without weights, misses of
    static shapes build concurrently: this process builds the largest itself, then whatever no
    worker has started yet, and the workers the rest (`trt_subgraph.workers`); else they build
    here one after another. A worker's build holds the disk cache's per-key build lock from
    lookup to store, as a build here does, and is stored under the same key. A worker that
    crashes, hangs or fails leaves its subgraph to a build here, with a warning. With a remote
    cache, a miss is looked up there too, and every build holds its remote build lease. Statuses and
    counts in the records are those of building one after another (background builds: once
    :meth:`collect` has them). Where torch.distributed ranks split the builds
    (`trt_subgraph.ranks`), all this applies to this rank's share, and the other ranks' artifacts
    arrive after it (status ``received``).
    """

    def __init__(self, engine: Engine, options: Options, pool: WorkerPool | None = None) -> None:
        self.engine = engine
        self.store = ArtifactStore(engine, options)
        self.pool = pool if engine.builds_in_workers else None
        self.rank_split = options.rank_split_builds == "auto" and engine.persistable
        # builds this process runs at once: its build workers plus itself
        self.slots = 1 if self.pool is None else 1 + workers.wanted(options.build_workers)
        self._waiting: list[Pending] = []
        self._first: dict[str, Pending] = {}
        self._later: list[Pending] = []  # building in the background
        self._followers: list[Pending] = []  # waiting for one of those

    def request(
        self, sub: CanonicalSubgraph, weights: list[torch.Tensor], record: SubgraphRecord, *, background: bool = False
    ) -> Pending:
        """Ask for the artifact of `sub` (`weights`: its first instance's); `record` is its
        report entry, with `variant` set. `background`: where a worker can build it, :meth:`finish`
        does not wait for that build (the piece runs in PyTorch meanwhile, record status
        ``building``); a later :meth:`collect` gets it."""
        from .cache import make_key

        pending = Pending(sub, weights, record, background=background and self._in_worker_sub(sub))
        try:
            pending.parts = self.store.key_parts(sub, {"variant": record.variant} if record.variant else None)
            pending.key = make_key(pending.parts)
        except Exception as exc:
            self._failed(pending, exc)
            return pending
        if pending.key in _MEMORY:
            self._resolve(pending, _MEMORY[pending.key], "memory_hit", 0.0)
            return pending
        pending.first = self._first.setdefault(pending.key, pending)
        pending.first.background = pending.first.background and pending.background  # any waits: all wait
        self._waiting.append(pending)
        return pending

    def finish(self) -> None:
        """Get every requested artifact but background builds (see the class and
        :meth:`request`); returns when they are there or failed."""
        waiting, self._waiting, self._first = self._waiting, [], {}
        firsts = [p for p in waiting if p.first is p]
        others = self._split(firsts)  # what other ranks build for this one (`trt_subgraph.ranks`)
        firsts = [p for p in firsts if others is None or p not in others]
        offload = [p for p in firsts if self._in_worker(p) and not p.background]
        later = [p for p in firsts if p.background]
        settings = None
        if len(offload) > 1 or later:
            try:
                settings = compile_settings()
            except Exception as exc:  # a config holds something that does not pickle
                log.warning("trt_subgraph: building in this process only: the compile settings do not pickle (%s)", exc)
        if settings is None:
            offload = []
            for p in later:
                p.background = False
            later = []
        # This process builds the largest itself (no worker start-up in its way), then whatever no
        # worker has started yet; the workers build the rest.
        mine = max(offload, key=lambda p: p.sub.num_ops) if offload else None
        disk = self.store.disk is not None or self.store.remote is not None
        fetched = [p for p in firsts if p not in later and p is not mine and (disk or p in offload)]
        for p in later:  # behind every other build in the workers' queue
            threading.Thread(target=self._fetch, args=(p, True), daemon=True, name="trt_subgraph-later").start()
        with concurrent.futures.ThreadPoolExecutor(
            len(fetched) or 1, thread_name_prefix="trt_subgraph-fetch"
        ) as threads:
            jobs = {p: threads.submit(self._fetch, p, p in offload) for p in fetched}
            self._give_tasks([p for p in fetched if p in offload] + later, settings)
            if mine is not None:
                self._build_here(mine)
                self._steal(jobs)
            concurrent.futures.wait(jobs.values())
            loads = [p for p in fetched if p.payload is not None] + [p for p in later if p.status in HITS]
            self._load_all(loads, threads)
        self._warn_failed(fetched)
        for p in firsts:
            if not p.done and not (p.background and p.status not in HITS):
                self._build_here(p)
        for p in later:
            if not p.done:
                p.record.status = "building"
                self._later.append(p)
                _BACKGROUND.add(self)
        if others is not None:
            self._exchange(firsts, others)
        self._resolve_followers(waiting)

    def _split(self, firsts: list[Pending]) -> list[Pending] | None:
        """Where the ranks of torch.distributed split this graph's builds (`trt_subgraph.ranks`;
        every rank calls this once per graph): the requests that other ranks build, each
        request's `record.rank` set to its owner; else None (this rank builds all)."""
        if not self.rank_split or ranks.world() is None:
            return None
        shared = [p for p in firsts if not p.background]  # background builds stay with each rank
        # subgraphs with symbolic sizes build in this process, one after another
        slots = self.slots if all(self._in_worker_sub(p.sub) for p in shared) else 1
        owner = ranks.owners({p.key: p.sub.num_ops for p in shared}, slots)
        if owner is None:
            return None
        rank = torch.distributed.get_rank()
        for p in shared:
            p.record.rank = owner[p.key]
        return [p for p in shared if owner[p.key] != rank]

    def _exchange(self, mine: list[Pending], others: list[Pending]) -> None:
        """Send the artifacts this rank owns (those of `mine` whose `record.rank` is this rank)
        to the other ranks, and get those of `others`: status ``received``, or built here (with
        a warning) where the owner's build failed or its bytes do not load."""
        rank = torch.distributed.get_rank()
        payloads = {p.key: self._payload(p) for p in mine if p.record.rank == rank}
        start = time.perf_counter()
        found = ranks.exchange(payloads)
        for p in others:
            p.start, p.payload, p.status = start, found.get(p.key), "received"
            if p.payload is not None:  # a later process here starts warm (the owner filled the remote cache)
                self.store.put(p.key, p.payload, p.parts, remote=False)
        self._load_all([p for p in others if p.payload is not None], None)
        missing = [p for p in others if not p.done]
        if missing:
            log.warning(
                "trt_subgraph: %d subgraph(s) that other ranks were to build did not arrive; building them on rank %d",
                len(missing),
                rank,
            )
        for p in missing:
            p.record.rank = rank
            self._build_here(p)

    def _payload(self, p: Pending) -> bytes | None:
        """The bytes of `p`'s artifact for the other ranks; None where it failed or does not serialize."""
        if p.artifact is None:
            return None
        try:
            return self.engine.serialize(p.artifact)
        except Exception as exc:
            log.warning(
                "trt_subgraph: the %s artifact of subgraph %s could not be serialized for the other ranks (%s)",
                self.engine.name,
                p.sub.fingerprint,
                exc,
            )
            return None

    def _give_tasks(self, offload: list[Pending], settings: dict[str, Any] | None) -> None:
        """After their disk lookups, the worker tasks of the misses among `offload`. Made here,
        before this process builds anything: torch's GraphPickler changes global pytree state
        while it runs, which must not meet a build or another pickling."""
        try:
            for p in offload:
                p.looked_up.wait()
                if p.payload is None and settings is not None:
                    try:
                        p.task = {
                            "engine": self.engine,
                            "graph": graph_pickle(p.sub.gm, keep_meta=lambda key: key == "val"),
                            "input_kinds": p.sub.input_kinds,
                            "parts": p.parts,
                            "settings": settings,
                        }
                    except Exception as exc:  # something in the graph does not pickle: built here
                        p.worker_error = f"{type(exc).__name__}: {exc}"
                p.task_ready.set()
        finally:
            for p in offload:  # never leave a thread waiting while it holds a build lock
                p.task_ready.set()

    @property
    def building(self) -> bool:
        """Whether background builds are still under way (see :meth:`collect`)."""
        return bool(self._later)

    def collect(self) -> bool:
        """Bind-ready what background builds finished since the last call (between calls of the
        compiled forward: nothing else runs in this process meanwhile); True when any did. A
        failed background build is built here now, with a warning."""
        ready = [p for p in self._later if p.fetched.is_set()]
        if not ready:
            return False
        self._later = [p for p in self._later if p not in ready]
        self._load_all([p for p in ready if p.payload is not None], None)
        self._warn_failed(ready)
        for p in ready:
            if not p.done:
                self._build_here(p)
        self._resolve_followers(self._followers)
        return True

    def _load_all(self, loads: list[Pending], threads: concurrent.futures.ThreadPoolExecutor | None) -> None:
        if loads:
            self.engine.start_setup(device_types([x for p in loads for x in p.sub.example_inputs]))
        with self.engine.loading():  # nothing else runs in this process meanwhile
            if threads is not None and self.engine.loads_concurrently():
                list(threads.map(self._load, loads))
            else:
                for p in loads:
                    self._load(p)

    def _warn_failed(self, fetched: list[Pending]) -> None:
        failed = [p for p in fetched if p.worker_error is not None]
        if failed:
            log.warning(
                "trt_subgraph: %d build(s) in worker processes failed (%s); building in this process instead",
                len(failed),
                failed[0].worker_error,
            )

    def _resolve_followers(self, waiting: list[Pending]) -> None:
        """Requests of a key another piece of the graph asked for first get its artifact."""
        self._followers = []
        for p in waiting:
            if p.first is p or p.done:
                continue
            if not p.first.done:  # its first builds in the background
                self._followers.append(p)
            elif p.first.artifact is not None:
                self._resolve(p, p.first.artifact, "memory_hit", 0.0)
            else:
                p.done, p.record.status, p.record.error = True, "fallback", p.first.record.error

    def _in_worker(self, p: Pending) -> bool:
        return self._in_worker_sub(p.sub)

    def _in_worker_sub(self, sub: CanonicalSubgraph) -> bool:
        return self.pool is not None and not symbolic.is_symbolic(sub.example_inputs)

    def _fetch(self, p: Pending, offload: bool) -> None:
        """In a thread: the disk cache's bytes, else (`offload`) a worker's build of the task
        :meth:`_give_tasks` makes, stored. Leaves no bytes for a build in this process: a miss
        not offloaded, a failed or a cancelled worker build."""
        try:
            self._fetch_bytes(p, offload)
        finally:
            p.looked_up.set()
            p.fetched.set()

    def _fetch_bytes(self, p: Pending, offload: bool) -> None:
        p.start = time.perf_counter()
        with self.store.claim(p.key, lease=False) as found:
            if found is not None:
                p.payload, p.status = found
                return
            p.looked_up.set()
            if offload:
                p.task_ready.wait()
                if p.task is None:
                    return
                with self.store.lease(p.key) as found:
                    if found is not None:
                        p.payload, p.status = found
                        return
                    self._build_in_worker(p)

    def _build_in_worker(self, p: Pending) -> None:
        """A worker's build of `p`'s task, stored (a failed or cancelled one leaves no bytes)."""
        try:
            p.job = self.pool.submit(build_in_worker, p.task, priority=int(p.background))
            payload = p.job.result()
        except concurrent.futures.CancelledError:  # this process took it (`_steal`)
            return
        except Exception as exc:
            p.worker_error = f"{type(exc).__name__}: {exc}"
            return
        p.record.worker = True
        self.store.put(p.key, payload, p.parts)
        p.status, p.payload = "built", payload

    def _steal(self, jobs: dict[Pending, concurrent.futures.Future]) -> None:
        """Build here, largest first, what is still queued for a worker."""
        for p in sorted(jobs, key=lambda p: p.sub.num_ops, reverse=True):
            if p.job is not None and p.job.cancel():
                jobs[p].result()  # its thread has let go of the key's build lock
                self._build_here(p)

    def _load(self, p: Pending) -> None:
        payload, p.payload = p.payload, None
        try:
            artifact = self.engine.deserialize(payload, p.sub)
        except Exception as exc:
            log.warning(
                "trt_subgraph: the %s artifact of subgraph %s (%s) could not be loaded (%s); building it in this process",
                self.engine.name,
                p.sub.fingerprint,
                _SOURCES.get(p.status, "built in a worker"),
                exc,
            )
            p.load_disk, p.record.worker = False, False
            return
        self._resolve(p, artifact, p.status, time.perf_counter() - p.start)

    def _build_here(self, p: Pending) -> None:
        start = time.perf_counter()
        try:
            artifact, status = self.store.load_or_build(p.sub, p.weights, p.key, p.parts, load=p.load_disk)
        except Exception as exc:  # one piece failing must not take the model down
            self._failed(p, exc)
            return
        self._resolve(p, artifact, status, time.perf_counter() - start)

    def _resolve(self, p: Pending, artifact: Any, status: str, seconds: float) -> None:
        p.artifact, p.done = artifact, True
        p.record.status, p.record.build_s = status, seconds
        if p.key:
            _MEMORY[p.key] = artifact

    def _failed(self, p: Pending, exc: Exception) -> None:
        p.done = True
        p.record.status, p.record.error = "fallback", f"{type(exc).__name__}: {exc}"
        warn_once(  # each graph (each recompile, each region) meets the same fingerprints
            log,
            ("build failed", self.engine.name, p.sub.fingerprint),
            "trt_subgraph: engine %r failed to build subgraph %s (%d ops): %s; running it in PyTorch",
            self.engine.name,
            p.sub.fingerprint,
            p.sub.num_ops,
            p.record.error,
        )


def build_in_worker(task: dict[str, Any]) -> bytes:
    """Build one subgraph in a worker process (`trt_subgraph.workers`); the artifact's bytes.

    `task`: the engine, the canonical subgraph pickled with its fake tensors, its input kinds,
    the main process's cache-key parts and `compile_settings()`. Raises unless the fingerprint,
    engine settings, code-generation key, device key and process settings found here are the
    main process's, so the bytes are what a build there would store under that key.
    """
    apply_compile_settings(task["settings"])
    engine = task["engine"]
    gm = graph_unpickle(task["graph"], new_fake_mode())
    kinds = tuple(task["input_kinds"])
    sub = CanonicalSubgraph(gm=gm, input_kinds=kinds, fingerprint=fingerprint(gm, kinds))
    parts = task["parts"]
    found = {
        "fingerprint": sub.fingerprint,
        "settings": engine.settings(),
        "device": device_key(sub),
        "codegen": engine.codegen_key(sub),
    }
    differ = [name for name, value in found.items() if value != parts[name]]
    if process_state() != task["settings"]["process"]:
        differ.append("process settings")
    if differ:
        raise RuntimeError(f"the worker's {', '.join(differ)} differ from the main process's")
    payload = engine.serialize(engine.build(sub, []))
    if payload is None:
        raise RuntimeError(f"the {engine.name} engine gave no bytes for its artifact")
    return payload


@on_reset
def _forget_background_builds() -> None:
    """``trt_subgraph.reset()`` drops the compiled graphs (and stops the workers, which fails
    their builds): nothing of theirs is waited for any more."""
    _BACKGROUND.clear()


def wait_for_background_builds(limit_s: float = BACKGROUND_WAIT_S) -> list[str]:
    """Wait until every background build of this process (``background_glue``) has finished and
    is stored in the caches, at most `limit_s` seconds in all; the fingerprints of those still
    building. Their engines are swapped in at the next call of their forward, as always."""
    deadline = time.monotonic() + limit_s
    left = []
    for builds in list(_BACKGROUND):
        for p in list(builds._later):
            if not p.fetched.wait(max(0.0, deadline - time.monotonic())):
                left.append(p.sub.fingerprint)
    return left


@atexit.register  # after the workers' own exit handler was registered (workers is imported first): runs before it
def _store_background_builds_at_exit() -> None:
    """A process that ends while glue builds in the background would stop the workers and lose
    those builds, so a short-lived process (a script, a batch job) never left them in the disk
    cache and the next one built them again: wait for them first (:data:`BACKGROUND_WAIT_S`)."""
    if not any(builds.building for builds in list(_BACKGROUND)):
        return
    if wait_for_background_builds(2.0):  # said only where the end of the process visibly waits
        log.warning(
            "trt_subgraph: waiting for background builds (at most %.0f s), so that the caches keep them",
            BACKGROUND_WAIT_S,
        )
    left = wait_for_background_builds()
    if left:
        log.warning(
            "trt_subgraph: %d background build(s) did not finish within %.0f s of the end of the process; "
            "the next process builds them again",
            len(left),
            BACKGROUND_WAIT_S,
        )
