"""Bisect the torch 2.11 package_aoti segfault; each variant in its own process."""
import faulthandler, sys, os, time, json, subprocess, zipfile, io
faulthandler.enable()
import torch
def p(*a): print(*a, flush=True)
dev = os.environ.get("DEV", "cuda")
def f(x, w, b):
    return (torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)) + 1,)
def inputs():
    torch.manual_seed(0)
    return (torch.randn(8, 64, device=dev), torch.randn(32, 64, device=dev), torch.randn(32, device=dev))
if len(sys.argv) == 1:
    from torch.fx.experimental.proxy_tensor import make_fx
    x, w, b = inputs()
    gm = make_fx(f, tracing_mode="fake")(x, w, b)
    t = time.time()
    files = torch._inductor.aot_compile(gm, (x, w, b), options={"aot_inductor.package": True, "aot_inductor.metadata": {}})
    p("compiled", round(time.time() - t, 1), [os.path.basename(str(f)) for f in files], [type(f).__name__ for f in files])
    json.dump([str(f) for f in files], open("/tmp/files.json", "w"))
    for v in ("writer", "bytesio", "zipfile"):
        r = subprocess.run([sys.executable, __file__, v], capture_output=True, text=True)
        p(f"== {v}: rc {r.returncode}")
        p("\n".join(l for l in (r.stdout + r.stderr).splitlines() if "Warning" not in l and "cls.__new__" not in l)[-1500:])
    sys.exit(0)
files = json.load(open("/tmp/files.json"))
v = sys.argv[1]
if v == "writer":
    from torch.export.pt2_archive._package import PT2ArchiveWriter
    with PT2ArchiveWriter("/tmp/w.pt2") as w:
        p("writer open")
        w.write_bytes("x/y", b"abc")
        p("bytes written")
        w.write_file("data/aotinductor/model/" + os.path.basename(files[0]), files[0])
        p("file written")
    p("closed", os.path.getsize("/tmp/w.pt2"))
elif v == "bytesio":
    from torch._inductor.package import package_aoti
    buf = io.BytesIO()
    package_aoti(buf, files)
    p("packaged to BytesIO", len(buf.getvalue()))
elif v == "zipfile":
    with zipfile.ZipFile("/tmp/z.pt2", "w", zipfile.ZIP_STORED) as z:
        for name, data in (("archive_format", b"pt2"), ("archive_version", b"0"), (".data/version", b"1\n"), ("byteorder", b"little")):
            z.writestr(f"z/{name}", data)
        for fn in files:
            z.write(fn, f"z/data/aotinductor/model/{os.path.basename(fn)}")
    p("zip written", os.path.getsize("/tmp/z.pt2"))
    loader = torch._C._aoti.AOTIModelPackageLoader("/tmp/z.pt2", "model", True, 1, -1)
    p("loaded")
    x, w, b = inputs()
    out = loader.run([x, w, b])
    p("ran", (out[0] - f(x, w, b)[0]).abs().max().item())
    if dev != "cuda": sys.exit(0)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loader.run([x, w, b])
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        gout = loader.run([x, w, b])
    x.copy_(torch.randn_like(x)); g.replay(); torch.cuda.synchronize()
    p("graph replay", (gout[0] - f(x, w, b)[0]).abs().max().item())
