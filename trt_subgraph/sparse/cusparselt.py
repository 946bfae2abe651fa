"""2:4-sparse linears on cuSPARSELt with plans built once, through ctypes.

Why not ``torch._cslt_sparse_mm``: it creates the descriptors, the algorithm selection and the
plan on every call and destroys them after. With a row-major result (what ``F.linear`` returns)
the algorithm selection alone takes about 0.3 s per call (H100, cuSPARSELt 0.8); with the
column-major result it costs about 1 ms per call, and the kernels that read that layout lose
more than the sparse product gains (benchmarks/RESULTS.md). Here the selection is made
once per shape and layout, and a plan once per algorithm, so a call is one ``cusparseLtMatmul``
on the current stream (capturable in a CUDA graph).

Inputs are the buffers ``torch._cslt_compress`` makes; the descriptors are the ones PyTorch's
``_cslt_sparse_mm`` uses with ``transpose_result=True`` (results bit-identical on an H100).
API: ``cusparseLt.h`` 0.7 to 0.10 (same enums and signatures; opaque structs 512 bytes from 0.8,
1024 before; 4096 are reserved).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import torch

__all__ = ["DTYPES", "Selection", "linear", "load_error", "selection"]

_SUCCESS = 0
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_N, _OP_T = 0, 1
_COMPUTE_32F = 2
_SPARSITY_50 = 0
_ALG_DEFAULT = 0
_ALG_CONFIG_ID, _ALG_CONFIG_MAX_ID = 0, 1
_DATA_TYPES = {torch.float16: 2, torch.bfloat16: 14}  # cudaDataType CUDA_R_16F, CUDA_R_16BF
DTYPES = tuple(_DATA_TYPES)  # what the sparse operand (and x) may be
_OPAQUE_BYTES = 4096

_lock = threading.RLock()
_lib: Any = None
_load_failure: str | None = None


def _declare(lib: Any) -> None:
    p, i64, u32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int
    signatures = {
        "cusparseLtInit": [p],
        "cusparseLtStructuredDescriptorInit": [p, p, i64, i64, i64, u32, i32, i32, i32],
        "cusparseLtDenseDescriptorInit": [p, p, i64, i64, i64, u32, i32, i32],
        "cusparseLtMatmulDescriptorInit": [p, p, i32, i32, p, p, p, p, i32],
        "cusparseLtMatmulAlgSelectionInit": [p, p, p, i32],
        "cusparseLtMatmulAlgSetAttribute": [p, p, i32, p, ctypes.c_size_t],
        "cusparseLtMatmulAlgGetAttribute": [p, p, i32, p, ctypes.c_size_t],
        "cusparseLtMatmulPlanInit": [p, p, p, p],
        "cusparseLtMatmulGetWorkspace": [p, p, ctypes.POINTER(ctypes.c_size_t)],
        "cusparseLtMatmul": [p, p, p, p, p, p, p, p, p, p, ctypes.c_int32],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int


def _library() -> Any:
    """The libcusparseLt that torch loaded (found by soname, then in /proc/self/maps)."""
    global _lib, _load_failure
    with _lock:
        if _lib is None and _load_failure is None:
            candidates = ["libcusparseLt.so.0"]
            try:
                with open("/proc/self/maps") as maps:
                    candidates += sorted({line.split()[-1] for line in maps if "libcusparseLt" in line})
            except OSError:
                pass
            errors = []
            for path in candidates:
                try:
                    lib = ctypes.CDLL(path)
                    _declare(lib)
                except (OSError, AttributeError) as exc:
                    errors.append(f"{path}: {exc}")
                    continue
                _lib = lib
                break
            else:
                _load_failure = "; ".join(errors)
        if _lib is None:
            raise RuntimeError(f"libcusparseLt could not be loaded ({_load_failure})")
        return _lib


def load_error() -> str | None:
    """None when the library can be used, else why not."""
    try:
        _library()
    except RuntimeError as exc:
        return str(exc)
    return None


def _check(status: int, what: str) -> None:
    if status != _SUCCESS:
        raise RuntimeError(f"cuSPARSELt {what} failed with status {status}")


class _Opaque:
    """A zeroed, 64-byte-aligned buffer for one opaque cuSPARSELt struct, never moved."""

    def __init__(self) -> None:
        self._buffer = ctypes.create_string_buffer(_OPAQUE_BYTES + 64)
        self.ptr = ctypes.c_void_p((ctypes.addressof(self._buffer) + 63) & ~63)


_handles: dict[int, _Opaque] = {}


def _handle(device: int) -> _Opaque:
    with _lock:
        if device not in _handles:
            handle = _Opaque()
            with torch.cuda.device(device):
                _check(_library().cusparseLtInit(handle.ptr), "cusparseLtInit")
            _handles[device] = handle
        return _handles[device]


class Selection:
    """y (M x N, row-major) = x (M x K) @ W.T for one (device, dtype, N, K, M, layout of x).

    Holds the descriptors and the algorithm selection (the slow part, made once) and one plan
    with its workspace per algorithm id used. Never freed: a CUDA graph may hold a workspace.
    """

    def __init__(self, device: int, dtype: torch.dtype, n: int, k: int, m: int, x_row_major: bool) -> None:
        self.lib = lib = _library()
        self.handle = _handle(device)
        self.device, self.n, self.m = device, n, m
        h, value_type = self.handle.ptr, _DATA_TYPES[dtype]
        self.sparse, self.dense, self.out = _Opaque(), _Opaque(), _Opaque()
        self.matmul, self.algorithms = _Opaque(), _Opaque()
        self.plans: dict[int, tuple[_Opaque, torch.Tensor | None]] = {}
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.streams = (ctypes.c_void_p * 1)()
        with torch.cuda.device(device):
            _check(
                lib.cusparseLtStructuredDescriptorInit(
                    h, self.sparse.ptr, n, k, k, 16, value_type, _ORDER_ROW, _SPARSITY_50
                ),
                "StructuredDescriptorInit",
            )
            if x_row_major:  # B = x.T of a row-major (M, K) x
                b_rows, b_cols, op_b = m, k, _OP_T
            else:  # B = x.T is itself row-major (K, M)
                b_rows, b_cols, op_b = k, m, _OP_N
            _check(
                lib.cusparseLtDenseDescriptorInit(
                    h, self.dense.ptr, b_rows, b_cols, b_cols, 16, value_type, _ORDER_ROW
                ),
                "DenseDescriptorInit",
            )
            # D = W @ x.T is (N, M); column-major with leading dimension N, it is y row-major.
            _check(
                lib.cusparseLtDenseDescriptorInit(h, self.out.ptr, n, m, n, 16, value_type, _ORDER_COL),
                "DenseDescriptorInit",
            )
            _check(
                lib.cusparseLtMatmulDescriptorInit(
                    h,
                    self.matmul.ptr,
                    _OP_N,
                    op_b,
                    self.sparse.ptr,
                    self.dense.ptr,
                    self.out.ptr,
                    self.out.ptr,
                    _COMPUTE_32F,
                ),
                "MatmulDescriptorInit",
            )
            _check(
                lib.cusparseLtMatmulAlgSelectionInit(h, self.algorithms.ptr, self.matmul.ptr, _ALG_DEFAULT),
                "MatmulAlgSelectionInit",
            )
            max_id = ctypes.c_int(0)
            _check(
                lib.cusparseLtMatmulAlgGetAttribute(
                    h, self.algorithms.ptr, _ALG_CONFIG_MAX_ID, ctypes.byref(max_id), ctypes.sizeof(max_id)
                ),
                "MatmulAlgGetAttribute(CONFIG_MAX_ID)",
            )
        self.max_algorithm = max_id.value

    def _plan(self, algorithm: int) -> tuple[_Opaque, torch.Tensor | None]:
        if algorithm in self.plans:  # every call after the first: no lock
            return self.plans[algorithm]
        with _lock:
            if algorithm not in self.plans:
                lib, h, plan = self.lib, self.handle.ptr, _Opaque()
                chosen = ctypes.c_int(algorithm)
                _check(
                    lib.cusparseLtMatmulAlgSetAttribute(
                        h, self.algorithms.ptr, _ALG_CONFIG_ID, ctypes.byref(chosen), ctypes.sizeof(chosen)
                    ),
                    f"MatmulAlgSetAttribute(CONFIG_ID={algorithm})",
                )
                _check(
                    lib.cusparseLtMatmulPlanInit(h, plan.ptr, self.matmul.ptr, self.algorithms.ptr),
                    f"MatmulPlanInit(algorithm {algorithm})",
                )
                size = ctypes.c_size_t(0)
                _check(lib.cusparseLtMatmulGetWorkspace(h, plan.ptr, ctypes.byref(size)), "MatmulGetWorkspace")
                workspace = (
                    torch.empty(size.value, dtype=torch.uint8, device=torch.device("cuda", self.device))
                    if size.value
                    else None
                )
                self.plans[algorithm] = (plan, workspace)
            return self.plans[algorithm]

    def __call__(self, compressed: torch.Tensor, x2: torch.Tensor, algorithm: int) -> torch.Tensor:
        plan, workspace = self._plan(algorithm)
        y = x2.new_empty((self.m, self.n))
        self.streams[0] = torch.cuda.current_stream(x2.device).cuda_stream
        _check(
            self.lib.cusparseLtMatmul(
                self.handle.ptr,
                plan.ptr,
                ctypes.byref(self.alpha),
                compressed.data_ptr(),
                x2.data_ptr(),
                ctypes.byref(self.beta),
                y.data_ptr(),
                y.data_ptr(),
                workspace.data_ptr() if workspace is not None else None,
                self.streams,
                1,
            ),
            "Matmul",
        )
        return y


_selections: dict[tuple, Selection] = {}


def selection(x2: torch.Tensor, n: int, k: int) -> Selection:
    """The (cached) selection for ``x2 @ W.T`` with W of shape (n, k); x2 is 2-D, row- or
    column-major."""
    x_row_major = x2.stride(1) == 1
    device = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    key = (device, x2.dtype, n, k, x2.shape[0], x_row_major)
    if key in _selections:  # every call after the first: no lock
        return _selections[key]
    with _lock:
        if key not in _selections:
            _selections[key] = Selection(*key)
        return _selections[key]


def linear(compressed: torch.Tensor, weight_shape: tuple[int, int], x2: torch.Tensor, algorithm: int) -> torch.Tensor:
    """``x2 @ W.T`` (row-major, x2's dtype) for the 2:4 weight W whose ``torch._cslt_compress``
    form is `compressed`."""
    n, k = weight_shape
    return selection(x2, n, k)(compressed, x2, algorithm)
