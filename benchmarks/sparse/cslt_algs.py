"""cuSPARSELt alg ids 0-11 vs dense F.linear at the decoder's GEMM shapes, inside CUDA graphs.

Run from the repository root on a CUDA machine: ``python benchmarks/sparse/cslt_algs.py``; writes
``$OUT/cslt_algs.json`` (T<id>: ms per call, T<id>_s: seconds for the whole measurement of that id).
Column-major output, as trt_subgraph calls the kernel. h100_s3_cslt_transposed_algs.json came from
this script with ``alg_id=a).t()`` replaced by ``transpose_result=True, alg_id=a)`` and ids 0-7.
"""
import json, os, sys, time
import torch, torch.nn.functional as F
sys.path.insert(0, os.getcwd())
from trt_subgraph.sparsity import mask_2_4
from trt_subgraph.sparse_runtime import _graph_ms
dev = torch.device("cuda"); dt = torch.float16
shapes = [(8192, 2048, 2048), (8192, 2048, 5632), (8192, 5632, 2048), (8192, 2048, 6144), (8192, 2048, 11264), (512, 2048, 2048), (512, 5632, 2048), (512, 2048, 5632)]
res = {}
t_start = time.perf_counter()
for m, k, n in shapes:
    x = torch.randn(m, k, device=dev, dtype=dt); w = torch.randn(n, k, device=dev, dtype=dt); w *= mask_2_4(w, kind="linear")
    c = torch._cslt_compress(w)
    ref = F.linear(x.float(), w.float())
    row = {"dense": round(_graph_ms(lambda: F.linear(x, w), dev), 4)}
    t0 = time.perf_counter(); row["colmajor"] = round(_graph_ms(lambda: torch._cslt_sparse_mm(c, x.t()).t(), dev), 4); row["colmajor_s"] = round(time.perf_counter() - t0, 2)
    for a in range(0, 12):
        t0 = time.perf_counter()
        try:
            y = torch._cslt_sparse_mm(c, x.t(), alg_id=a).t(); torch.cuda.synchronize()
        except Exception as e:
            row[f"T{a}_error"] = str(e)[:60]; break
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        row[f"T{a}"] = round(_graph_ms(lambda: torch._cslt_sparse_mm(c, x.t(), alg_id=a).t(), dev), 4)
        row[f"T{a}_s"] = round(time.perf_counter() - t0, 2); row[f"T{a}_relerr"] = round(err, 5)
        if time.perf_counter() - t_start > 200: break
    res[f"{m}x{k}x{n}"] = row
    print(f"{m}x{k}x{n}", json.dumps(row), flush=True)
    if time.perf_counter() - t_start > 200: break
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "cslt_algs.json"), "w"), indent=1)
