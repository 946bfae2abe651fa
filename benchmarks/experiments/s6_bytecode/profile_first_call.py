"""Profile first-call time: python .scratch/prof.py CASE_JSON (run in a fresh process)."""
import json, os, sys, time, functools, cProfile, pstats, io
spec = json.loads(sys.argv[1])
t0 = time.perf_counter()
import torch
import torch._dynamo.utils as dutils
import trt_subgraph
from trt_subgraph import pipeline, build, runtime, split, partition, canonicalize as canon, backend as be
from trt_subgraph.bench import models
t_import = time.perf_counter() - t0
T = {}
L = {}
def wrap(obj, name, label):
    f = getattr(obj, name)
    @functools.wraps(f)
    def w(*a, **k):
        s = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            d = time.perf_counter() - s
            T[label] = T.get(label, 0) + d
            L.setdefault(label, []).append(round(d, 3))
    setattr(obj, name, w)
if spec.get("warm_pool"):
    _orig_backend = be.trt_subgraph_backend
    def _warm_backend(*a, **k):
        from torch._inductor.async_compile import maybe_warm_pool
        maybe_warm_pool()
        return _orig_backend(*a, **k)
    be.trt_subgraph_backend = _warm_backend
if spec.get("old_pool"):
    import contextlib
    from trt_subgraph import _compat
    _compat._without_starting_inductor_pool = contextlib.nullcontext
if spec.get("glue_eager"):
    from trt_subgraph.engines.eager import EagerEngine
    _orig_call = pipeline.Compilation.__call__
    def _glue_call(self, gm, fake_inputs):
        n = sum(1 for x in gm.graph.nodes if x.op == "call_function")
        if self.region and n <= spec["glue_eager"]:
            self.engine = EagerEngine()
        return _orig_call(self, gm, fake_inputs)
    pipeline.Compilation.__call__ = _glue_call
wrap(be, "trt_subgraph_backend", "backend_total")
wrap(pipeline.Compilation, "__call__", "compilation_call")
wrap(pipeline.Compilation, "_apply_sparsity", "sparsity")
wrap(pipeline, "assign_blocks", "assign_blocks")
wrap(pipeline, "find_pieces", "find_pieces")
wrap(pipeline, "canonicalize", "canonicalize")
wrap(pipeline, "fuse_as_graphmodule", "fuse")
wrap(pipeline, "insert_subgm", "insert_subgm")
wrap(pipeline, "stable_topological_sort", "topo_sort")
wrap(build.ArtifactStore, "get", "store_get")
wrap(runtime.CUDAGraphForward, "_record", "cg_record")
from trt_subgraph.engines import inductor as ie
wrap(ie.InductorEngine, "build", "engine_build")
wrap(ie.InductorEngine, "deserialize", "engine_load")
wrap(ie.InductorEngine, "serialize", "engine_save")
with torch.no_grad():
    model, inputs = models.build(spec["model"], dtype=torch.float16, device="cuda", seed=0, **spec.get("kw", {}))
    torch.cuda.synchronize()
    if spec["backend"] == "trt":
        fn = torch.compile(model, backend="trt_subgraph", options=spec.get("opts", {"engine": "inductor"}))
    elif spec["backend"] == "regional":
        from trt_subgraph.bench.backends import find_blocks
        for b in find_blocks(model): b.compile(backend="inductor")
        fn = model
    elif spec["backend"] == "eager":
        fn = torch.compile(model, backend="eager")
    else:
        fn = torch.compile(model, backend="inductor")
    prof = cProfile.Profile() if spec.get("cprofile") else None
    t1 = time.perf_counter()
    if prof: prof.enable()
    out = fn(*inputs); torch.cuda.synchronize()
    if prof: prof.disable()
    first = time.perf_counter() - t1
    t2 = time.perf_counter(); fn(*inputs); torch.cuda.synchronize(); second = time.perf_counter() - t2
res = {"case": spec, "import_s": round(t_import, 3), "first_call_s": round(first, 3), "second_s": round(second, 4),
       "ours": {k: round(v, 3) for k, v in T.items()}, "calls": {k: v[:8] for k, v in L.items() if len(v) > 1}}
try:
    rep = trt_subgraph.last_report()
    if rep: res["totals"] = rep.totals; res["subgraphs"] = [(s.nodes, s.instances, s.status, round(s.build_s, 3)) for s in rep.subgraphs]
except Exception as e: res["rep_err"] = str(e)
print("@@RES " + json.dumps(res))
print(dutils.compile_times(repr="str", aggregate=True))
if prof:
    s = io.StringIO(); ps = pstats.Stats(prof, stream=s); ps.sort_stats("cumulative").print_stats(60); ps.sort_stats("tottime").print_stats(30)
    open(os.path.join(os.environ["OUT"], spec["name"] + ".pstats.txt"), "w").write(s.getvalue())
