"""Worker processes that build unique subgraphs concurrently.

Builds of different fingerprints are independent, so the unique subgraphs of a graph that miss
the caches are handed to a pool of worker processes at once (`trt_subgraph.build.Builds`); the
main process builds too, taking the largest and then whatever no worker has started. A worker
receives the canonical subgraph (pickled by torch's GraphPickler, fake tensors included), the
engine, inductor's config and the process settings that change generated code; it checks that
what it rebuilt has the main process's fingerprint, engine settings, code-generation key and
device key, builds, and returns the serialized artifact: the bytes the disk cache stores. A
worker that crashes, hangs or fails leaves its subgraph to the main process.

Workers are separate interpreters started with ``python -c`` (never ``multiprocessing``'s spawn
or forkserver, which re-run the user's ``__main__`` script in every child). They start before
lowering, as soon as the graph is split into regions (one fewer than its unique regions: the
main process builds too), so that importing torch and inductor overlaps the main process's own
work, and they exit after :data:`IDLE_S` seconds without work (their memory and CUDA context go
with them; the next graph starts them again). Inductor inside a worker
compiles its kernels one at a time: the workers are the parallelism.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import itertools
import logging
import math
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from ._state import on_reset

__all__ = [
    "BUILD_TIMEOUT_S",
    "DROP_WORKING_DIRECTORY",
    "IDLE_S",
    "WorkerError",
    "WorkerPool",
    "default_workers",
    "device_of",
    "for_engine",
    "import_path",
    "pool",
    "shutdown",
    "start",
    "with_import_path",
]

log = logging.getLogger(__name__)

#: Seconds a worker may take to start or to build one subgraph before it counts as hung: it is
#: killed and the main process builds that subgraph itself. An inductor build of one block takes
#: seconds (about 1-3 s on an H200) and minutes at most with ``max_autotune``; a quarter of an
#: hour is far beyond any healthy build and still bounds what a hung worker costs.
BUILD_TIMEOUT_S = 15 * 60.0

#: Seconds without work after which the workers exit (inductor's own compile pool quiesces after
#: 60 s too): a model compiles once and then serves, and idle workers would keep host memory and
#: a CUDA context each. A later graph starts them again.
IDLE_S = 60.0

#: The most workers ``build_workers=None`` starts (see :func:`default_workers`).
MAX_DEFAULT_WORKERS = 8

_HEADER = struct.Struct("<Q")
#: What a child interpreter started with ``python -c`` runs first: it drops the working
#: directory that ``-c`` puts first on its import path, and imports through :func:`import_path`
#: what this process imports (a checkout of another trt_subgraph in the working directory would
#: otherwise shadow the installed one).
DROP_WORKING_DIRECTORY = "import sys; sys.path[:] = [p for p in sys.path if p]; "
_WORKER_CODE = DROP_WORKING_DIRECTORY + "from trt_subgraph.workers import serve; serve(sys.argv[1])"
_WAKE = object()  # queued by `WorkerPool.grow`: a worker thread waits for its restarted worker


class WorkerError(RuntimeError):
    """A worker returned no result: it crashed, hung, or its job raised (the message says which)."""


def usable_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Workers for ``build_workers=None``: half the usable cores, at most
    :data:`MAX_DEFAULT_WORKERS`, and none below 4 cores.

    Each worker imports torch and inductor (a few CPU-seconds) and then builds on one core; the
    other half of the cores stay with the main process (Dynamo, lowering, its own builds) and
    with the compilers the builds call (Triton's ``ptxas``, the C++ compiler). Below 4 cores the
    workers' start-up takes the cores the main process builds on.
    """
    cores = usable_cores()
    return 0 if cores < 4 else min(MAX_DEFAULT_WORKERS, cores // 2)


def _send(stream: Any, data: bytes) -> None:
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream: Any) -> bytes:
    """One message; EOFError when the other side has closed the pipe (or died)."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return data


class _Worker:
    """One worker process; started again after it exits (idle, crashed or killed)."""

    def __init__(self, env: dict[str, str], device: str) -> None:
        self.env = env
        self.device = device
        self.proc: subprocess.Popen | None = None
        self.ready = False

    def start(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE, self.device],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=self.env,
            )
            self.ready = False

    def wait_ready(self, timeout: float) -> None:
        """Until the worker has imported what builds need (it then sends an empty message)."""
        self.start()
        if not self.ready:
            self._exchange(None, timeout)
            self.ready = True

    def run(self, job: bytes, timeout: float) -> Any:
        """The result of `job` (a pickled callable) in this worker; WorkerError when none came."""
        self.wait_ready(timeout)
        ok, value = pickle.loads(self._exchange(job, timeout))
        if not ok:
            raise WorkerError(f"the build failed in the worker:\n{value}")
        return value

    def _exchange(self, job: bytes | None, timeout: float) -> bytes:
        """Send `job` (None: nothing) and read the reply; the worker is killed after `timeout` s."""
        proc = self.proc
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            if job is not None:
                _send(proc.stdin, job)
            return _receive(proc.stdout)
        except (OSError, EOFError, ValueError):
            proc.kill()
            proc.wait()
            if expired.is_set():
                raise WorkerError(f"the worker took over {timeout:.0f} s and was killed") from None
            raise WorkerError(f"the worker exited with code {proc.returncode}") from None
        finally:
            timer.cancel()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class WorkerPool:
    """`size` worker processes behind a queue, like ``concurrent.futures.ProcessPoolExecutor``
    (whose spawn start method would re-run the user's script in every worker).

    The processes start at construction; `device` (``"cuda"`` or ``"cpu"``) is where their
    builds will run (on CUDA a worker compiles one tiny kernel first, paying Triton's and the
    CUDA context's one-time set-up before its first build). A job stays queued, and its Future
    can be cancelled, until a started worker takes it. :meth:`submit`'s Future always completes:
    with the job's result, or with :class:`WorkerError` when the worker crashed, exceeded
    `timeout` seconds (it is then killed), or the job raised.
    """

    def __init__(
        self, size: int, device: str = "cpu", *, timeout: float = BUILD_TIMEOUT_S, idle: float = IDLE_S
    ) -> None:
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {size}")
        self.device = device
        self.timeout = timeout
        self.idle = idle
        self._env = _worker_env()
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()  # (priority, order, item)
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._busy = 0
        self._idle_timer: threading.Timer | None = None
        self._closed = False
        self.workers: list[_Worker] = []
        self.grow(size)

    @property
    def size(self) -> int:
        return len(self.workers)

    def grow(self, size: int) -> None:
        """At least `size` workers, every one started (a stopped worker imports torch again)."""
        with self._lock:
            stopped = sum(1 for w in self.workers if w.proc is None or w.proc.poll() is not None)
            while len(self.workers) < size:
                worker = _Worker(self._env, self.device)
                worker.start()
                self.workers.append(worker)
                threading.Thread(target=self._serve, args=(worker,), daemon=True, name="trt_subgraph-worker").start()
            for worker in self.workers:
                worker.start()
            for _ in range(stopped):  # their threads wait in the queue: have them wait for readiness
                self._put(-math.inf, _WAKE)
            self._arm_idle_timer()

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0) -> concurrent.futures.Future:
        """Run ``fn(*args)`` in a worker (`fn` and `args` must pickle; `fn` by reference). Queued
        jobs start lowest `priority` first, then in order of submission."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        job = pickle.dumps(functools.partial(fn, *args))
        with self._lock:
            if self._closed:
                raise RuntimeError("trt_subgraph: the worker pool is closed")
            self._busy += 1
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
        self._put(priority, (future, job))
        return future

    def _put(self, priority: float, item: Any) -> None:
        self._jobs.put((priority, next(self._order), item))

    def close(self) -> None:
        """Stop every worker now; jobs not done yet fail with WorkerError, queued ones at once
        (the workers' threads stop before they would take them)."""
        with self._lock:
            self._closed = True
            if self._idle_timer is not None:
                self._idle_timer.cancel()
        while True:
            try:
                item = self._jobs.get_nowait()[2]
            except queue.Empty:
                break
            if isinstance(item, tuple):
                future, _ = item
                if future.set_running_or_notify_cancel():
                    future.set_exception(WorkerError("the worker pool was closed"))
        for _ in self.workers:
            self._put(-math.inf, None)
        for worker in self.workers:
            worker.stop()

    def _serve(self, worker: _Worker) -> None:
        """A worker's thread: take jobs only while the worker is ready, so that queued jobs stay
        cancellable until a worker can run them."""
        while True:
            if not self._closed:
                try:
                    worker.wait_ready(self.timeout)
                except WorkerError as exc:
                    log.debug("trt_subgraph: a build worker did not start: %s", exc)
            item = self._jobs.get()[2]
            if item is None:
                worker.stop()  # one this thread may have started after close() stopped the others
                return
            if item is _WAKE:
                continue
            future, job = item
            if self._closed:
                if future.set_running_or_notify_cancel():
                    future.set_exception(WorkerError("the worker pool was closed"))
            elif future.set_running_or_notify_cancel():  # else cancelled while queued: built elsewhere
                try:
                    future.set_result(worker.run(job, self.timeout))
                except Exception as exc:
                    future.set_exception(exc if isinstance(exc, WorkerError) else WorkerError(str(exc)))
            with self._lock:
                self._busy -= 1
                self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:  # with self._lock held
        if self._busy or self._closed or self._idle_timer is not None:
            return
        self._idle_timer = threading.Timer(self.idle, self._stop_idle)
        self._idle_timer.daemon = True
        self._idle_timer.start()

    def _stop_idle(self) -> None:
        with self._lock:
            self._idle_timer = None
            if self._busy or self._closed:
                return
            for worker in self.workers:
                worker.stop()


def import_path() -> str:
    """This process's import path, in order, as ``PYTHONPATH`` for a child interpreter (the
    working directory, where it is on the path, as an absolute path): with
    :data:`DROP_WORKING_DIRECTORY` the child imports the modules this process imports."""
    return os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path)


def with_import_path(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child interpreter that imports what this process imports: ``PYTHONPATH`` is
    :func:`import_path`, then the ``PYTHONPATH`` `env` held (paths set for that child)."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [import_path(), env.get("PYTHONPATH")]))}


def _worker_env() -> dict[str, str]:
    """The main process's environment with its import path, inductor kept from starting a
    compile pool of its own in each worker."""
    env = dict(os.environ)
    env["PYTHONPATH"] = import_path()
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    env["TORCH_WARM_POOL"] = "0"
    return env


_POOL: WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def start(size: int, device: str = "cpu") -> WorkerPool | None:
    """The process's pool with at least `size` workers running (started now where they are
    not; `device`: see :class:`WorkerPool`, set by the first call); None for `size` 0."""
    global _POOL
    if size < 1:
        return None
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = WorkerPool(size, device)
        else:
            _POOL.grow(size)
        return _POOL


def pool() -> WorkerPool | None:
    """The process's pool, if :func:`start` made one."""
    return _POOL


def for_engine(
    engine: Any, build_workers: int | None, device: str = "cpu", needed: int | None = None
) -> WorkerPool | None:
    """The pool that builds for `engine` under option ``build_workers`` (None: see
    :func:`default_workers`), at most `needed` workers (None: no limit) started now where they
    are not; None where builds stay in this process (the engine builds with weights, or no
    workers are wanted)."""
    if not engine.builds_in_workers:
        return None
    size = wanted(build_workers)
    return start(size if needed is None else min(size, needed), device)


def wanted(build_workers: int | None) -> int:
    """Workers under option ``build_workers`` (None: :func:`default_workers`)."""
    return default_workers() if build_workers is None else build_workers


def device_of(inputs: list[Any]) -> str:
    """Where a graph with these example inputs builds: ``"cuda"`` when any tensor is on a CUDA
    device, else ``"cpu"``."""
    return "cuda" if any(getattr(getattr(x, "device", None), "type", None) == "cuda" for x in inputs) else "cpu"


@on_reset
@atexit.register
def shutdown() -> None:
    """Stop the process's workers (at exit, and at ``trt_subgraph.reset()``)."""
    global _POOL
    with _POOL_LOCK:
        found, _POOL = _POOL, None
    if found is not None:
        found.close()


# ---------------------------------------------------------------------------------------------
# Inside a worker


def serve(device: str) -> None:
    """A worker's main loop: import what builds need (see :class:`WorkerPool` for `device`),
    send an empty message, then run each pickled job from stdin and send ``(ok, value)`` back,
    until the main process closes the pipe. Stray prints go to stderr, not into the replies."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    requests = sys.stdin.buffer
    _warm_up(device)
    try:
        _send(replies, b"")
    except OSError:
        return
    while True:
        try:
            job = _receive(requests)
        except EOFError:
            return
        try:
            reply = (True, pickle.loads(job)())
        except BaseException:
            reply = (False, traceback.format_exc())
        try:
            data = pickle.dumps(reply)
        except Exception:
            data = pickle.dumps((False, traceback.format_exc()))
        try:
            _send(replies, data)
        except OSError:  # the main process is gone
            return


def _warm_up(device: str) -> None:
    """Import what every build needs; on CUDA also compile one tiny kernel."""
    from . import _compat
    from .engines import inductor  # noqa: F401  (registers trt_subgraph's ops, which graphs may call)

    _compat.import_inductor()
    if device == "cuda":
        import torch

        try:
            torch.compile(lambda x: x * 2 + 1, backend="inductor", fullgraph=True)(torch.ones(8, device=device))
        except Exception as exc:  # the first build pays the set-up instead
            log.debug("trt_subgraph: warming up a build worker failed: %s", exc)
