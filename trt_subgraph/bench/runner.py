"""The sweep: expand models x depths x backends into cases, run each in a fresh process, collect.

Each case gets empty TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR and TRT_SUBGRAPH_CACHE_DIR
directories so that its first call is a true cold compile. With `warm_cache`, every
trt_subgraph case runs a second time in a new process that shares only the
TRT_SUBGRAPH_CACHE_DIR of the first (inductor's and triton's caches still empty): that row is
the "warm" variant, i.e. what a second process on the same machine pays. With `saved`, a process
that is not timed compiles each trt_subgraph case ahead of time and saves it
(``trt_subgraph.save``), and the "saved" row is a new process with every cache empty that loads
the file (``trt_subgraph.load``): what a deployment that ships the file pays.

First-call times of identical processes spread by tens of percent (imports, the CPU load of
compile workers), so ``runs`` repeats the sweep round by round (drift then hits every backend
alike) and each row is the run with the median first call, holding every run's first call.

Case processes need Python bytecode for torch and the packages a compile imports. `pip install`
writes it beside the sources, but some machines ship packages without `.pyc` files and set
PYTHONDONTWRITEBYTECODE=1; there every fresh process compiles torch's sources again, which adds
seconds to every import and first call. With ``bytecode="auto"`` (the default) the sweep checks
this once, before the first case, and if the bytecode is missing compiles it into a cache
directory (``python -m compileall``, one worker per core) and passes PYTHONPYCACHEPREFIX to
every case process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from trt_subgraph.bench import output
from trt_subgraph.bench._case import MARKER
from trt_subgraph.bench.backends import check_backend
from trt_subgraph.bench.models import DEFAULTS, DTYPES, MODELS
from trt_subgraph.cli.factory import check_factory_spec
from trt_subgraph.options import Options
from trt_subgraph.workers import DROP_WORKING_DIRECTORY, with_import_path

# Small sizes so that a CPU-only user sees a result within about a minute.
CPU_DEFAULTS: dict[str, Any] = {"width": 64, "batch": 2, "seq": 16, "image": 32, "depths": [2, 4]}
SIZE_KEYS = ("width", "batch", "seq", "image")
BYTECODE_MODES = ("auto", "off")
# Packages a case process imports (besides the standard library), compiled when bytecode is missing.
BYTECODE_PACKAGES = (
    "torch",
    "torchgen",
    "functorch",
    "triton",
    "sympy",
    "mpmath",
    "numpy",
    "jinja2",
    "markupsafe",
    "networkx",
    "filelock",
    "fsspec",
    "typing_extensions",
    "packaging",
    "onnx",
    "psutil",
    "yaml",
    "tqdm",
    "setuptools",
    "_distutils_hack",
    "xxhash",
    "transformers",
    "torch_tensorrt",
    "tensorrt",
    "trt_subgraph",
)
# Modules whose bytecode tells whether a case process would find any.
BYTECODE_PROBES = ("torch/__init__.py", "torch/_inductor/compile_fx.py")
# Standard-library folders a compile never imports.
_STDLIB_SKIP = {
    "site-packages",
    "dist-packages",
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "__pycache__",
}


@dataclasses.dataclass
class Config:
    """Everything that defines a sweep (what the CLI parsed, validated)."""

    models: list[str]
    backends: list[str]
    device: str
    dtype: str
    depths: list[int] | None = None  # None: each model's default depth
    width: int | None = None
    batch: int | None = None
    seq: int | None = None
    image: int | None = None
    # Dynamic shapes: every case calls its one compiled model at each of these batch sizes (or
    # sequence lengths), in this order; rows per (case, size). At most one of the two.
    batches: list[int] | None = None
    seqs: list[int] | None = None
    dynamic: bool = False  # torch.compile(..., dynamic=True) for every compiling backend
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    repeats: int = 20
    warmup: int = 3
    sparse: bool = False
    trt_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    tt_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    warm_cache: bool = False
    saved: bool = False  # a "saved" row per trt_subgraph case: load a saved function, every cache empty
    runs: int = 1
    timeout: float = 900.0
    seed: int = 0
    bytecode: str = "auto"  # "auto": compile missing bytecode before the first case; "off": never
    out: Path | None = None
    append: bool = False
    title: str = "trt-subgraph bench"
    command: str = ""

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("no models given; built-in: " + ", ".join(MODELS) + ", or package.module:factory")
        for m in (m for m in self.models if m not in MODELS):
            if ":" not in m:
                raise ValueError(f"unknown model {m!r}; allowed: {', '.join(MODELS)}, or package.module:factory")
            check_factory_spec(m)
        if not self.backends:
            raise ValueError("no backends given")
        for b in self.backends:
            check_backend(b)
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if not re.fullmatch(r"cpu|cuda(:(0|[1-9][0-9]{0,3}))?", self.device):
            raise ValueError(f"unknown device {self.device!r}; allowed: cpu, cuda, cuda:N")
        for key, least in (("repeats", 1), ("warmup", 0), ("runs", 1)):
            v = getattr(self, key)
            if v < least:
                raise ValueError(f"{key} must be >= {least}, got {v}")
        for key in SIZE_KEYS:
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{key} must be a positive int, got {v!r}")
        if self.depths is not None and any(d < 1 for d in self.depths):
            raise ValueError(f"depths must be positive, got {self.depths}")
        if self.depths is not None and set(self.models) == {"mlp"}:
            raise ValueError("--depths does not apply to mlp (a plain MLP, nothing repeated): drop --depths")
        if not (0 < self.timeout < math.inf):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout}")
        if self.trt_options:
            Options.from_user(self.trt_options)  # a bad option fails here, not in every case process
        if self.bytecode not in BYTECODE_MODES:
            raise ValueError(f"unknown bytecode mode {self.bytecode!r}; allowed: {', '.join(BYTECODE_MODES)}")
        self._check_sizes()
        if self.saved and "trt_subgraph" not in self.backends:
            raise ValueError("--saved adds rows to the trt_subgraph backend's cases: add trt_subgraph to --backends")
        if self.saved and (self.sweep() is not None or self.dynamic):
            raise ValueError("--saved takes one input size: a saved function is compiled for its example inputs")

    def _check_sizes(self) -> None:
        """--batches / --seqs: one of them, each size a positive int listed once, not with the
        single --batch / --seq it replaces; --seqs only for models with a sequence."""
        if self.batches is not None and self.seqs is not None:
            raise ValueError("--batches and --seqs exclude each other: a sweep varies one size; run them separately")
        for key, single in (("batches", "batch"), ("seqs", "seq")):
            sizes = getattr(self, key)
            if sizes is None:
                continue
            if getattr(self, single) is not None:
                raise ValueError(f"--{key} and --{single} exclude each other: --{key} lists every {single} to call")
            if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
                raise ValueError(f"--{key} must be comma-separated positive ints, got {sizes}")
            if len(set(sizes)) != len(sizes):
                raise ValueError(f"--{key} lists a size twice: {sizes}; each size is called once, in order")
        for key in ("seq", "image"):
            if getattr(self, key) is not None and not any(key in DEFAULTS.get(m, {key: None}) for m in self.models):
                sized = ", ".join(m for m, sizes in DEFAULTS.items() if key in sizes)
                raise ValueError(f"--{key} sizes {sized} and --model factories, none of which is given")
        if self.seqs is not None:
            fixed = [m for m in self.models if m in MODELS and m not in ("encoder", "decoder")]
            if fixed:
                raise ValueError(
                    f"--seqs applies to models with a sequence length (encoder, decoder, --model "
                    f"factories), not {', '.join(fixed)}"
                )

    def sweep(self) -> dict[str, Any] | None:
        """The sizes each case calls: {"dim": "batch" or "seq", "sizes": [...]}, or None."""
        if self.batches is not None:
            return {"dim": "batch", "sizes": list(self.batches)}
        if self.seqs is not None:
            return {"dim": "seq", "sizes": list(self.seqs)}
        return None


@dataclasses.dataclass
class Case:
    model: str
    depth: int | None
    backend: str
    variant: str  # "cold", "warm" or "saved"
    spec: dict[str, Any]

    def label(self) -> str:
        depth = "" if self.depth is None else f" depth={self.depth}"
        variant = {"warm": " (warm cache)", "saved": " (saved function)"}.get(self.variant, "")
        return f"{self.model}{depth} {self.backend}{variant}"


def _model_kwargs(cfg: Config, model: str, depth: int | None) -> dict[str, Any]:
    """Keyword arguments for models.build or the user's factory: only what was set."""
    kw: dict[str, Any] = {k: getattr(cfg, k) for k in SIZE_KEYS if getattr(cfg, k) is not None}
    if cfg.seqs is not None:
        kw["seq"] = max(cfg.seqs)  # the model is built once, for the longest sequence it is called with
    if depth is not None:
        kw["depth"] = depth
    if model in MODELS and cfg.device == "cpu":
        # Built-in models default to their GPU benchmark sizes; on CPU use small ones.
        for k in SIZE_KEYS:
            kw.setdefault(k, CPU_DEFAULTS[k])
    if model == "mlp":
        kw.pop("depth", None)  # the MLP has no repeated blocks
    if model in ("encoder", "decoder", "mlp"):
        kw.pop("image", None)
    if model in MODELS and model not in ("encoder", "decoder"):  # image models and the MLP
        kw.pop("seq", None)
    kw.update(cfg.model_kwargs)
    return kw


def cases(cfg: Config) -> list[Case]:
    """The sweep in run order: model, then depth, then backend (warm right after its cold)."""
    out: list[Case] = []
    for model in cfg.models:
        depths: list[int | None]
        if cfg.depths is not None:
            depths = list(cfg.depths)
        elif model in MODELS and cfg.device == "cpu":
            depths = list(CPU_DEFAULTS["depths"])
        else:
            depths = [None]
        if model == "mlp":
            depths = [None]
        for depth in depths:
            for backend in cfg.backends:
                spec = {
                    "model": model,
                    "model_kwargs": _model_kwargs(cfg, model, depth),
                    "backend": backend,
                    "device": cfg.device,
                    "dtype": cfg.dtype,
                    "warmup": cfg.warmup,
                    "repeats": cfg.repeats,
                    "sparse": cfg.sparse,
                    "trt_options": cfg.trt_options,
                    "tt_options": cfg.tt_options,
                    "seed": cfg.seed,
                    "sweep": cfg.sweep(),
                    "dynamic": cfg.dynamic,
                }
                out.append(Case(model, depth, backend, "cold", spec))
                if cfg.warm_cache and backend == "trt_subgraph":
                    out.append(Case(model, depth, backend, "warm", spec))
                if cfg.saved and backend == "trt_subgraph":
                    out.append(Case(model, depth, backend, "saved", spec))
    return out


def _depth_label(case: Case) -> int | str | None:
    if case.depth is not None:
        return case.depth
    if case.model in DEFAULTS:
        d = DEFAULTS[case.model]["depth"]
        return "-".join(map(str, d)) if isinstance(d, tuple) else d
    return None


def _sizes(case: Case) -> dict[str, Any]:
    """The sizes the case really used (the model's defaults filled in for built-ins)."""
    sizes = dict(DEFAULTS.get(case.model, {}))
    sizes.update(case.spec["model_kwargs"])
    return {k: v for k, v in sizes.items() if v is not None}


# Seconds between SIGTERM and SIGKILL when a case runs past its timeout.
TERM_GRACE_S = 15.0


def _signal_session(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # the session has ended
        pass


@contextlib.contextmanager
def stop_signals_as_exit() -> Iterator[None]:
    """SIGTERM (``timeout``, a job scheduler, ``kill``) and SIGHUP (a closed terminal) raise
    SystemExit in the main thread, so that :func:`run_in_own_session` stops the case running in
    its session: by default either signal ends this process at once and the case, in a session
    of its own, outlives it."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live there
        yield
        return
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_in_own_session(
    cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: str | None = None
) -> tuple[int | None, str, str, bool, float]:
    """Run `cmd` to its end in a session of its own, so that a timeout (seconds) stops what it
    started too (compile workers, ranks): (return code, stdout, stderr, timed out, seconds).
    At the timeout the session gets SIGTERM, which launchers such as ``torchrun`` pass on to what
    they started in sessions of their own (its ranks), and SIGKILL :data:`TERM_GRACE_S` seconds
    later. `env`: the child's whole environment (None: this process's); `cwd`: its working
    directory (None: this process's)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _signal_session(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_session(proc.pid, signal.SIGKILL)
            try:
                stdout, stderr = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # a grandchild in a session of its own still holds the pipes
                proc.kill()
                stdout = ""
                stderr = f"(output lost: a process it started outlived it and kept its pipes open; pid {proc.pid})"
                proc.wait()
        _signal_session(proc.pid, signal.SIGKILL)  # what ignored SIGTERM in the session
        timed_out = True
    except BaseException:
        _signal_session(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, stdout, stderr, timed_out, time.perf_counter() - start


def run_case(
    case: Case, *, trt_cache_dir: str, timeout: float, log_file: Path | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one case in a fresh interpreter; always returns a row (errors and timeouts included).

    `env`: extra environment variables for the case process (e.g. PYTHONPYCACHEPREFIX)."""
    row: dict[str, Any] = {
        "model": case.model,
        "depth": _depth_label(case),
        "backend": case.backend,
        "variant": case.variant,
        "sizes": _sizes(case),
    }
    if case.spec.get("sweep"):
        row["dim"] = case.spec["sweep"]["dim"]
    tmp = tempfile.mkdtemp(prefix="trt_subgraph_bench_")
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env.update(
        TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
        TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
        TRT_SUBGRAPH_CACHE_DIR=trt_cache_dir,
    )
    child_env = with_import_path(child_env)  # this trt_subgraph, whatever the working directory holds
    code = DROP_WORKING_DIRECTORY + "from trt_subgraph.bench._case import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, json.dumps(case.spec)]
    try:
        returncode, stdout, stderr, timed_out, row["wall_s"] = run_in_own_session(cmd, timeout=timeout, env=child_env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = None
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER) :])
    if timed_out:
        row.update(status="timeout", error=f"timed out after {timeout:g}s")
    elif result is None:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        row.update(status="error", error=f"case process exited with {returncode} without a result: {tail}")
    else:
        row.update(result)
    if log_file is not None and row["status"] != "ok":
        # The child's full output of a failed case, for debugging (a row keeps only the message).
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(f"spec: {json.dumps(case.spec)}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")
        row["log"] = f"{log_file.parent.name}/{log_file.name}"  # relative to the --out folder
    return row


def _progress(stream: IO[str], i: int, n: int, case: Case) -> None:
    stream.write(f"[{i}/{n}] {case.label()} ... ")
    stream.flush()


def _progress_done(stream: IO[str], row: dict[str, Any]) -> None:
    msg = "ok" if row["status"] == "ok" else f"{row['status']}: {str(row.get('error', ''))[:120]}"
    stream.write(f"{row['wall_s']:.1f}s {msg}\n")
    stream.flush()


def versions() -> dict[str, str | None]:
    """Versions of what the numbers depend on (None: not installed)."""
    import torch

    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": dist("triton"),
        "trt_subgraph": dist("trt_subgraph"),
        "torch_tensorrt": dist("torch_tensorrt") or dist("torch-tensorrt"),
        "tensorrt": dist("tensorrt"),
    }


def _case_log_name(case: Case) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in case.label().replace(" ", "_")) + ".log"


def bytecode_cache_dir() -> Path:
    """Default PYTHONPYCACHEPREFIX for the case processes: trt_subgraph-bench/pycache in the user's
    cache directory (``cache.paths.cache_home``). Bytecode is checked against its source's mtime and
    size on every import, so one directory serves every environment and torch version."""
    from ..cache.paths import cache_home

    return cache_home() / "trt_subgraph-bench" / "pycache"


def _pyc_path(source: str, prefix: str | None) -> str:
    """Where an interpreter started with PYTHONPYCACHEPREFIX=prefix (None: unset) looks for the
    bytecode of `source`."""
    saved = sys.pycache_prefix
    sys.pycache_prefix = prefix
    try:
        return importlib.util.cache_from_source(source)
    finally:
        sys.pycache_prefix = saved


def _probe_sources() -> list[str]:
    """BYTECODE_PROBES of the installed torch (none when torch cannot be found)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return []
    site = os.path.dirname(next(iter(spec.submodule_search_locations)))
    sources = [os.path.join(site, rel) for rel in BYTECODE_PROBES]
    return [src for src in sources if os.path.isfile(src)]


def has_bytecode(prefix: str | None, sources: list[str] | None = None) -> bool:
    """True when a process with PYTHONPYCACHEPREFIX=prefix (None: unset) finds bytecode for every
    probe source (by default torch's __init__ and inductor's compile_fx)."""
    sources = _probe_sources() if sources is None else sources
    return all(os.path.isfile(_pyc_path(src, prefix)) for src in sources)


def _top_packages(models: list[str]) -> list[str]:
    """Top-level packages of the users' --model factories (package.module:factory)."""
    return [m.partition(":")[0].split(".")[0] for m in models if ":" in m]


def bytecode_sources(models: list[str] = ()) -> list[str]:
    """Files and folders to compile: the standard library (without its tests, GUI and
    site-packages), BYTECODE_PACKAGES and the packages of the users' model factories, as found
    by the import system; what is not installed is skipped."""
    paths: list[str] = []
    stdlib = sysconfig.get_paths()["stdlib"]
    if os.path.isdir(stdlib):
        for name in sorted(os.listdir(stdlib)):
            full = os.path.join(stdlib, name)
            if name not in _STDLIB_SKIP and (name.endswith(".py") or (os.path.isdir(full) and "-" not in name)):
                paths.append(full)
    for name in dict.fromkeys([*BYTECODE_PACKAGES, *_top_packages(list(models))]):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        if spec.submodule_search_locations:
            paths.extend(spec.submodule_search_locations)
        elif spec.origin and spec.origin.endswith(".py"):
            paths.append(spec.origin)
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))


def compile_bytecode(prefix: str, paths: list[str]) -> subprocess.CompletedProcess:
    """`python -m compileall -q -j 0 PATHS` with PYTHONPYCACHEPREFIX=prefix: bytecode for every
    source under paths, written into the mirror tree under prefix, one worker per core. Up-to-date
    files are skipped, so a second sweep costs only the checks."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=prefix)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", *paths],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )


def prepare_bytecode(mode: str, models: list[str], stream: IO[str]) -> tuple[dict[str, str], str]:
    """Before the first case: (environment for every case process, what was done, for meta).

    "off": nothing. "auto": if a case process would find no bytecode for torch (where
    PYTHONPYCACHEPREFIX points, else beside the sources), compile it into PYTHONPYCACHEPREFIX
    when the user set it, else into bytecode_cache_dir(), and pass that to every case."""
    if mode == "off":
        return {}, "off"
    user_prefix = os.environ.get("PYTHONPYCACHEPREFIX") or None
    if has_bytecode(user_prefix):
        where = f"in PYTHONPYCACHEPREFIX={user_prefix}" if user_prefix else "beside the sources"
        return {}, f"present ({where})"
    prefix = user_prefix or str(bytecode_cache_dir())
    paths = bytecode_sources(models)
    stream.write(
        f"bytecode: torch has no compiled bytecode where the case processes look; compiling "
        f"{len(paths)} packages and standard-library modules into {prefix} ... "
    )
    stream.flush()
    t0 = time.perf_counter()
    try:
        os.makedirs(prefix, exist_ok=True)
        compile_bytecode(prefix, paths)
    except OSError as e:
        stream.write(f"failed ({e}); the cases run without it\n")
        return {}, f"missing; compiling it failed: {e}"
    seconds = time.perf_counter() - t0
    stream.write(f"{seconds:.1f}s\n")
    return {"PYTHONPYCACHEPREFIX": prefix}, f"compiled into {prefix} (PYTHONPYCACHEPREFIX) in {seconds:.1f} s"


def _iter_runs(
    cfg: Config, all_cases: list[Case], stream: IO[str], env: dict[str, str] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(case index, row) for every process, round by round; `env` goes to every case process."""
    warm_dirs: dict[tuple[str, int | None], str] = {}
    plan = [(index, case) for _ in range(cfg.runs) for index, case in enumerate(all_cases)]
    for i, (index, case) in enumerate(plan, start=1):
        _progress(stream, i, len(plan), case)
        key = (case.model, case.depth)
        shared = cfg.warm_cache and case.backend == "trt_subgraph" and case.variant != "saved"
        if shared and case.variant == "cold":
            warm_dirs[key] = tempfile.mkdtemp(prefix="trt_subgraph_bench_cache_")
        trt_dir = warm_dirs[key] if shared else tempfile.mkdtemp(prefix="trt_subgraph_bench_cache_")
        log_file = cfg.out / "logs" / _case_log_name(case) if cfg.out else None
        try:
            if case.variant == "saved":
                row = _run_saved(case, trt_dir, cfg.timeout, log_file, env)
            else:
                row = run_case(case, trt_cache_dir=trt_dir, timeout=cfg.timeout, log_file=log_file, env=env)
        finally:
            if not shared or case.variant == "warm":
                shutil.rmtree(trt_dir, ignore_errors=True)
        _progress_done(stream, row)
        yield index, row


def _run_saved(
    case: Case, trt_dir: str, timeout: float, log_file: Path | None, env: dict[str, str] | None
) -> dict[str, Any]:
    """The "saved" row of `case`: a process (not timed) compiles ahead of time and saves the
    function into a fresh folder, then a new process with every cache empty loads it and is
    timed; the writer's error where it failed."""
    folder = tempfile.mkdtemp(prefix="trt_subgraph_bench_saved_")
    try:
        writer = dataclasses.replace(case, spec={**case.spec, "saved": {"role": "write", "folder": folder}})
        row = run_case(writer, trt_cache_dir=trt_dir, timeout=timeout, log_file=log_file, env=env)
        if row.get("status") != "ok":
            return {**row, "error": f"saving the function: {row.get('error', '')}"}
        reader = dataclasses.replace(case, spec={**case.spec, "saved": {"role": "load", "folder": folder}})
        empty = tempfile.mkdtemp(prefix="trt_subgraph_bench_cache_")  # nothing but the file
        try:
            return run_case(reader, trt_cache_dir=empty, timeout=timeout, log_file=log_file, env=env)
        finally:
            shutil.rmtree(empty, ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a case's runs: a failed run's row if any failed, else the run with the median
    first call (the lower middle one of an even count), with every run's first call. Where each
    run timed its steady latency (not a size sweep), also every run's median latency
    (``latency_ms_median_runs``) and their median (``latency_ms_median_of_runs``): per call
    latency moves from process to process by more than it moves within one."""
    if len(runs) == 1:
        return runs[0]
    for i, run in enumerate(runs, start=1):
        if run.get("status") != "ok":
            return {**run, "error": f"run {i} of {len(runs)}: {run.get('error', '')}"}
    median = sorted(runs, key=lambda r: r["first_call_s"])[(len(runs) - 1) // 2]
    row = {**median, "first_call_s_runs": [r["first_call_s"] for r in runs]}
    latencies = [r.get("latency_ms_median") for r in runs]
    if None not in latencies:
        row["latency_ms_median_runs"] = latencies
        row["latency_ms_median_of_runs"] = statistics.median(latencies)
    return row


def expand(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one case: one per size called for a size sweep (in call order), else the row.

    A sweep row's per-size rows hold that size's fields (``size``, ``call_order``, first and
    second call, latency, rel err, trt_subgraph's compilations at that size) and the case's
    (status, error, ``first_call_s_sum``: the sum of first calls, the sweep's trt_subgraph
    totals); ``sizes`` holds the size called. A sweep case that failed before its first size is
    one row with ``size`` None."""
    if "dim" not in row:
        return [row]
    base = {k: v for k, v in row.items() if k not in ("per_size", "first_call_s", "first_call_s_runs")}
    if "first_call_s" in row:
        base["first_call_s_sum"] = row["first_call_s"]
    if "first_call_s_runs" in row:
        base["first_call_s_sum_runs"] = row["first_call_s_runs"]
    entries = row.get("per_size") or []
    if not entries:
        return [{**base, "size": None}]
    return [{**base, **e, "sizes": {**(row.get("sizes") or {}), row["dim"]: e["size"]}} for e in entries]


def run_sweep(cfg: Config, stream: IO[str] | None = None) -> dict[str, Any]:
    """Run every case; returns {"meta": ..., "results": [rows]}.

    With cfg.out, the outputs are rewritten after every case, so a sweep that is killed (e.g. by
    a time limit) keeps what it finished; rerun the rest with --append.
    """
    stream = sys.stderr if stream is None else stream
    previous = None
    if cfg.append and cfg.out is not None and (cfg.out / "results.json").exists():
        previous = _earlier_results(cfg.out / "results.json")
        check_appendable(previous["meta"]["config"], _config_dict(cfg))  # before hours of work
    started = datetime.datetime.now(datetime.timezone.utc)
    meta: dict[str, Any] = {
        "commands": [cfg.command] if cfg.command else [],
        "machine": None,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
        "config": _config_dict(cfg),
    }
    samples: dict[int, list[dict[str, Any]]] = {}
    env, meta["bytecode"] = prepare_bytecode(cfg.bytecode, cfg.models, stream)

    def current() -> dict[str, Any]:
        data = {"meta": meta, "results": [r for i in sorted(samples) for r in expand(combine(samples[i]))]}
        return merge(previous, data) if previous else data

    for index, row in _iter_runs(cfg, cases(cfg), stream, env):
        samples.setdefault(index, []).append(row)
        meta["machine"] = meta["machine"] or row.get("machine")
        meta["duration_s"] = round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)
        if cfg.out is not None:  # plots only at the end: they take a while
            output.write_all(current(), cfg.out, with_plots=False)
    if meta["machine"] is None:
        from trt_subgraph.bench._case import machine_name

        meta["machine"] = machine_name("cpu") if cfg.device == "cpu" else cfg.device
    data = current()
    if cfg.out is not None:
        written = output.write_all(data, cfg.out)
        stream.write("wrote " + ", ".join(str(p) for p in written) + "\n")
    return data


def _config_dict(cfg: Config) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def _earlier_results(path: Path) -> dict[str, Any]:
    """The results file that --append adds to; ValueError when it is not one this tool wrote."""
    try:
        data = json.loads(path.read_text())
        meta, rows = data["meta"], data["results"]
        if (
            isinstance(meta["config"], dict)
            and isinstance(meta["config"]["models"], list)
            and isinstance(meta.get("commands", []), list)
            and isinstance(rows, list)
            and all(isinstance(r, dict) and {"model", "backend"} <= r.keys() for r in rows)
        ):
            return data
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--append: {path} is not a results file of this tool ({type(e).__name__}: {e})") from None
    raise ValueError(
        f"--append: {path} is not a results file of this tool (it needs meta.config.models, and results "
        "rows with model and backend)"
    )


def check_appendable(old: dict[str, Any], new: dict[str, Any]) -> None:
    """Rows of one results file must be comparable: same device, dtype and timing settings."""
    absent = {"runs": 1, "dynamic": False}  # what files from before these settings had
    keys = ("device", "dtype", "warmup", "repeats", "runs", "sparse", "trt_options", "seed")
    keys += ("dynamic", "batches", "seqs")  # a size sweep's call order shapes its first calls
    for key in keys:
        before, now = old.get(key, absent.get(key)), new.get(key, absent.get(key))
        if before != now:
            raise ValueError(
                f"--append: {key} differs from the results in the --out folder "
                f"({before!r} there, {now!r} now); use another --out"
            )


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["model"], str(row.get("depth")), row["backend"], row.get("variant", "cold"), row.get("size"))


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Results of an earlier run in the same --out folder plus a new run (--append): the new rows
    replace old rows of the same model, depth, backend and variant; meta is the new run's, with
    the commands of both. Lets a long sweep run as several shorter commands."""
    oc, nc = old["meta"]["config"], new["meta"]["config"]
    check_appendable(oc, nc)
    rows = {_row_key(r): r for r in old["results"]}
    rows.update({_row_key(r): r for r in new["results"]})
    meta = dict(new["meta"])
    meta["commands"] = list(dict.fromkeys(old["meta"].get("commands", []) + new["meta"]["commands"]))
    meta["config"] = {
        **nc,
        "models": list(dict.fromkeys(oc["models"] + nc["models"])),
        "backends": list(dict.fromkeys(oc["backends"] + nc["backends"])),
    }
    models = {m: i for i, m in enumerate(meta["config"]["models"])}
    backends = {b: i for i, b in enumerate(meta["config"]["backends"])}

    def order(r: dict[str, Any]) -> tuple:
        d = r.get("depth")
        return (
            models.get(r["model"], len(models)),
            (0, d, "") if isinstance(d, int) else (1, 0, str(d)),
            backends.get(r["backend"], len(backends)),
            ("cold", "warm", "saved").index(r.get("variant", "cold")),
            r.get("call_order", 0),
        )

    return {"meta": meta, "results": sorted(rows.values(), key=order)}
