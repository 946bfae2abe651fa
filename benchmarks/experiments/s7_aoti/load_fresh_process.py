"""torch 2.11: does a process that never compiled load and CUDA-graph an AOTI package?"""
import faulthandler, sys, os, time, json, subprocess
faulthandler.enable()
def p(*a): print(*a, flush=True)
dev = os.environ.get("DEV", "cuda")
if len(sys.argv) > 1 and sys.argv[1] == "compile":
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx
    def f(x, w, b):
        return (torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)) + 1,)
    x, w, b = (torch.randn(8, 64, device=dev), torch.randn(32, 64, device=dev), torch.randn(32, device=dev))
    gm = make_fx(f, tracing_mode="fake")(x, w, b)
    t = time.time()
    files = torch._inductor.aot_compile(gm, (x, w, b), options={"aot_inductor.package": True, "aot_inductor.metadata": {}})
    p("compiled", round(time.time() - t, 1))
    json.dump([str(f) for f in files], open("/tmp/files3.json", "w"))
    sys.exit(0)
if len(sys.argv) > 1 and sys.argv[1] == "package":
    from torch._inductor.package import package_aoti
    package_aoti("/tmp/m3.pt2", json.load(open("/tmp/files3.json")))
    p("packaged", os.path.getsize("/tmp/m3.pt2"))
    sys.exit(0)
for step in ("compile", "package"):
    r = subprocess.run([sys.executable, "-X", "faulthandler", __file__, step], capture_output=True, text=True)
    p(f"== {step}: rc {r.returncode}", r.stdout.strip()[-300:], r.stderr.strip()[-600:] if r.returncode else "")
import torch
t = time.time()
loader = torch._C._aoti.AOTIModelPackageLoader("/tmp/m3.pt2", "model", True, 1, -1)
p("loaded", round(time.time() - t, 4), "inductor compile_fx imported:", "torch._inductor.compile_fx" in sys.modules)
def f(x, w, b):
    return torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)) + 1
x, w, b = (torch.randn(8, 64, device=dev), torch.randn(32, 64, device=dev), torch.randn(32, device=dev))
out = loader.run([x, w, b])
p("ran", (out[0] - f(x, w, b)).abs().max().item())
if dev == "cuda":
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loader.run([x, w, b])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gout = loader.run([x, w, b])
    for _ in range(2):
        x.copy_(torch.randn_like(x)); g.replay(); torch.cuda.synchronize()
        p("graph replay", (gout[0] - f(x, w, b)).abs().max().item())
    out = loader.run([x, w, b]); torch.cuda.synchronize()
    p("plain run after capture", (out[0] - f(x, w, b)).abs().max().item())
