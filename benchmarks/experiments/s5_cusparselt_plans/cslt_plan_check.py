"""GPU check of .scratch/cslt_plan.py (cached cuSPARSELt plans via ctypes).

Run from the repo root:  python .scratch/cslt_plan_check.py
Writes $OUT/cslt_plan_check.json (OUT defaults to /tmp), rewritten after every part.
Parts: a) versions / library path, b) correctness vs fp32 dense and vs
torch._cslt_sparse_mm, c) host time per uncaptured call, d) CUDA-graph time per call.
"""
import json
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

T0 = time.perf_counter()
BUDGET_S = float(os.environ.get("CSLT_CHECK_BUDGET_S", "80"))
OUT_DIR = os.environ.get("OUT") or "/tmp"
OUT_FILE = os.path.join(OUT_DIR, "cslt_plan_check.json")
RES = {"errors": {}, "skipped": []}


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def elapsed():
    return time.perf_counter() - T0


def over_budget(what):
    if elapsed() > BUDGET_S:
        log(f"SKIP {what}: over time budget ({elapsed():.1f}s > {BUDGET_S}s)")
        RES["skipped"].append(what)
        return True
    return False


def save():
    RES["wall_s"] = round(elapsed(), 3)
    try:
        os.makedirs(OUT_DIR, exist_ok=True)
        with open(OUT_FILE, "w") as f:
            json.dump(RES, f, indent=1, default=str)
    except Exception as e:  # never die on saving
        print("could not write", OUT_FILE, e, flush=True)


def record_error(name, e):
    tb = traceback.format_exc()
    log(f"ERROR in {name}: {type(e).__name__}: {e}")
    print(tb, flush=True)
    RES["errors"][name] = f"{type(e).__name__}: {e}\n{tb[-3000:]}"


def maps_cusparselt():
    paths = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and "cusparseLt" in parts[5]:
                    paths.add(parts[5].strip())
    except Exception as e:
        return [f"error: {e}"]
    return sorted(paths)


# ----------------------------------------------------------------------------
try:
    import torch
    import torch.nn.functional as F
except Exception as e:
    record_error("import_torch", e)
    save()
    sys.exit(1)

cp = None
DEV = None

# ---------------------------------------------------------------- part a
log("part a: versions")
try:
    a = {}
    a["python"] = sys.version.split()[0]
    a["torch"] = torch.__version__
    a["torch_cuda"] = torch.version.cuda
    a["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        DEV = torch.device("cuda", torch.cuda.current_device())
        a["device_name"] = torch.cuda.get_device_name()
        a["capability"] = list(torch.cuda.get_device_capability())
    a["cusparselt_available"] = torch.backends.cusparselt.is_available()
    a["cusparselt_version_torch"] = torch.backends.cusparselt.version()
    a["maps_before_import"] = maps_cusparselt()
    RES["a"] = a
    log("torch", a["torch"], "cuda", a["torch_cuda"], a.get("device_name"))
    log("torch.backends.cusparselt.version() =", a["cusparselt_version_torch"])
    log("libcusparseLt in /proc/self/maps:", a["maps_before_import"])
    import cslt_plan as cp  # noqa: E402
    a["cslt_plan_file"] = cp.__file__
    a["cslt_plan_lib_path"] = cp.lib_path()
    a["cslt_plan_lib_version"] = list(cp.lib_version())
    a["maps_after_load"] = maps_cusparselt()
    log("cslt_plan uses", a["cslt_plan_lib_path"], "version", a["cslt_plan_lib_version"])
    if len(a["maps_after_load"]) > 1:
        log("WARNING: more than one libcusparseLt mapped:", a["maps_after_load"])
    a["handle_version"] = cp.handle_version()
    log("cusparseLtGetVersion(handle) =", a["handle_version"])
except Exception as e:
    record_error("a", e)
save()

if DEV is None or cp is None:
    log("no CUDA device or cslt_plan failed to load; stopping")
    save()
    sys.exit(1)


# ---------------------------------------------------------------- helpers
def make_w(n, k, dtype=torch.float16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(n, k, device=DEV, dtype=torch.float32, generator=g) / math.sqrt(k)
    w = w.to(dtype)
    grp = w.view(n, k // 4, 4)
    idx = grp.abs().topk(2, dim=-1).indices
    mask = torch.zeros(grp.shape, dtype=torch.bool, device=DEV).scatter_(-1, idx, True)
    return (grp * mask).view(n, k).contiguous()


def make_x(m, k, dtype=torch.float16, seed=1):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(m, k, device=DEV, dtype=torch.float32, generator=g).to(dtype)


def err(a, ref):
    d = (a.float() - ref).abs().max().item()
    s = ref.abs().max().item()
    return d, (d / s if s else float("nan"))


def sync():
    torch.cuda.synchronize()


def timed_call(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t0


def plan_info(n, k, m, b_row_major, tr, alg, dtype=torch.float16):
    p = cp._plans.get((DEV.index, dtype, n, k, m, b_row_major, tr, alg))
    if p is None:
        return None
    return {"init_times_s": {kk: round(v, 6) for kk, v in p.init_times.items()},
            "workspace_size": p.workspace_size, "compressed_size": p.compressed_size,
            "max_alg_id": p.max_alg_id}


# warm up CUDA / cuBLAS
try:
    _x = torch.randn(256, 256, device=DEV, dtype=torch.float16)
    (_x @ _x).sum().item()
    del _x
except Exception as e:
    record_error("warmup", e)

# ---------------------------------------------------------------- part b
SHAPES_B = [(64, 512, 256), (8192, 2048, 2048), (8192, 2048, 5632), (8192, 5632, 2048)]
log("part b: correctness")
RES["b"] = []
for (M, K, N) in SHAPES_B:
    if over_budget(f"b {M}x{K}x{N}"):
        break
    try:
        w = make_w(N, K)
        x = make_x(M, K)
        c = torch._cslt_compress(w)
        sync()
        ref = w.float() @ x.float().t()          # N x M, fp32
        dense_err = err(F.linear(x, w).t(), ref)  # fp16 dense baseline error
        log(f"shape M={M} K={K} N={N}: compressed {tuple(c.shape)} {c.dtype}, "
            f"dense fp16 max_abs {dense_err[0]:.3e}")
        for b_kind in ("x.t()", "x.t().contiguous()"):
            dense_b = x.t() if b_kind == "x.t()" else x.t().contiguous()
            b_row_major = dense_b.is_contiguous()
            for tr in (False, True):
                e = {"M": M, "K": K, "N": N, "dense_b": b_kind, "transpose_result": tr,
                     "compressed_shape": list(c.shape),
                     "compressed_bytes": c.numel() * c.element_size(),
                     "dense_fp16_max_abs": dense_err[0], "dense_fp16_rel": dense_err[1]}
                try:
                    r = ref.t() if tr else ref
                    ours, t_call, t_tot = timed_call(
                        lambda: cp.sparse_mm(c, N, K, dense_b, transpose_result=tr, alg_id=0))
                    e["ours_shape"] = list(ours.shape)
                    e["ours_first_call_s"] = t_tot
                    e["ours_max_abs"], e["ours_rel"] = err(ours, r)
                    e["plan"] = plan_info(N, K, M, b_row_major, tr, 0)
                    _, _, t2 = timed_call(
                        lambda: cp.sparse_mm(c, N, K, dense_b, transpose_result=tr, alg_id=0))
                    e["ours_second_call_s"] = t2
                    th, _, t_th = timed_call(
                        lambda: torch._cslt_sparse_mm(c, dense_b, transpose_result=tr))
                    e["torch_call_s"] = t_th
                    e["torch_shape"] = list(th.shape)
                    e["torch_max_abs"], e["torch_rel"] = err(th, r)
                    e["bitwise_equal_torch"] = bool(th.shape == ours.shape and torch.equal(th, ours))
                    if th.shape == ours.shape:
                        e["ours_vs_torch_max_abs"] = (th.float() - ours.float()).abs().max().item()
                    log(f"  B={b_kind:20s} tr={tr!s:5}: ours max_abs {e['ours_max_abs']:.3e} "
                        f"rel {e['ours_rel']:.2e} | torch max_abs {e['torch_max_abs']:.3e} | "
                        f"bitwise_equal {e['bitwise_equal_torch']} | ours 1st {t_tot*1e3:.1f} ms, "
                        f"2nd {t2*1e3:.2f} ms, torch {t_th*1e3:.1f} ms")
                except Exception as ex:
                    record_error(f"b {M}x{K}x{N} {b_kind} tr={tr}", ex)
                    e["error"] = f"{type(ex).__name__}: {ex}"
                RES["b"].append(e)
                save()
        del w, x, c, ref
        torch.cuda.empty_cache()
    except Exception as ex:
        record_error(f"b {M}x{K}x{N}", ex)
    save()

# extras: bf16 small case, invalid alg id error path
try:
    if not over_budget("b extras"):
        M, K, N = 64, 512, 256
        w = make_w(N, K, torch.bfloat16)
        x = make_x(M, K, torch.bfloat16)
        c = torch._cslt_compress(w)
        ref = w.float() @ x.float().t()
        ours = cp.sparse_mm(c, N, K, x.t(), transpose_result=False)
        th = torch._cslt_sparse_mm(c, x.t())
        sync()
        RES["b_bf16"] = {"ours_max_abs_rel": err(ours, ref), "torch_max_abs_rel": err(th, ref),
                         "bitwise_equal_torch": bool(torch.equal(ours, th))}
        log("bf16 64x512x256:", RES["b_bf16"])
        wh = make_w(N, K)
        xh = make_x(M, K)
        ch = torch._cslt_compress(wh)
        try:
            cp.sparse_mm(ch, N, K, xh.t(), transpose_result=False, alg_id=9999)
            sync()
            RES["b_bad_alg"] = "no error raised for alg_id=9999"
        except RuntimeError as ex:
            RES["b_bad_alg"] = f"RuntimeError: {ex}"
        log("alg_id=9999 ->", RES["b_bad_alg"])
except Exception as ex:
    record_error("b extras", ex)
save()

# ---------------------------------------------------------------- part c
SHAPES_CD = [(8192, 2048, 2048), (8192, 2048, 5632), (8192, 5632, 2048)]
log("part c: host time per uncaptured call (perf_counter around call + synchronize)")
RES["c"] = []
try:
    cp.clear_cache()
except Exception as ex:
    record_error("c clear_cache", ex)


def host_times(fn, n=6):
    calls, tots = [], []
    for _ in range(n):
        _, t_call, t_tot = timed_call(fn)
        calls.append(t_call)
        tots.append(t_tot)
    d = {"first_s": tots[0], "first_call_only_s": calls[0]}
    if n > 1:
        d["median_next_s"] = statistics.median(tots[1:])
        d["median_next_call_only_s"] = statistics.median(calls[1:])
    return d


for si, (M, K, N) in enumerate(SHAPES_CD):
    if over_budget(f"c {M}x{K}x{N}"):
        break
    try:
        w = make_w(N, K)
        x = make_x(M, K)
        c = torch._cslt_compress(w)
        sync()
        xt = x.t()
        cases = []
        for alg in (0, 6):
            for tr in (False, True):
                cases.append(("ours", tr, alg, 6,
                              (lambda tr=tr, alg=alg: cp.sparse_mm(c, N, K, xt, transpose_result=tr,
                                                                   alg_id=alg))))
        for alg in (0, 6):
            cases.append(("torch", False, alg, 6,
                          (lambda alg=alg: torch._cslt_sparse_mm(c, xt, alg_id=alg))))
        # torch transposed: slow (~0.3 s per call), one call each
        cases.append(("torch", True, 0, 1, lambda: torch._cslt_sparse_mm(c, xt, transpose_result=True)))
        if si == 0:
            cases.append(("torch", True, 6, 1,
                          lambda: torch._cslt_sparse_mm(c, xt, transpose_result=True, alg_id=6)))
        for impl, tr, alg, ncalls, fn in cases:
            if over_budget(f"c {M}x{K}x{N} {impl} tr={tr} alg={alg}"):
                break
            e = {"M": M, "K": K, "N": N, "impl": impl, "transpose_result": tr, "alg_id": alg,
                 "dense_b": "x.t()"}
            try:
                e.update(host_times(fn, ncalls))
                if impl == "ours":
                    e["plan"] = plan_info(N, K, M, False, tr, alg)
                log(f"  {M}x{K}x{N} {impl:5s} tr={tr!s:5} alg={alg}: first {e['first_s']*1e3:8.2f} ms"
                    + (f", median next {e['median_next_s']*1e3:7.3f} ms "
                       f"(call only {e['median_next_call_only_s']*1e3:.3f} ms)"
                       if "median_next_s" in e else "")
                    + (f", PlanInit {e['plan']['init_times_s'].get('cusparseLtMatmulPlanInit', 0)*1e3:.1f} ms"
                       if e.get("plan") else ""))
            except Exception as ex:
                record_error(f"c {M}x{K}x{N} {impl} tr={tr} alg={alg}", ex)
                e["error"] = f"{type(ex).__name__}: {ex}"
            RES["c"].append(e)
            save()
        del w, x, c, xt
        torch.cuda.empty_cache()
    except Exception as ex:
        record_error(f"c {M}x{K}x{N}", ex)
RES["c_plan_stats"] = dict(cp.stats)
save()

# ---------------------------------------------------------------- part d
log("part d: CUDA graph time per call (capture 10 calls, replay 20x, CUDA events)")
RES["d"] = []
N_CALLS, N_REPLAYS = 10, 20


def graph_ms(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    sync()
    eager_ref = fn()
    sync()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [fn() for _ in range(N_CALLS)]
    g.replay()
    sync()
    same = bool(torch.equal(outs[-1], eager_ref))
    st = torch.cuda.Event(enable_timing=True)
    en = torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(N_REPLAYS):
        g.replay()
    en.record()
    en.synchronize()
    ms = st.elapsed_time(en) / (N_REPLAYS * N_CALLS)
    del g, outs
    return ms, same


def eager_ms(fn, n=20):
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    if time.perf_counter() - t0 > 0.02:  # slow host path (e.g. per-call plan init): few calls
        n = 3
    st = torch.cuda.Event(enable_timing=True)
    en = torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    st.record()
    for _ in range(n):
        fn()
    en.record()
    en.synchronize()
    return st.elapsed_time(en) / n, (time.perf_counter() - t0) / n * 1e3


for (M, K, N) in SHAPES_CD:
    if over_budget(f"d {M}x{K}x{N}"):
        break
    try:
        w = make_w(N, K)
        x = make_x(M, K)
        c = torch._cslt_compress(w)
        sync()
        xt = x.t()
        ops = [
            ("dense F.linear(x, w)", lambda: F.linear(x, w), True),
            ("torch _cslt_sparse_mm(c, x.t()) col-major result", lambda: torch._cslt_sparse_mm(c, xt), True),
            ("ours x.t() row-major result alg0",
             lambda: cp.sparse_mm(c, N, K, xt, transpose_result=False, alg_id=0), True),
            ("ours transposed alg0", lambda: cp.sparse_mm(c, N, K, xt, transpose_result=True, alg_id=0), True),
            ("ours transposed alg6", lambda: cp.sparse_mm(c, N, K, xt, transpose_result=True, alg_id=6), True),
        ]
        dense_graph = None
        for name, fn, do_eager in ops:
            if over_budget(f"d {M}x{K}x{N} {name}"):
                break
            e = {"M": M, "K": K, "N": N, "op": name}
            try:
                e["graph_ms_per_call"], e["graph_out_equals_eager"] = graph_ms(fn)
                if name.startswith("dense"):
                    dense_graph = e["graph_ms_per_call"]
                if dense_graph:
                    e["speedup_vs_dense_graph"] = dense_graph / e["graph_ms_per_call"]
                if do_eager:
                    e["eager_gpu_ms_per_call"], e["eager_host_ms_per_call"] = eager_ms(fn)
                log(f"  {M}x{K}x{N} {name:52s}: graph {e['graph_ms_per_call']:.4f} ms/call "
                    f"(x{e.get('speedup_vs_dense_graph', float('nan')):.2f} vs dense), "
                    f"eager {e.get('eager_gpu_ms_per_call', float('nan')):.4f} ms "
                    f"(host {e.get('eager_host_ms_per_call', float('nan')):.3f} ms), "
                    f"graph==eager {e['graph_out_equals_eager']}")
            except Exception as ex:
                record_error(f"d {M}x{K}x{N} {name}", ex)
                e["error"] = f"{type(ex).__name__}: {ex}"
            RES["d"].append(e)
            save()
        del w, x, c, xt
        torch.cuda.empty_cache()
    except Exception as ex:
        record_error(f"d {M}x{K}x{N}", ex)
    save()

RES["plan_stats"] = dict(cp.stats)
RES["maps_end"] = maps_cusparselt()
log("done; errors:", list(RES["errors"].keys()), "skipped:", RES["skipped"])
save()
log("wrote", OUT_FILE)
