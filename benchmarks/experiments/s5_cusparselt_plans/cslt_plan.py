"""Cached-plan cuSPARSELt sparse matmul through ctypes (prototype).

Computes the same thing as
    torch._cslt_sparse_mm(compressed, dense_b, transpose_result=..., alg_id=...)
(no bias, no alpha, no split-k) for fp16 / bf16 / fp32 inputs, but builds the
cuSPARSELt descriptors, algorithm selection and plan ONCE per
(device, dtype, N, K, M, B order, result order, alg_id) and keeps them (and a
workspace tensor) alive for the life of the cache.  Each call then only does
cusparseLtMatmul on torch.cuda.current_stream(), so it can be captured into a
CUDA graph.

API source: cusparseLt.h of the pip wheels
    nvidia-cusparselt-cu13 0.8.0   (CUSPARSELT_VER 0.8.0 build 4)  <- torch 2.11 cu130
    nvidia-cusparselt-cu12 0.7.1   (identical enums/signatures, structs 1024 B,
                                    no cusparseLtMatmulAlgSelectionDestroy)
    nvidia-cusparselt-cu13 0.10.0  (identical to 0.8.0 apart from version macros)
Enum values of cusparseOrder_t / cusparseOperation_t / cusparseStatus_t come from
cusparse.h (also in the wheel's cusparseLt_cusparse_stub.h); cudaDataType from
CUDA 13.0 library_types.h.

Descriptor setup mirrors aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp
(_cslt_sparse_mm_impl), torch terms m = N (rows of W), k = K, n = M:
    A (compressed W): Structured, rows=N cols=K ld=K align 16, ROW, 50%, opA=N
    B contiguous K x M: Dense rows=K cols=M ld=M, ROW, opB=N
    B = x.t() (x: M x K contiguous): Dense rows=M cols=K ld=K, ROW, opB=T
    C = D, transpose_result=False: rows=N cols=M ld=M ROW   -> tensor (N, M)
    C = D, transpose_result=True:  rows=N cols=M ld=N COL   -> tensor (M, N)
    compute CUSPARSE_COMPUTE_32F (fp16/bf16/fp32), alpha=1.0f, beta=0.0f (host),
    CONFIG_ID = alg_id set on the alg selection, split_k left at default.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
import time
import warnings

import torch

# --------------------------------------------------------------------------
# Constants (see module docstring for sources)
# --------------------------------------------------------------------------
# cusparseStatus_t (cusparse.h)
CUSPARSE_STATUS_SUCCESS = 0
_STATUS_NAMES = {
    0: "CUSPARSE_STATUS_SUCCESS",
    1: "CUSPARSE_STATUS_NOT_INITIALIZED",
    2: "CUSPARSE_STATUS_ALLOC_FAILED",
    3: "CUSPARSE_STATUS_INVALID_VALUE",
    4: "CUSPARSE_STATUS_ARCH_MISMATCH",
    5: "CUSPARSE_STATUS_MAPPING_ERROR",
    6: "CUSPARSE_STATUS_EXECUTION_FAILED",
    7: "CUSPARSE_STATUS_INTERNAL_ERROR",
    8: "CUSPARSE_STATUS_MATRIX_TYPE_NOT_SUPPORTED",
    9: "CUSPARSE_STATUS_ZERO_PIVOT",
    10: "CUSPARSE_STATUS_NOT_SUPPORTED",
    11: "CUSPARSE_STATUS_INSUFFICIENT_RESOURCES",
}
# cusparseOrder_t (cusparse.h)
CUSPARSE_ORDER_COL = 1
CUSPARSE_ORDER_ROW = 2
# cusparseOperation_t (cusparse.h)
CUSPARSE_OPERATION_NON_TRANSPOSE = 0
CUSPARSE_OPERATION_TRANSPOSE = 1
# cudaDataType (library_types.h)
CUDA_R_32F = 0
CUDA_R_16F = 2
CUDA_R_8I = 3
CUDA_R_32I = 10
CUDA_R_16BF = 14
CUDA_R_8F_E4M3 = 28
# cusparseComputeType (cusparseLt.h >= 0.5.2)
CUSPARSE_COMPUTE_32I = 0
CUSPARSE_COMPUTE_16F = 1
CUSPARSE_COMPUTE_32F = 2
# cusparseLtSparsity_t
CUSPARSELT_SPARSITY_50_PERCENT = 0
# cusparseLtMatmulAlg_t
CUSPARSELT_MATMUL_ALG_DEFAULT = 0
# cusparseLtMatmulAlgAttribute_t
CUSPARSELT_MATMUL_ALG_CONFIG_ID = 0
CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID = 1
CUSPARSELT_MATMUL_SEARCH_ITERATIONS = 2
CUSPARSELT_MATMUL_SPLIT_K = 3
CUSPARSELT_MATMUL_SPLIT_K_MODE = 4
CUSPARSELT_MATMUL_SPLIT_K_BUFFERS = 5
# cusparseLtMatmulDescAttribute_t (only the ones torch uses)
CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING = 5
CUSPARSELT_MATMUL_BIAS_POINTER = 8
# libraryPropertyType (library_types.h)
MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL = 0, 1, 2

# Opaque structs: header 0.8.0/0.10.0 says `struct { alignas(16) uint8_t data[512]; }`,
# header 0.7.1 says `struct { uint8_t data[1024]; }`.  We allocate 4096 bytes,
# 64-byte aligned, for each (handle, mat descriptors, matmul descriptor, alg
# selection, plan), so a mismatch in the library version cannot overflow.
OPAQUE_BYTES = 4096
_OPAQUE_ALIGN = 64

_DTYPES = {
    # torch dtype: (input/output cudaDataType, compute type)
    torch.float16: (CUDA_R_16F, CUSPARSE_COMPUTE_32F),
    torch.bfloat16: (CUDA_R_16BF, CUSPARSE_COMPUTE_32F),
    torch.float32: (CUDA_R_32F, CUSPARSE_COMPUTE_32F),
}

# --------------------------------------------------------------------------
# Library loading
# --------------------------------------------------------------------------
_lib = None
_lib_path = None
_lib_lock = threading.RLock()


def _maps_path():
    """Path of a libcusparseLt already mapped into this process, or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and "libcusparseLt" in parts[5]:
                    return parts[5].strip()
    except OSError:
        pass
    return None


def _candidate_paths():
    env = os.environ.get("CSLT_PLAN_LIB")
    if env:
        yield env
    p = _maps_path()
    if p:
        yield p
    yield "libcusparseLt.so.0"
    roots = []
    try:
        import site
        roots += site.getsitepackages()
        roots.append(site.getusersitepackages())
    except Exception:
        pass
    roots += [p for p in sys.path if p and os.path.isdir(p)]
    torch_dir = os.path.dirname(torch.__file__)
    roots.append(os.path.dirname(torch_dir))
    yield os.path.join(torch_dir, "lib", "libcusparseLt.so.0")
    seen = set()
    for r in roots:
        if r in seen:
            continue
        seen.add(r)
        for pat in ("nvidia/cusparselt/lib/libcusparseLt.so*",
                    "nvidia/cu*/lib/libcusparseLt.so*",
                    "nvidia/*/lib/libcusparseLt.so*",
                    "cusparselt/lib/libcusparseLt.so*"):
            for hit in sorted(glob.glob(os.path.join(r, pat))):
                yield hit


def _declare(lib):
    c_int, c_int64, c_uint32, c_size_t, c_void_p = (
        ctypes.c_int, ctypes.c_int64, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_void_p)
    sigs = {
        "cusparseLtInit": [c_void_p],
        "cusparseLtDestroy": [c_void_p],
        "cusparseLtGetVersion": [c_void_p, ctypes.POINTER(c_int)],
        "cusparseLtGetProperty": [c_int, ctypes.POINTER(c_int)],
        # handle, matDescr, rows, cols, ld, alignment, valueType, order
        "cusparseLtDenseDescriptorInit":
            [c_void_p, c_void_p, c_int64, c_int64, c_int64, c_uint32, c_int, c_int],
        # ... + sparsity
        "cusparseLtStructuredDescriptorInit":
            [c_void_p, c_void_p, c_int64, c_int64, c_int64, c_uint32, c_int, c_int, c_int],
        "cusparseLtMatDescriptorDestroy": [c_void_p],
        # handle, matmulDescr, opA, opB, matA, matB, matC, matD, computeType
        "cusparseLtMatmulDescriptorInit":
            [c_void_p, c_void_p, c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_int],
        "cusparseLtMatmulDescSetAttribute": [c_void_p, c_void_p, c_int, c_void_p, c_size_t],
        # handle, algSelection, matmulDescr, alg
        "cusparseLtMatmulAlgSelectionInit": [c_void_p, c_void_p, c_void_p, c_int],
        "cusparseLtMatmulAlgSetAttribute": [c_void_p, c_void_p, c_int, c_void_p, c_size_t],
        "cusparseLtMatmulAlgGetAttribute": [c_void_p, c_void_p, c_int, c_void_p, c_size_t],
        # handle, plan, matmulDescr, algSelection   (0.7 / 0.8: 4 arguments)
        "cusparseLtMatmulPlanInit": [c_void_p, c_void_p, c_void_p, c_void_p],
        "cusparseLtMatmulPlanDestroy": [c_void_p],
        "cusparseLtMatmulGetWorkspace": [c_void_p, c_void_p, ctypes.POINTER(c_size_t)],
        # handle, plan, alpha, dA, dB, beta, dC, dD, workspace, streams*, numStreams
        "cusparseLtMatmul": [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p,
                             c_void_p, c_void_p, c_void_p, c_void_p, ctypes.c_int32],
        # handle, sparseMatDescr, compressedSize*, compressedBufferSize*
        "cusparseLtSpMMACompressedSize2":
            [c_void_p, c_void_p, ctypes.POINTER(c_size_t), ctypes.POINTER(c_size_t)],
        # optional (0.8+ only in the exported symbols)
        "cusparseLtMatmulAlgSelectionDestroy": [c_void_p],
    }
    for name, argtypes in sigs.items():
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        fn.argtypes = argtypes
        fn.restype = c_int
    fn = getattr(lib, "cusparseLtGetErrorName", None)
    if fn is not None:
        fn.argtypes = [c_int]
        fn.restype = ctypes.c_char_p


def _load():
    global _lib, _lib_path
    with _lib_lock:
        if _lib is not None:
            return _lib
        if not torch.backends.cusparselt.is_available() and not os.environ.get("CSLT_PLAN_LIB"):
            raise RuntimeError("torch.backends.cusparselt.is_available() is False")
        # make sure torch's own copy is loaded / initialised first
        try:
            torch.backends.cusparselt.version()
        except Exception:
            pass
        errors = []
        for cand in _candidate_paths():
            try:
                lib = ctypes.CDLL(cand)
            except OSError as e:
                errors.append(f"{cand}: {e}")
                continue
            if getattr(lib, "cusparseLtMatmulPlanInit", None) is None:
                errors.append(f"{cand}: no cusparseLtMatmulPlanInit")
                continue
            _declare(lib)
            _lib = lib
            _lib_path = _maps_path() or cand
            return lib
        raise RuntimeError("could not load libcusparseLt: " + "; ".join(errors))


def lib_path():
    """Path of the libcusparseLt we use (from /proc/self/maps when possible)."""
    _load()
    return _lib_path


def lib_version():
    """(major, minor, patch) from cusparseLtGetProperty (no GPU needed)."""
    lib = _load()
    out = []
    for prop in (MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL):
        v = ctypes.c_int(-1)
        _check(lib.cusparseLtGetProperty(prop, ctypes.byref(v)), "cusparseLtGetProperty")
        out.append(v.value)
    return tuple(out)


def _status_name(status):
    name = _STATUS_NAMES.get(status)
    if _lib is not None and getattr(_lib, "cusparseLtGetErrorName", None) is not None:
        try:
            r = _lib.cusparseLtGetErrorName(status)
            if r:
                name = r.decode(errors="replace")
        except Exception:
            pass
    return name or "UNKNOWN"


def _check(status, fname):
    if status != CUSPARSE_STATUS_SUCCESS:
        raise RuntimeError(f"{fname} failed with status {status} ({_status_name(status)})")


class _Opaque:
    """A zeroed, 64-byte-aligned, never-moving buffer for one opaque cuSPARSELt struct."""
    __slots__ = ("_buf", "ptr")

    def __init__(self, nbytes=OPAQUE_BYTES):
        self._buf = ctypes.create_string_buffer(nbytes + _OPAQUE_ALIGN)
        base = ctypes.addressof(self._buf)
        self.ptr = ctypes.c_void_p((base + _OPAQUE_ALIGN - 1) & ~(_OPAQUE_ALIGN - 1))


# --------------------------------------------------------------------------
# Handles (one per device)
# --------------------------------------------------------------------------
_handles: dict = {}


def _handle(device_index):
    h = _handles.get(device_index)
    if h is not None:
        return h
    lib = _load()
    with _lib_lock:
        h = _handles.get(device_index)
        if h is None:
            h = _Opaque()
            with torch.cuda.device(device_index):
                _check(lib.cusparseLtInit(h.ptr), "cusparseLtInit")
            _handles[device_index] = h
    return h


def handle_version(device_index=None):
    """cusparseLtGetVersion on our handle (e.g. 800 for 0.8.0)."""
    if device_index is None:
        device_index = torch.cuda.current_device()
    h = _handle(device_index)
    v = ctypes.c_int(-1)
    _check(_lib.cusparseLtGetVersion(h.ptr, ctypes.byref(v)), "cusparseLtGetVersion")
    return v.value


# --------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------
class Plan:
    """All cuSPARSELt objects of one matmul configuration, kept at fixed addresses."""

    def __init__(self, device_index, dtype, n, k, m, b_row_major, result_col_major, alg_id):
        lib = _load()
        self.key = (device_index, dtype, n, k, m, b_row_major, result_col_major, alg_id)
        self.n, self.k, self.m = n, k, m
        self.dtype = dtype
        self.device_index = device_index
        self.b_row_major = b_row_major          # dense_b is K x M row-major (contiguous)
        self.result_col_major = result_col_major  # transpose_result
        self.alg_id = alg_id
        self.handle = _handle(device_index)
        self.sparse_desc = _Opaque()
        self.dense_desc = _Opaque()
        self.c_desc = _Opaque()
        self.d_desc = _Opaque()
        self.matmul_desc = _Opaque()
        self.alg_sel = _Opaque()
        self.plan = _Opaque()
        self.alpha = ctypes.c_float(1.0)
        self.beta = ctypes.c_float(0.0)
        self.stream_arr = (ctypes.c_void_p * 1)()
        self.init_times = {}
        self.max_alg_id = None
        self.warned = False
        self.compressed_size = None
        self.workspace_size = None
        self.workspace = None
        self._created = []  # what to destroy, in creation order
        vtype, ctype = _DTYPES[dtype]
        h = self.handle.ptr

        def timed(name, fn, *args):
            t0 = time.perf_counter()
            st = fn(*args)
            self.init_times[name] = self.init_times.get(name, 0.0) + time.perf_counter() - t0
            _check(st, name)

        try:
            with torch.cuda.device(device_index):
                timed("cusparseLtStructuredDescriptorInit", lib.cusparseLtStructuredDescriptorInit,
                      h, self.sparse_desc.ptr, n, k, k, 16, vtype, CUSPARSE_ORDER_ROW,
                      CUSPARSELT_SPARSITY_50_PERCENT)
                self._created.append(("mat", self.sparse_desc))
                if b_row_major:   # B is K x M, row-major, ld = M
                    b_rows, b_cols, op_b = k, m, CUSPARSE_OPERATION_NON_TRANSPOSE
                else:             # B = x.t(), x is M x K row-major, ld = K
                    b_rows, b_cols, op_b = m, k, CUSPARSE_OPERATION_TRANSPOSE
                timed("cusparseLtDenseDescriptorInit", lib.cusparseLtDenseDescriptorInit,
                      h, self.dense_desc.ptr, b_rows, b_cols, b_cols, 16, vtype, CUSPARSE_ORDER_ROW)
                self._created.append(("mat", self.dense_desc))
                if result_col_major:
                    ld, order = n, CUSPARSE_ORDER_COL
                else:
                    ld, order = m, CUSPARSE_ORDER_ROW
                for d in (self.c_desc, self.d_desc):
                    timed("cusparseLtDenseDescriptorInit", lib.cusparseLtDenseDescriptorInit,
                          h, d.ptr, n, m, ld, 16, vtype, order)
                    self._created.append(("mat", d))
                csize, cbuf = ctypes.c_size_t(0), ctypes.c_size_t(0)
                timed("cusparseLtSpMMACompressedSize2", lib.cusparseLtSpMMACompressedSize2,
                      h, self.sparse_desc.ptr, ctypes.byref(csize), ctypes.byref(cbuf))
                self.compressed_size = csize.value
                timed("cusparseLtMatmulDescriptorInit", lib.cusparseLtMatmulDescriptorInit,
                      h, self.matmul_desc.ptr, CUSPARSE_OPERATION_NON_TRANSPOSE, op_b,
                      self.sparse_desc.ptr, self.dense_desc.ptr, self.c_desc.ptr,
                      self.d_desc.ptr, ctype)
                timed("cusparseLtMatmulAlgSelectionInit", lib.cusparseLtMatmulAlgSelectionInit,
                      h, self.alg_sel.ptr, self.matmul_desc.ptr, CUSPARSELT_MATMUL_ALG_DEFAULT)
                self._created.append(("alg", self.alg_sel))
                mx = ctypes.c_int(-1)
                st = lib.cusparseLtMatmulAlgGetAttribute(
                    h, self.alg_sel.ptr, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID,
                    ctypes.byref(mx), ctypes.sizeof(mx))
                if st == CUSPARSE_STATUS_SUCCESS:
                    self.max_alg_id = mx.value
                aid = ctypes.c_int(alg_id)
                timed("cusparseLtMatmulAlgSetAttribute(CONFIG_ID)",
                      lib.cusparseLtMatmulAlgSetAttribute, h, self.alg_sel.ptr,
                      CUSPARSELT_MATMUL_ALG_CONFIG_ID, ctypes.byref(aid), ctypes.sizeof(aid))
                timed("cusparseLtMatmulPlanInit", lib.cusparseLtMatmulPlanInit,
                      h, self.plan.ptr, self.matmul_desc.ptr, self.alg_sel.ptr)
                self._created.append(("plan", self.plan))
                ws = ctypes.c_size_t(0)
                timed("cusparseLtMatmulGetWorkspace", lib.cusparseLtMatmulGetWorkspace,
                      h, self.plan.ptr, ctypes.byref(ws))
                self.workspace_size = ws.value
                # never null; at least 256 B so the pointer is well aligned and valid
                self.workspace = torch.empty(max(ws.value, 256), dtype=torch.uint8,
                                             device=torch.device("cuda", device_index))
        except BaseException:
            self.destroy()
            raise

    def run(self, compressed, dense_b, out, stream_ptr):
        self.stream_arr[0] = stream_ptr
        st = _lib.cusparseLtMatmul(
            self.handle.ptr, self.plan.ptr, ctypes.byref(self.alpha),
            compressed.data_ptr(), dense_b.data_ptr(), ctypes.byref(self.beta),
            out.data_ptr(), out.data_ptr(), self.workspace.data_ptr(),
            self.stream_arr, 1)
        _check(st, "cusparseLtMatmul")

    def destroy(self):
        """Destroy the cuSPARSELt objects (only when no captured graph still uses them)."""
        lib = _lib
        created, self._created = self._created, []
        for kind, obj in reversed(created):
            if kind == "plan":
                lib.cusparseLtMatmulPlanDestroy(obj.ptr)
            elif kind == "alg":
                fn = getattr(lib, "cusparseLtMatmulAlgSelectionDestroy", None)
                if fn is not None:
                    fn(obj.ptr)
            else:
                lib.cusparseLtMatDescriptorDestroy(obj.ptr)
        self.workspace = None


_plans: dict = {}
stats = {"plans_created": 0, "plan_hits": 0, "plan_init_s": 0.0}


def get_plan(device_index, dtype, n, k, m, b_row_major, result_col_major, alg_id):
    key = (device_index, dtype, n, k, m, b_row_major, result_col_major, alg_id)
    p = _plans.get(key)
    if p is not None:
        stats["plan_hits"] += 1
        return p
    with _lib_lock:
        p = _plans.get(key)
        if p is None:
            t0 = time.perf_counter()
            p = Plan(*key)
            stats["plan_init_s"] += time.perf_counter() - t0
            stats["plans_created"] += 1
            _plans[key] = p
    return p


def clear_cache():
    """Synchronize, then destroy all cached plans (handles are kept).

    Do not call while a captured CUDA graph that used a cached plan will still
    be replayed: the graph keeps pointing at the plan's workspace."""
    with _lib_lock:
        if _plans:
            torch.cuda.synchronize()
        for p in list(_plans.values()):
            p.destroy()
        _plans.clear()


def cached_plans():
    return list(_plans.values())


def sparse_mm(compressed: torch.Tensor, n: int, k: int, dense_b: torch.Tensor, *,
              transpose_result: bool, alg_id: int = 0) -> torch.Tensor:
    """Same as torch._cslt_sparse_mm(compressed, dense_b, transpose_result=..., alg_id=...).

    compressed: output of torch._cslt_compress(W), W of shape (n, k) row-major.
    dense_b:    (k, m), either contiguous (K x M row-major) or the transpose of a
                contiguous (m, k) tensor (e.g. x.t()).
    Returns (n, m) (transpose_result=False) or (m, n) (transpose_result=True),
    row-major, dtype of dense_b, computed on torch.cuda.current_stream().
    """
    if dense_b.dim() != 2:
        raise ValueError(f"dense_b must be 2-D, got {tuple(dense_b.shape)}")
    if dense_b.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dense_b.dtype}")
    if compressed.dtype != dense_b.dtype:
        raise ValueError(f"dtype mismatch: compressed {compressed.dtype}, dense_b {dense_b.dtype}")
    if not (compressed.is_cuda and dense_b.is_cuda) or compressed.device != dense_b.device:
        raise ValueError("compressed and dense_b must be on the same CUDA device")
    if dense_b.shape[0] != k:
        raise ValueError(f"dense_b.shape[0]={dense_b.shape[0]} != k={k}")
    m = dense_b.shape[1]
    if dense_b.is_contiguous():
        b_row_major = True
    elif dense_b.t().is_contiguous():
        b_row_major = False
    else:
        raise ValueError(f"dense_b must be contiguous or a transposed contiguous tensor, "
                         f"strides {dense_b.stride()}")
    if not compressed.is_contiguous():
        raise ValueError("compressed must be contiguous")
    for name, t in (("compressed", compressed), ("dense_b", dense_b)):
        if t.data_ptr() % 16:
            raise ValueError(f"{name} data pointer is not 16-byte aligned")
    dev = dense_b.device.index if dense_b.device.index is not None else torch.cuda.current_device()
    plan = get_plan(dev, dense_b.dtype, int(n), int(k), int(m), b_row_major,
                    bool(transpose_result), int(alg_id))
    nbytes = compressed.numel() * compressed.element_size()
    if plan.compressed_size is not None and nbytes < plan.compressed_size and not plan.warned:
        # torch <= 2.1x sizes the buffer as numel*9/16 elements; warn instead of failing
        plan.warned = True
        warnings.warn(f"compressed has {nbytes} bytes, cusparseLtSpMMACompressedSize2 says "
                      f"{plan.compressed_size} for a {n}x{k} matrix")
    shape = (m, n) if transpose_result else (n, m)
    out = torch.empty(shape, dtype=dense_b.dtype, device=dense_b.device)
    stream = torch.cuda.current_stream(dense_b.device)
    plan.run(compressed, dense_b, out, stream.cuda_stream)
    return out
