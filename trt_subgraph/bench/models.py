"""Repeated-block benchmark models in plain PyTorch (no torchvision).

Why here: the benchmark and the tests need the same deterministic models, built from
identical blocks the way real networks are, at GPU benchmark sizes and at tiny CPU sizes.
`build(name, ...)` returns ``(model, example_inputs)``; the model is in eval mode on the
requested device and dtype, and both weights and inputs depend only on ``seed``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULTS",
    "DTYPES",
    "MLP",
    "MODELS",
    "Bottleneck",
    "Decoder",
    "DecoderBlock",
    "Encoder",
    "EncoderBlock",
    "RMSNorm",
    "ResNet",
    "ViT",
    "build",
]

MODELS: tuple[str, ...] = ("encoder", "vit", "resnet", "decoder", "mlp")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _heads_for(width: int, heads: int | None) -> int:
    heads = max(1, width // 64) if heads is None else heads
    if heads < 1 or width % heads:
        raise ValueError(f"width {width} must be divisible by heads {heads} (heads >= 1)")
    return heads


def _attention(qkv: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """(B, S, 3D) packed projections -> (B, S, D) attention output."""
    b, s, three_d = qkv.shape
    d = three_d // 3
    q, k, v = qkv.view(b, s, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, s, d)


class EncoderBlock(nn.Module):
    """BERT/ViT transformer block: MHA + GELU MLP, pre-norm or post-norm."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, norm_first: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_attention(self.qkv(x), self.heads))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = x + self._attn(self.norm1(x))
            return x + self._mlp(self.norm2(x))
        x = self.norm1(x + self._attn(x))
        return self.norm2(x + self._mlp(x))


class Encoder(nn.Module):
    """BERT-base-like encoder over token ids; returns the final hidden states."""

    def __init__(self, depth: int, width: int, heads: int, vocab: int, max_seq: int, norm_first: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(1, max_seq, width) * 0.02)
        self.layers = nn.ModuleList(EncoderBlock(width, heads, norm_first=norm_first) for _ in range(depth))
        # Pre-norm stacks need a final norm; post-norm blocks already end with one.
        self.norm = nn.LayerNorm(width) if norm_first else nn.Identity()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class ViT(nn.Module):
    """ViT-B/16-like classifier: conv patch embedding, cls token, pre-norm blocks, head."""

    def __init__(self, depth: int, width: int, heads: int, image: int, patch: int, num_classes: int) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, width) * 0.02)
        self.layers = nn.ModuleList(EncoderBlock(width, heads, norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x[:, 0]))


class Bottleneck(nn.Module):
    """ResNet-50 v1.5 bottleneck (stride on the 3x3), downsample in the first block of a stage."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
            if stride != 1 or in_ch != out_ch
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """ResNet-50-like CNN: stem, four stages of bottlenecks (`layer1..layer4`), avgpool, fc."""

    def __init__(self, blocks: tuple[int, int, int, int], width: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = width
        for i, (n, stride) in enumerate(zip(blocks, (1, 2, 2, 2)), start=1):
            planes = width * 2 ** (i - 1)
            stage = [Bottleneck(in_ch, planes, stride)]
            in_ch = planes * Bottleneck.expansion
            stage += [Bottleneck(in_ch, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class RMSNorm(nn.Module):
    """Llama RMSNorm, computed in fp32 like the reference implementation."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DecoderBlock(nn.Module):
    """Llama block: RMSNorm, causal attention with RoPE, RMSNorm, SwiGLU MLP."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(width)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.mlp_norm = RMSNorm(width)
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (
            p(h).view(b, s, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, d))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Decoder(nn.Module):
    """Llama-like decoder: embedding, blocks, final RMSNorm, lm head; returns logits."""

    def __init__(
        self, depth: int, width: int, heads: int, vocab: int, max_seq: int, rope_theta: float = 10000.0
    ) -> None:
        super().__init__()
        head_dim = width // heads
        if head_dim % 2:
            raise ValueError(f"head dim width/heads = {head_dim} must be even for RoPE")
        # Llama rounds the SwiGLU hidden size up to a multiple of 256; small test widths use 8.
        multiple = 256 if width >= 256 else 8
        hidden = multiple * math.ceil(8 * width / 3 / multiple)
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(DecoderBlock(width, heads, hidden) for _ in range(depth))
        self.norm = RMSNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        cos, sin = self.cos[:s], self.sin[:s]
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


class MLP(nn.Module):
    """Plain MLP without repeated blocks (the no-repetition case)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.ReLU(), nn.Linear(width, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# Defaults are the GPU benchmark sizes.
DEFAULTS: dict[str, dict[str, Any]] = {
    "encoder": {"depth": 12, "width": 768, "batch": 8, "seq": 128},
    "vit": {"depth": 12, "width": 768, "batch": 32, "image": 224},
    "resnet": {"depth": (3, 4, 6, 3), "width": 64, "batch": 32, "image": 224},
    "decoder": {"depth": 16, "width": 2048, "batch": 4, "seq": 512},
    "mlp": {"depth": None, "width": 256, "batch": 32},
}


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _calibrate_batchnorm(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Set BN running stats from one batch so that eval-mode activations stay O(1) at any depth.

    Default stats (mean 0, var 1) on random weights make a deep ResNet's activations explode,
    which would make the fp16 error figures meaningless.
    """
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, the batch statistics
    model.train()
    with torch.no_grad():
        model(*inputs)
    model.eval()
    for bn in bns:
        bn.momentum = 0.1


def build(
    name: str,
    *,
    depth: int | tuple[int, ...] | None = None,
    width: int | None = None,
    batch: int | None = None,
    seq: int | None = None,
    image: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    norm_first: bool = True,
    seed: int = 0,
    heads: int | None = None,
    vocab: int | None = None,
    patch: int | None = None,
    num_classes: int = 1000,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build benchmark model `name` and its example inputs, deterministically from `seed`.

    depth: blocks (encoder, vit, decoder); for resnet an int n gives n blocks in each of the
    four stages, a 4-tuple gives them per stage (default (3, 4, 6, 3)); ignored for mlp.
    width: model width (resnet: base channel width). heads default max(1, width // 64).
    vocab default 1000 below width 256, else 30522 (encoder) / 32000 (decoder).
    patch (vit) default 16, or 8 when image < 64. norm_first only affects the encoder.
    Weights are created in fp32 on `device`, then cast, so the same seed gives the same
    (rounded) weights in every dtype.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; allowed: {', '.join(DTYPES)}")
    device = torch.device(device)
    d = DEFAULTS[name]
    width = _positive("width", d["width"] if width is None else width)
    batch = _positive("batch", d["batch"] if batch is None else batch)
    depth = d["depth"] if depth is None else depth
    if name == "resnet":
        if isinstance(depth, int) and not isinstance(depth, bool):
            depth = (depth,) * 4
        if not (isinstance(depth, (tuple, list)) and len(depth) == 4):
            raise ValueError(f"resnet depth must be an int or 4 ints (blocks per stage), got {depth!r}")
        depth = tuple(_positive("resnet depth entry", n) for n in depth)
    elif name != "mlp":
        depth = _positive("depth", depth)

    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    if name in ("encoder", "decoder"):
        seq = _positive("seq", d["seq"] if seq is None else seq)
        h = _heads_for(width, heads)
        v = _positive(
            "vocab", vocab if vocab is not None else (1000 if width < 256 else (30522 if name == "encoder" else 32000))
        )
        if name == "encoder":
            model = Encoder(depth, width, h, v, max_seq=seq, norm_first=norm_first)
        else:
            model = Decoder(depth, width, h, v, max_seq=seq)
        inputs: tuple[torch.Tensor, ...] = (torch.randint(0, v, (batch, seq), generator=gen),)
    elif name in ("vit", "resnet"):
        image = _positive("image", d["image"] if image is None else image)
        if name == "vit":
            p = _positive("patch", patch if patch is not None else (16 if image >= 64 else 8))
            if image % p:
                raise ValueError(f"image {image} must be divisible by patch {p}")
            model = ViT(depth, width, _heads_for(width, heads), image, p, num_classes)
        else:
            if image < 32:
                raise ValueError(f"resnet image must be >= 32 (five stride-2 stages), got {image}")
            model = ResNet(depth, width, num_classes)
        inputs = (torch.randn(batch, 3, image, image, generator=gen),)
    else:
        model = MLP(width)
        inputs = (torch.randn(batch, width, generator=gen),)

    model = model.to(device)
    inputs = tuple(t.to(device) for t in inputs)
    if name == "resnet":
        _calibrate_batchnorm(model, inputs)
    model = model.eval().to(dtype)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    return model, inputs
