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
    "BatchNormAct2d",
    "Bottleneck",
    "ConvNeXt",
    "ConvNeXtBlock",
    "ConvNeXtStage",
    "ConvNormActivation",
    "Decoder",
    "DecoderBlock",
    "DepthwiseSeparable",
    "EfficientNet",
    "Encoder",
    "EncoderBlock",
    "InvertedResidual",
    "LayerNorm2d",
    "MBConv",
    "MobileNetV3",
    "PointwiseMlp",
    "RMSNorm",
    "ResNet",
    "SqueezeExcite",
    "ViT",
    "build",
    "make_inputs",
]

MODELS: tuple[str, ...] = ("encoder", "vit", "resnet", "decoder", "mlp", "efficientnet", "mobilenetv3", "convnext")
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


def _make_divisible(channels: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of `divisor`, never below 90% of `channels` (the rule of
    MobileNet and EfficientNet for scaled widths)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNorm2d with its activation as a child module (SiLU, or none)."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global average, reduce conv, activation, expand conv, gate."""

    def __init__(self, channels: int, reduced: int, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.conv_expand = nn.Conv2d(reduced, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.conv_expand(self.act(self.conv_reduce(scale))))


class DepthwiseSeparable(nn.Module):
    """EfficientNet's first block (timm DepthwiseSeparableConv): depthwise conv, SE, pointwise conv."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(in_ch, in_ch, kernel, stride, kernel // 2, groups=in_ch, bias=False)
        self.bn1 = BatchNormAct2d(in_ch)
        self.se = SqueezeExcite(in_ch, max(1, in_ch // 4), nn.SiLU, nn.Sigmoid)
        self.conv_pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn2 = BatchNormAct2d(out_ch, act=False)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))
        return out + x if self.has_skip else out


class MBConv(nn.Module):
    """EfficientNet's inverted residual (timm InvertedResidual): pointwise expansion, depthwise
    conv, SE (reduced to a quarter of the block's input channels), linear pointwise projection;
    sibling BatchNormAct2d modules after each conv."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.conv_pw = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid)
        self.se = SqueezeExcite(mid, max(1, in_ch // 4), nn.SiLU, nn.Sigmoid)
        self.conv_pwl = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn3 = BatchNormAct2d(out_ch, act=False)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        out = self.bn3(self.conv_pwl(self.se(out)))
        return out + x if self.has_skip else out


# EfficientNet-B0 stages: (expansion, kernel, stride, output channels); blocks per stage are
# the model's depth, (1, 2, 2, 3, 3, 4, 1) for B0.
_EFFICIENTNET_B0 = (
    (1, 3, 1, 16),
    (6, 3, 2, 24),
    (6, 5, 2, 40),
    (6, 3, 2, 80),
    (6, 5, 1, 112),
    (6, 5, 2, 192),
    (6, 3, 1, 320),
)


class EfficientNet(nn.Module):
    """EfficientNet-B0-like classifier laid out like timm's: stem, `blocks` (seven stages of
    DepthwiseSeparable / MBConv blocks, the first block of a stage changing stride or channels),
    1x1 head conv, average pool, linear classifier. `width` is the stem's channels (B0: 32);
    every other width scales with it."""

    def __init__(self, depth: tuple[int, ...], width: int, num_classes: int) -> None:
        super().__init__()
        scale = width / 32
        self.conv_stem = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(width)
        in_ch, stages = width, []
        for (expand, kernel, stride, out), n in zip(_EFFICIENTNET_B0, depth):
            out_ch, stage = _make_divisible(out * scale), []
            for i in range(n):
                block_stride = stride if i == 0 else 1
                if expand == 1:
                    stage.append(DepthwiseSeparable(in_ch, out_ch, kernel, block_stride))
                else:
                    stage.append(MBConv(in_ch, out_ch, kernel, block_stride, expand))
                in_ch = out_ch
            stages.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*stages)
        head = _make_divisible(1280 * max(1.0, scale))
        self.conv_head = nn.Conv2d(in_ch, head, 1, bias=False)
        self.bn2 = BatchNormAct2d(head)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn1(self.conv_stem(images)))
        x = self.bn2(self.conv_head(x))
        return self.classifier(x.mean((2, 3)))


class ConvNormActivation(nn.Sequential):
    """torchvision's Conv2dNormActivation: conv (no bias), BatchNorm2d, optional activation."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = None
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV3's block (torchvision InvertedResidual): sibling ConvNormActivation modules for
    the expansion (left out when it would not expand), the depthwise conv and the projection,
    with optional squeeze-excitation (ReLU, hard sigmoid) before the projection."""

    def __init__(
        self, in_ch: int, kernel: int, expanded: int, out_ch: int, se: bool, act: type[nn.Module], stride: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != in_ch:
            layers.append(ConvNormActivation(in_ch, expanded, 1, act=act))
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcite(expanded, _make_divisible(expanded // 4), nn.ReLU, nn.Hardsigmoid))
        layers.append(ConvNormActivation(expanded, out_ch, 1))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# MobileNetV3-Small blocks: (kernel, expanded, output channels, SE, hard-swish, stride, repeated).
# Blocks marked repeated form the two runs of identical blocks; the model's depth is their length.
_MOBILENETV3_SMALL = (
    (3, 16, 16, True, False, 2, False),
    (3, 72, 24, False, False, 2, False),
    (3, 88, 24, False, False, 1, False),
    (5, 96, 40, True, True, 2, False),
    (5, 240, 40, True, True, 1, True),
    (5, 120, 48, True, True, 1, False),
    (5, 144, 48, True, True, 1, False),
    (5, 288, 96, True, True, 2, False),
    (5, 576, 96, True, True, 1, True),
)


class MobileNetV3(nn.Module):
    """MobileNetV3-Small-like classifier: ConvNormActivation stem, `blocks` (inverted residuals;
    depth 2 gives Small's eleven), 1x1 ConvNormActivation, average pool, MLP classifier.
    `width` is the stem's channels (Small: 16); every other width scales with it."""

    def __init__(self, depth: int, width: int, num_classes: int) -> None:
        super().__init__()
        scale = width / 16
        self.stem = ConvNormActivation(3, width, 3, 2, act=nn.Hardswish)
        in_ch, blocks = width, []
        for kernel, expanded, out, se, hard_swish, stride, repeated in _MOBILENETV3_SMALL:
            act = nn.Hardswish if hard_swish else nn.ReLU
            for _ in range(depth if repeated else 1):
                out_ch, mid = _make_divisible(out * scale), _make_divisible(expanded * scale)
                blocks.append(InvertedResidual(in_ch, kernel, mid, out_ch, se, act, stride))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        last = _make_divisible(576 * scale)
        self.last = ConvNormActivation(in_ch, last, 1, act=nn.Hardswish)
        self.classifier = nn.Sequential(
            nn.Linear(last, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(images)))
        return self.classifier(x.mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over the channels of an (N, C, H, W) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PointwiseMlp(nn.Module):
    """timm's Mlp on channels-last activations: Linear to 4x the channels, GELU, Linear back."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXtBlock: depthwise 7x7 conv, permute to (N, H, W, C), LayerNorm over the
    channels, pointwise MLP, layer scale `gamma`, permute back, residual. `gamma` starts at 1
    (timm trains from 1e-6) so that every block's branch shows in the output."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = PointwiseMlp(dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        out = (self.mlp(out) * self.gamma).permute(0, 3, 1, 2)
        return out + x


class ConvNeXtStage(nn.Module):
    """timm's ConvNeXtStage: downsampling (LayerNorm2d, 2x2 stride-2 conv; none in the first
    stage), then `blocks`."""

    def __init__(self, in_ch: int, out_ch: int, depth: int) -> None:
        super().__init__()
        self.downsample = (
            nn.Sequential(LayerNorm2d(in_ch, eps=1e-6), nn.Conv2d(in_ch, out_ch, 2, stride=2))
            if in_ch != out_ch
            else nn.Identity()
        )
        self.blocks = nn.Sequential(*(ConvNeXtBlock(out_ch) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    """ConvNeXt-like classifier laid out like timm's: 4x4 stride-4 patchify stem with
    LayerNorm2d, four `stages` of widths (w, 2w, 4w, 8w) (ConvNeXt-T: w = 96, depths
    (3, 3, 9, 3)), global average pool, LayerNorm, linear head."""

    def __init__(self, depths: tuple[int, int, int, int], width: int, num_classes: int) -> None:
        super().__init__()
        dims = [width * 2**i for i in range(4)]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 4, stride=4), LayerNorm2d(width, eps=1e-6))
        self.stages = nn.Sequential(*(ConvNeXtStage(dims[max(i - 1, 0)], dims[i], n) for i, n in enumerate(depths)))
        self.head_norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(images))
        return self.fc(self.head_norm(x.mean((2, 3))))


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
    "efficientnet": {"depth": (1, 2, 2, 3, 3, 4, 1), "width": 32, "batch": 32, "image": 224},
    "mobilenetv3": {"depth": 2, "width": 16, "batch": 32, "image": 224},
    "convnext": {"depth": (3, 3, 9, 3), "width": 96, "batch": 32, "image": 224},
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


def make_inputs(
    name: str, model: nn.Module, *, batch: int, seq: int | None = None, image: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Example inputs of built-in model `name` (a model that `build` made) at any batch size.

    Token ids (int64, shape (batch, seq), below the model's vocabulary) for encoder and decoder;
    images (float, shape (batch, 3, image, image)) for the image models; features (float, shape
    (batch, width)) for mlp. Drawn from a generator seeded ``seed + 1``, so `build`'s example
    inputs are ``make_inputs(name, model, batch=..., seq=..., image=..., seed=seed)``; on the
    model's device, floats in fp32. `seq` is needed by encoder and decoder and must not exceed
    the length the model was built for; `image` by the image models.
    Raises ValueError for an unknown name, a size below 1 or a sequence too long for the model.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    batch = _positive("batch", batch)
    gen = torch.Generator().manual_seed(seed + 1)
    if name in ("encoder", "decoder"):
        seq = _positive("seq", seq)
        longest = model.pos.shape[1] if name == "encoder" else model.cos.shape[0]
        if seq > longest:
            raise ValueError(
                f"seq {seq} exceeds the {longest} tokens this {name} was built for (build it with seq={seq})"
            )
        x = torch.randint(0, model.embed.num_embeddings, (batch, seq), generator=gen)
    elif name == "mlp":
        x = torch.randn(batch, model.net[0].in_features, generator=gen)
    else:
        image = _positive("image", image)
        x = torch.randn(batch, 3, image, image, generator=gen)
    return (x.to(next(model.parameters()).device),)


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
    four stages, a 4-tuple gives them per stage (default (3, 4, 6, 3)); for efficientnet the
    same over its seven stages (default B0's (1, 2, 2, 3, 3, 4, 1)); for mobilenetv3 the length
    of each of its two runs of identical blocks (default 2: MobileNetV3-Small); for convnext
    like resnet (default ConvNeXt-T's (3, 3, 9, 3)); ignored for mlp.
    width: model width (resnet: base channel width; efficientnet, mobilenetv3: stem channels,
    default 32 and 16, the other widths scaled alike; convnext: the first stage's channels,
    default 96, doubling per stage). heads default max(1, width // 64).
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
    if name in ("resnet", "convnext"):
        if isinstance(depth, int) and not isinstance(depth, bool):
            depth = (depth,) * 4
        if not (isinstance(depth, (tuple, list)) and len(depth) == 4):
            raise ValueError(f"{name} depth must be an int or 4 ints (blocks per stage), got {depth!r}")
        depth = tuple(_positive(f"{name} depth entry", n) for n in depth)
    elif name == "efficientnet":
        if isinstance(depth, int) and not isinstance(depth, bool):
            depth = (depth,) * len(_EFFICIENTNET_B0)
        if not (isinstance(depth, (tuple, list)) and len(depth) == len(_EFFICIENTNET_B0)):
            raise ValueError(f"efficientnet depth must be an int or 7 ints (blocks per stage), got {depth!r}")
        depth = tuple(_positive("efficientnet depth entry", n) for n in depth)
    elif name != "mlp":
        depth = _positive("depth", depth)

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
    elif name in ("vit", "resnet", "efficientnet", "mobilenetv3", "convnext"):
        image = _positive("image", d["image"] if image is None else image)
        if name == "vit":
            p = _positive("patch", patch if patch is not None else (16 if image >= 64 else 8))
            if image % p:
                raise ValueError(f"image {image} must be divisible by patch {p}")
            model = ViT(depth, width, _heads_for(width, heads), image, p, num_classes)
        else:
            if image < 32:
                raise ValueError(f"{name} image must be >= 32 (five stride-2 stages), got {image}")
            if name == "resnet":
                model = ResNet(depth, width, num_classes)
            elif name == "efficientnet":
                model = EfficientNet(depth, width, num_classes)
            elif name == "convnext":
                model = ConvNeXt(depth, width, num_classes)
            else:
                model = MobileNetV3(depth, width, num_classes)
    else:
        model = MLP(width)

    inputs = make_inputs(name, model, batch=batch, seq=seq, image=image, seed=seed)
    model = model.to(device)
    inputs = tuple(t.to(device) for t in inputs)
    if name in ("resnet", "efficientnet", "mobilenetv3"):
        _calibrate_batchnorm(model, inputs)
    model = model.eval().to(dtype)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    return model, inputs
