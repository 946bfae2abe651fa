"""Block detection: blocks stay whole, repeated sub-modules of a block are not blocks, and each
unique block is one piece. Every case is compared with eager PyTorch on fresh inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

import trt_subgraph
from trt_subgraph import regions
from trt_subgraph.bench import models

TIGHT = dict(rtol=1e-5, atol=1e-5)


def compile_and_check(model, inputs, **options):
    """Compile with the eager engine, check fresh inputs against eager, return the report."""
    options = {"engine": "eager", "cache_dir": None, **options}
    fn = torch.compile(model, backend="trt_subgraph", options=options)
    fresh = [torch.randn_like(x) for x in inputs]
    with torch.no_grad():
        fn(*inputs)
        torch.testing.assert_close(fn(*fresh), model(*fresh), **TIGHT)
    return trt_subgraph.last_report()


def block_configurations(model, inputs, block_type):
    """(blocks, distinct configurations) of `block_type` modules: a configuration is the
    module's hyperparameters (its repr) and its input shape."""
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args: seen.append((repr(m), tuple(args[0].shape))))
        for m in model.modules()
        if isinstance(m, block_type)
    ]
    with torch.no_grad():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    return len(seen), len(set(seen))


# name, the block class, glue regions (stem, head; EfficientNet's single DepthwiseSeparable
# block is not repeated, so it is glue with the stem).
MOBILE_CNNS = [("efficientnet", models.MBConv), ("mobilenetv3", models.InvertedResidual)]


@pytest.mark.parametrize(("name", "block_type"), MOBILE_CNNS)
def test_each_mobile_block_is_one_piece(name, block_type):
    """Sibling BatchNormAct2d (EfficientNet) and ConvNormActivation (MobileNetV3) modules inside
    a block look like repeated blocks; they must not cut it."""
    model, inputs = models.build(name, width=8, batch=2, image=32)
    blocks, configurations = block_configurations(model, inputs, block_type)
    report = compile_and_check(model, inputs)
    assert report.block_method == "nn_module_stack" and report.blocks == blocks
    assert (report.regions["path"], report.regions["regions"], report.regions["lowered"]) == (
        "regions",
        blocks + 2,
        configurations + 2,
    )
    # One piece per region: the unique pieces are the distinct blocks plus the two glue regions.
    assert sum(s.instances for s in report.subgraphs) == blocks + 2
    assert len(report.subgraphs) == configurations + 2
    assert report.totals["fallback_nodes"] == 0


def test_each_mobile_block_is_one_piece_on_the_whole_graph_path(monkeypatch):
    """A graph that cannot be split into regions (here: splitting fails) is lowered whole; block
    detection then runs once, on its ATen graph, with the same blocks."""

    def broken(*args, **kwargs):
        raise RuntimeError("no regions")

    monkeypatch.setattr(regions, "split_module", broken)
    model, inputs = models.build("efficientnet", depth=(1, 3, 1, 1, 1, 1, 1), width=8, batch=2, image=32)
    blocks, configurations = block_configurations(model, inputs, models.MBConv)
    report = compile_and_check(model, inputs)
    assert report.regions["path"] == "whole graph"
    assert report.block_method == "nn_module_stack" and report.blocks == blocks
    assert sum(s.instances for s in report.subgraphs) == blocks + 2
    assert len(report.subgraphs) == configurations + 2


class _Branch(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.fc(x))


class _Block(nn.Module):
    """Two sibling branches of one class that compute alike: not blocks of their own."""

    def __init__(self, width):
        super().__init__()
        self.left = _Branch(width)
        self.right = _Branch(width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.left(x) * self.right(x))


class _Stage(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x)


class _Net(nn.Module):
    def __init__(self, stages):
        super().__init__()
        self.stages = nn.ModuleList(_Stage(w, d) for w, d in stages)
        self.proj = nn.ModuleList(nn.Linear(a[0], b[0]) for a, b in itertools.pairwise(stages))

    def forward(self, x):
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.proj):
                x = self.proj[i](x)
        return x


def test_repeated_stages_of_blocks_are_the_blocks():
    """Stages that repeat are the blocks (the outermost repeat); their blocks stay inside them."""
    torch.manual_seed(0)
    model = _Net([(16, 3), (16, 3), (16, 3)]).eval()
    report = compile_and_check(model, [torch.randn(2, 16)])
    assert report.blocks == 3
    stage = max(report.subgraphs, key=lambda s: s.instances)
    assert stage.instances == 3 and report.totals["builds"] == 2  # the stage, the projection (16 to 16)


def test_blocks_inside_stages_that_differ_are_the_blocks():
    """Stages of different widths do not repeat; the blocks inside them do, each one piece,
    and one build serves every block of a width."""
    torch.manual_seed(0)
    model = _Net([(16, 2), (24, 3), (32, 1)]).eval()
    report = compile_and_check(model, [torch.randn(2, 16)])
    assert report.blocks == 6
    assert sorted(s.instances for s in report.subgraphs) == [1, 1, 1, 2, 3]  # 2 glue, 3 widths


def test_structural_matcher_still_finds_blocks_without_module_metadata():
    """A plain function has no module stack: the structural matcher finds the repeats, and each
    repeat stays one piece."""

    def chain(x, w0, w1, w2, w3):
        for w in (w0, w1, w2, w3):
            x = torch.tanh(x @ w) * 0.5 + x
        return x

    torch.manual_seed(0)
    inputs = [torch.randn(4, 8)] + [torch.randn(8, 8) for _ in range(4)]
    fn = torch.compile(chain, backend="trt_subgraph", options={"engine": "eager", "cache_dir": None})
    fresh = [torch.randn_like(x) for x in inputs]
    fn(*inputs)
    torch.testing.assert_close(fn(*fresh), chain(*fresh), **TIGHT)
    report = trt_subgraph.last_report()
    assert report.block_method == "structural" and report.blocks >= 3
    repeated = max(report.subgraphs, key=lambda s: s.instances)
    assert repeated.instances == report.blocks and repeated.nodes == 4
