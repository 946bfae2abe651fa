"""What `sparsity="auto"` measures for the decoder's GEMMs: dense vs sparse ms and the fastest algorithm.

Run from the repository root on a CUDA machine: ``OUT=/tmp python benchmarks/sparse/shape_verdicts.py``
(writes ``$OUT/measure_shapes.json``; the H100 output of session 5 is ``h100_s5_shape_verdicts.json``).
"""
import json, os, time, torch
from trt_subgraph import sparse_runtime as sr, cusparselt
out = {}
dev = torch.device("cuda")
for m, k, n in [(8192, 2048, 2048), (8192, 2048, 5632), (8192, 5632, 2048), (8192, 2048, 32000),
                (512, 2048, 2048), (512, 2048, 5632), (512, 5632, 2048), (512, 2048, 32000)]:
    t0 = time.perf_counter()
    try:
        d, s, a = sr.measure(m, k, n, torch.float16, dev, False)
        x = torch.empty(m, k, device=dev, dtype=torch.float16)
        mx = cusparselt.selection(x, n, k).max_algorithm
        out[f"{m}x{k}x{n}"] = dict(dense_ms=round(d, 4), sparse_ms=round(s, 4), speedup=round(d / s, 3), algorithm=a,
                                   max_algorithm=mx, measure_s=round(time.perf_counter() - t0, 2))
    except Exception as e:
        out[f"{m}x{k}x{n}"] = f"{type(e).__name__}: {e}"
    print(f"{m}x{k}x{n}", out[f"{m}x{k}x{n}"], flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "measure_shapes.json"), "w"), indent=1)
