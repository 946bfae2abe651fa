"""Kernel-time breakdown of the pruned decoder (8x1024) under each sparsity mode given.

Run from the repository root on a CUDA machine: ``python benchmarks/sparse/kernel_profile.py auto,off``;
writes ``$OUT/sparse_prof.json`` (median ms over 20 CUDA-event-timed calls, kernel ms per call).
"""
import json, os, sys, collections, tempfile
import torch
sys.path.insert(0, os.getcwd())
import trt_subgraph
from trt_subgraph.bench import models
from trt_subgraph.sparsity import prune_2_4
OUT = os.environ.get("OUT", "/tmp")
res = {}
for mode in sys.argv[1].split(","):
    torch._dynamo.reset()
    torch.manual_seed(0)
    with torch.no_grad():
        model, inputs = models.build("decoder", batch=8, seq=1024, dtype=torch.float16, device="cuda", seed=0)
        prune_2_4(model)
        fn = torch.compile(model, backend="trt_subgraph", options={"engine": "inductor", "sparsity": mode, "cache_dir": tempfile.mkdtemp()})
        for _ in range(3): fn(*inputs)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(20):
            s.record(); fn(*inputs); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
        ts.sort()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5): fn(*inputs)
            torch.cuda.synchronize()
    agg = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            agg[ev.name[:110]][0] += ev.device_time / 1000 / 5; agg[ev.name[:110]][1] += 1
    top = sorted(agg.items(), key=lambda kv: -kv[1][0])[:30]
    rep = trt_subgraph.last_report()
    res[mode] = {"median_ms": ts[10], "kernel_total_ms": sum(v[0] for v in agg.values()),
                 "sparse_layers": len((rep.sparsity or {}).get("sparse", [])) if rep else None,
                 "top": [(k, round(v[0], 3), v[1] // 5) for k, v in top]}
    print(mode, "median", ts[10], "kernel total", res[mode]["kernel_total_ms"], "sparse", res[mode]["sparse_layers"], flush=True)
    for k, t, n in res[mode]["top"][:22]: print(f"  {t:8.3f} ms x{n:4d}  {k}")
json.dump(res, open(os.path.join(OUT, "sparse_prof.json"), "w"), indent=1)
