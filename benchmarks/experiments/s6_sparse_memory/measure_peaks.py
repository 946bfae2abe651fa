"""Peak memory of sparse_runtime.measure at the decoder's lm-head and MLP shapes; old mask cost; plan workspaces."""
import torch
from trt_subgraph import sparse_runtime, cusparselt
from trt_subgraph.sparsity import mask_2_4
dev = torch.device("cuda")
MiB = 2**20
for (m, k, n) in [(512, 2048, 32000), (8192, 2048, 32000), (512, 2048, 5632), (8192, 2048, 5632)]:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    d, s, a = sparse_runtime.measure(m, k, n, torch.float16, dev, bias=False)
    torch.cuda.synchronize()
    print(f"measure M{m} K{k} N{n}: dense {d:.4f} ms sparse {s:.4f} ms alg {a}; peak +{(torch.cuda.max_memory_allocated()-base)/MiB:.0f} MiB, kept +{(torch.cuda.memory_allocated()-base)/MiB:.0f} MiB")
w = torch.randn(32000, 2048, device=dev, dtype=torch.float16)
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
mask_2_4(w, kind="linear"); torch.cuda.synchronize()
print(f"mask_2_4 on 32000x2048 (uint8 ranks): peak +{(torch.cuda.max_memory_allocated()-base)/MiB:.0f} MiB")
ws = {key: {a: (0 if t is None else t.numel()) for a, (p, t) in sel.plans.items()} for key, sel in cusparselt._selections.items()}
print("plan workspaces (bytes) per selection:", {str(k[2:5]): v for k, v in ws.items()})
print("torch.cuda.memory_reserved MiB", torch.cuda.memory_reserved() / MiB)
