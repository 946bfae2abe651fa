"""The inductor engine: one inductor compilation per unique subgraph, weights as runtime inputs.

Weights stay graph inputs, so one compiled artifact serves every instance and is never stale:
each call reads whatever the instance's parameters hold now. Artifacts persist through
``standalone_compile``'s binary format; from torch 2.10 they are AOTCompiledArtifacts
(``aot=True``), which load in memory, several at once. A subgraph with symbolic sizes compiles
once for every size in its range, on size symbols of its own (`trt_subgraph.symbolic`). An
artifact carries the compiled libraries of its C++ (CPU) kernels, so loading it compiles none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

from .. import _compat, symbolic
from .._state import warn_once
from ..cache import make_key
from ..sparse import runtime as sparse_runtime
from ..sparse.analysis import analyze_weight
from .base import CanonicalSubgraph, Engine, device_types

log = logging.getLogger(__name__)


class InductorEngine(Engine):
    name = "inductor"
    persistable = True
    builds_in_workers = True
    keeps_layout = True  # compiled for the example inputs' strides; outputs keep the graph's strides
    sparse_weights = True
    supports_sparse_linears = True
    _disk: Any = None  # the disk cache of :meth:`attach_disk_cache`

    def __init__(self, *, torch_executed_ops: frozenset[str] = frozenset(), sparse: bool = False) -> None:
        super().__init__(torch_executed_ops=torch_executed_ops)
        self.sparse = sparse

    def weight_variant(self, weight: torch.Tensor) -> str | None:
        """Whether a linear weight, or a 1x1 convolution's, is 2:4 where cuSPARSELt runs: the
        pipeline then may route it there."""
        linear = weight.dim() == 2 or (weight.dim() >= 3 and all(k == 1 for k in weight.shape[2:]))
        if not self.sparse or not linear or weight.dtype not in sparse_runtime.CSLT_DTYPES:
            return None
        if sparse_runtime.unavailable_reason(weight.device) is not None:
            return None
        return "2:4" if analyze_weight(weight.reshape(weight.shape[0], -1), kind="linear").pattern_ok else "dense"

    def codegen_key(self, sub: CanonicalSubgraph) -> dict[str, Any]:
        """CPU kernels are generated for one vector ISA and compiled by the local C++ compiler;
        GPU kernels by Triton (the GPU's compute capability is in the device key already). The
        generated code sets the CUDA device by index (``torch.cuda.set_device(0)``), so an
        artifact built on one GPU runs wrong on another: the indexes are part of the key."""
        devices = device_types(sub.example_inputs)
        key: dict[str, Any] = {}
        if "cpu" in devices:
            _restore_vec_isa_checks(self._disk)
            key["cpu"] = _compat.cpu_codegen_key()
        if "cuda" in devices:
            indexes = {
                v.device.index if v.device.index is not None else torch.cuda.current_device()
                for v in sub.example_inputs
                if isinstance(v, torch.Tensor) and v.device.type == "cuda"
            }
            key["cuda"] = {"cuda": torch.version.cuda, "triton": _version_of("triton"), "indexes": sorted(indexes)}
        return key

    def settings(self) -> dict[str, Any]:
        """Inductor's config, and that Triton kernels autotune at their first run
        (`trt_subgraph._compat.standalone_compile`): artifacts tuned during the compile are not reused."""
        return {"engine": self.name, "inductor_config": _compat.inductor_config_key(), "triton_autotune": "first run"}

    def start_setup(self, device_types: list[str]) -> None:
        """Inductor's and Triton's source hashes and Triton's driver (`_compat.start_inductor_setup`)."""
        _compat.start_inductor_setup(cuda="cuda" in device_types)

    def saved_extras(self, device_types: list[str]) -> Any:
        """For graphs with CPU subgraphs, inductor's vector-ISA check programs: a load with an
        empty inductor cache then compiles none of them (:func:`saved_vec_isa_checks`)."""
        return saved_vec_isa_checks() if "cpu" in device_types else None

    def restore_saved_extras(self, extras: Any) -> None:
        restore_saved_vec_isa_checks(extras)

    def loads_concurrently(self) -> bool:
        """Loads are thread-safe: AOTCompiledArtifacts (torch >= 2.10) load in memory at once,
        artifacts of the older format one at a time (`trt_subgraph._compat.load_compiled_artifact`)."""
        return True

    def loading(self) -> Any:
        return _compat.loading_artifacts()

    def attach_disk_cache(self, disk: Any) -> None:
        """Keep inductor's vector-ISA check programs in `disk` (see :func:`_restore_vec_isa_checks`)."""
        self._disk = disk

    def __getstate__(self) -> dict[str, Any]:  # a worker process gets the engine without the cache
        return {**self.__dict__, "_disk": None}

    def build(self, sub: CanonicalSubgraph, weights: list[torch.Tensor]) -> Any:
        """The compiled artifact (see :meth:`_compile`); the libraries of the C++ kernels it
        calls are kept with it (:func:`_cpu_kernels_section`)."""
        with _compat.recording_cpu_kernels() as kernels:
            artifact = self._compile(sub)
        _keep_cpu_kernels(artifact.compiled if isinstance(artifact, Guarded) else artifact, kernels)
        return artifact

    def _compile(self, sub: CanonicalSubgraph) -> Any:
        """The compiled artifact; for symbolic sizes, compiled on a ShapeEnv of its own (see
        `trt_subgraph.symbolic`), as a :class:`Guarded` when the compile assumed more about the
        sizes than their ranges and relations."""
        if not symbolic.is_symbolic(sub.example_inputs):
            return _compat.standalone_compile(sub.gm, sub.example_inputs)
        detached = symbolic.detach(sub.example_inputs)
        compiled = _compat.standalone_compile(sub.gm, detached.inputs, fake_mode=detached.fake_mode)
        guards = detached.added_guards()
        return compiled if guards is None else Guarded(compiled, guards)

    def serialize(self, artifact: Any) -> bytes | None:
        compiled, guards = (artifact.compiled, artifact.guards) if isinstance(artifact, Guarded) else (artifact, None)
        with tempfile.TemporaryDirectory(prefix="trt_subgraph_") as tmp:
            path = os.path.join(tmp, "artifact.bin")
            compiled.save(path=path, format="binary")
            with open(path, "rb") as f:
                blob = _cpu_kernels_section(compiled) + f.read()
        if guards is None:
            return blob
        text = guards.encode()
        return _GUARDS_HEADER + len(text).to_bytes(8, "little") + text + blob

    def deserialize(self, payload: bytes, sub: CanonicalSubgraph) -> Any:
        guards = None
        if payload.startswith(_GUARDS_HEADER):
            start = len(_GUARDS_HEADER) + 8
            end = start + int.from_bytes(payload[len(_GUARDS_HEADER) : start], "little")
            if end > len(payload):
                raise ValueError("the guards section runs past the end of the payload")
            guards, payload = payload[start:end].decode(), payload[end:]
        compiled = _load_with_cpu_kernels(payload)
        return compiled if guards is None else Guarded(compiled, guards)

    def bind(self, artifact: Any, sub: CanonicalSubgraph) -> Callable[..., tuple]:
        return GuardedRunner(artifact, sub) if isinstance(artifact, Guarded) else artifact


# A cache payload that starts with this holds the guards (8-byte length, UTF-8) before the rest.
# Inductor's binary format starts with an 8-byte length, so the two never look alike.
_GUARDS_HEADER = b"trt_subgraph guards "
# Then, where the artifact calls C++ kernels, this, an 8-byte length and the kernels' libraries
# (:func:`_pack_files`), before inductor's bytes.
_CPU_KERNELS_HEADER = b"trt_subgraph cpu kernels "
# The libraries of the C++ kernels that each artifact built or loaded here calls.
_CPU_KERNELS: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()
_VEC_ISA_LOCK = threading.Lock()
_VEC_ISA_TRIED = False
_VEC_ISA_CHECKS: bytes | None = None  # the check programs this process restored or built (packed)


def _cpu_kernels_section(compiled: Any) -> bytes:
    """The payload section with the libraries of `compiled`'s C++ kernels; empty when it calls
    none (GPU artifacts) or they are gone from inductor's cache directory."""
    files: dict[str, bytes] = {}
    try:
        paths = _CPU_KERNELS.get(compiled, ())
    except TypeError:  # an artifact without weak references: never kept
        paths = ()
    for path in paths:
        try:
            with open(path, "rb") as f:
                files[_compat.inductor_file_name(path)] = f.read()
        except OSError as exc:
            log.info("trt_subgraph: kernel library %s not kept with its artifact (%s); a load compiles it", path, exc)
    if not files:
        return b""
    packed = _pack_files(files)
    return _CPU_KERNELS_HEADER + len(packed).to_bytes(8, "little") + packed


def _keep_cpu_kernels(compiled: Any, paths: list[str]) -> None:
    if paths:
        with contextlib.suppress(TypeError):  # an artifact without weak references: loads compile
            _CPU_KERNELS[compiled] = paths


def _load_with_cpu_kernels(payload: bytes) -> Any:
    """Load an artifact whose payload may start with a :func:`_cpu_kernels_section`: the
    libraries go back into inductor's cache directory first, so the load compiles no kernel
    (and, with them there, precompiles no header either)."""
    restored = payload.startswith(_CPU_KERNELS_HEADER)
    if restored:
        start = len(_CPU_KERNELS_HEADER) + 8
        end = start + int.from_bytes(payload[len(_CPU_KERNELS_HEADER) : start], "little")
        if end > len(payload):
            raise ValueError("the kernel libraries section runs past the end of the payload")
        _compat.restore_inductor_files(_unpack_files(payload[start:end]))
        payload = payload[end:]
    headers = _compat.without_header_precompiling() if restored else contextlib.nullcontext()
    with _compat.recording_cpu_kernels() as kernels, headers:
        compiled = _load(payload)
    _keep_cpu_kernels(compiled, kernels)
    return compiled


def _pack_files(files: dict[str, bytes]) -> bytes:
    """Named files as bytes: for each, its UTF-8 name and its contents, each after its length
    (2 and 8 bytes, little-endian)."""
    out = bytearray()
    for name, data in sorted(files.items()):
        raw = name.encode()
        out += len(raw).to_bytes(2, "little") + raw + len(data).to_bytes(8, "little") + data
    return bytes(out)


def _unpack_files(packed: bytes) -> dict[str, bytes]:
    """The files of :func:`_pack_files`; ValueError when the bytes are not such."""
    files: dict[str, bytes] = {}
    at = 0
    while at < len(packed):
        size = int.from_bytes(packed[at : at + 2], "little")
        name, at = packed[at + 2 : at + 2 + size].decode(), at + 2 + size
        length = int.from_bytes(packed[at : at + 8], "little")
        data, at = packed[at + 8 : at + 8 + length], at + 8 + length
        if at > len(packed):
            raise ValueError("packed files end in the middle of a file")
        files[name] = data
    return files


def _restore_vec_isa_checks(disk: Any) -> None:
    """Before inductor first picks its CPU vector ISA in this process, put back the check
    programs an earlier process kept in the disk cache `disk` (one small library per candidate
    ISA, which the pick would otherwise compile: with an empty inductor cache, at every start),
    or keep this process's there when none are kept. They are keyed by what names them in
    inductor's cache (compiler, torch version); the pick still loads each in a child process.
    Either way they stay in memory too, for :func:`saved_vec_isa_checks`. Tried once per
    process; a failure costs only those compiles."""
    global _VEC_ISA_TRIED, _VEC_ISA_CHECKS
    with _VEC_ISA_LOCK:
        if _VEC_ISA_TRIED or _compat.vec_isa_picked():
            return
        _VEC_ISA_TRIED = True
        try:
            key = _vec_isa_checks_key()
            payload = disk.get(key) if disk is not None else None
            if payload is not None:
                _compat.restore_inductor_files(_unpack_files(payload))
                _VEC_ISA_CHECKS = payload
                return
            files = {}
            for path in _compat.pick_vec_isa_recording_checks():
                with open(path, "rb") as f:
                    files[_compat.inductor_file_name(path)] = f.read()
            if files:
                _VEC_ISA_CHECKS = _pack_files(files)
            if files and disk is not None:
                meta = {"engine": "inductor", "versions": {"torch": torch.__version__}, "info": {"kind": "ISA checks"}}
                disk.put(key, _VEC_ISA_CHECKS, meta)
        except Exception as exc:
            log.warning("trt_subgraph: inductor's vector-ISA checks were not restored or kept (%s)", exc)


def _vec_isa_checks_key() -> str:
    return make_key({"kind": "inductor vector-ISA checks", **_compat.vec_isa_checks_key()})


def saved_vec_isa_checks() -> dict[str, Any] | None:
    """The vector-ISA check programs of this process (see :func:`_restore_vec_isa_checks`) for
    a saved function to carry, with their key; None when this process has none."""
    if _VEC_ISA_CHECKS is None:
        return None
    try:
        return {"key": _vec_isa_checks_key(), "files": _VEC_ISA_CHECKS}
    except Exception as exc:
        log.info("trt_subgraph: a saved function holds no vector-ISA checks (%s)", exc)
        return None


def restore_saved_vec_isa_checks(saved: Any) -> None:
    """Put the check programs a saved function carries (:func:`saved_vec_isa_checks`) into
    inductor's cache before inductor picks its vector ISA in this process, where their key is
    this process's (else the pick compiles its own). The pick still loads each in a child
    process: the verdict stays this machine's. A failure costs only those compiles."""
    if not isinstance(saved, dict):
        return
    with _VEC_ISA_LOCK:
        try:
            if _compat.vec_isa_picked() or saved.get("key") != _vec_isa_checks_key():
                return
            _compat.restore_inductor_files(_unpack_files(saved["files"]))
        except Exception as exc:
            log.warning("trt_subgraph: the saved vector-ISA checks were not restored (%s)", exc)


@dataclasses.dataclass
class Guarded:
    """An artifact compiled for symbolic sizes that is valid only where `guards` holds: a Python
    expression over the inputs (see `trt_subgraph.symbolic.Detached.added_guards`)."""

    compiled: Any
    guards: str


class GuardedRunner:
    """Runs a :class:`Guarded` artifact where its guards hold and the canonical subgraph in
    PyTorch elsewhere (warned once per fingerprint): correct for every size in range. Each
    input size it runs in PyTorch counts once in the ``outside_guards`` of the report entries
    it was shown (:meth:`watch`)."""

    def __init__(self, artifact: Guarded, sub: CanonicalSubgraph) -> None:
        self.compiled = artifact.compiled
        self.guards = artifact.guards
        self.check = _compat.guards_checker(artifact.guards)
        self.canonical = sub.gm
        self.fingerprint = sub.fingerprint
        self.records: list[Any] = []
        self.outside: set[str] = set()

    def watch(self, record: Any) -> None:
        if all(r is not record for r in self.records):  # every instance of a block shows the same record
            self.records.append(record)

    def __call__(self, *args: Any) -> Any:
        if self.check(list(args)):
            return self.compiled(*args)
        sizes = ", ".join("x".join(map(str, a.shape)) if isinstance(a, torch.Tensor) else str(a) for a in args)
        if sizes not in self.outside:
            self.outside.add(sizes)
            for entries in {id(r.outside_guards): r.outside_guards for r in self.records}.values():
                entries.append(sizes)  # records may share one list (a graph's report merges regions')
        warn_once(
            log,
            ("guards", self.fingerprint),
            "trt_subgraph: subgraph %s was compiled for sizes where %s; these inputs are outside it, "
            "so it runs in PyTorch for them",
            self.fingerprint,
            self.guards,
        )
        return self.canonical(*args)


def _load(payload: bytes) -> Any:
    """Load a saved artifact from its bytes. Where the system has anonymous files (Linux), from
    one of those, which nothing outlives: a process killed while loading leaves no temporary
    directory behind."""
    if hasattr(os, "memfd_create"):
        with os.fdopen(os.memfd_create("trt_subgraph_artifact", os.MFD_CLOEXEC), "wb") as f:
            f.write(payload)
            f.flush()
            return _compat.load_compiled_artifact(f"/proc/self/fd/{f.fileno()}")
    with tempfile.TemporaryDirectory(prefix="trt_subgraph_") as tmp:
        path = os.path.join(tmp, "artifact.bin")
        with open(path, "wb") as f:
            f.write(payload)
        return _compat.load_compiled_artifact(path)


def _version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
