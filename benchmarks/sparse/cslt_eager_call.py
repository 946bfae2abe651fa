"""Seconds per eager (uncaptured) cuSPARSELt call: column-major vs transpose_result=True.

Run from the repository root on a CUDA machine: ``python benchmarks/sparse/cslt_eager_call.py``.
"""
import time, os, sys, torch, torch.nn.functional as F
sys.path.insert(0, os.getcwd())
from trt_subgraph.sparsity import mask_2_4
dev = torch.device("cuda"); dt = torch.float16
for (m, k, n) in [(8192, 2048, 2048), (8192, 2048, 5632), (512, 2048, 2048)]:
    x = torch.randn(m, k, device=dev, dtype=dt); w = torch.randn(n, k, device=dev, dtype=dt); w *= mask_2_4(w, kind="linear")
    c = torch._cslt_compress(w)
    for name, fn in [("colmajor", lambda: torch._cslt_sparse_mm(c, x.t())),
                     ("T6", lambda: torch._cslt_sparse_mm(c, x.t(), transpose_result=True, alg_id=6)),
                     ("T0", lambda: torch._cslt_sparse_mm(c, x.t(), transpose_result=True)),
                     ("col6", lambda: torch._cslt_sparse_mm(c, x.t(), alg_id=6))]:
        ts = []
        for _ in range(5):
            t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(round(time.perf_counter() - t0, 4))
        print(m, k, n, name, ts, flush=True)
