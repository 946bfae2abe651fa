"""One memory format for a whole graph (option ``memory_format``): the decision and the rewrite.

The decision for CUDA graphs is checked on graphs whose example values are fake CUDA tensors;
the rewrite runs on CPU with ``memory_format="channels_last"`` (``auto`` keeps CPU graphs as they
are). Outputs are compared with eager in float64: a channels-last convolution sums in another
order than a contiguous one, so float32 results differ by float32 rounding (relative 1e-6).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import trt_subgraph
from trt_subgraph import _compat, memory_format
from trt_subgraph.bench import models
from trt_subgraph.engines.eager import EagerEngine
from trt_subgraph.fx_utils import output_values
from trt_subgraph.memory_format import ConvShape, prefers_channels_last
from trt_subgraph.options import Options

CL = torch.channels_last


def compile_and_run(model, x, **options):
    options = {"engine": "eager", "cache_dir": None, **options}
    compiled = torch.compile(model, backend="trt_subgraph", options=options)
    with torch.no_grad():
        compiled(x)
        fresh = torch.randn_like(x)
        return compiled(fresh), fresh


def assert_matches_eager(model, x, actual):
    """Against float64 eager, within float32 rounding of the output's scale; eager's strides."""
    with torch.no_grad():
        expected = model(x)
        reference = model.double()(x.double())
    model.float()
    torch.testing.assert_close(actual.double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    assert actual.stride() == expected.stride()


def layout(value) -> str:
    """The memory format of a 4-D activation, "either" where both hold (1x1 images, one channel)."""
    if value.is_contiguous() and value.is_contiguous(memory_format=CL):
        return "either"
    return "channels_last" if value.is_contiguous(memory_format=CL) else "contiguous"


def piece_layouts(capture) -> tuple[list[str], list[str]]:
    """The layouts of the 4-D activations that the unique subgraphs take, and that they return."""
    inputs, outputs = [], []
    for unit in capture.unique:
        sub = unit.sub
        inputs += [layout(v) for k, v in zip(sub.input_kinds, sub.example_inputs) if k == "activation" and v.dim() == 4]
        values = [n.meta["val"] for n in output_values(sub.gm) if isinstance(n, torch.fx.Node)]
        outputs += [layout(v) for v in values if isinstance(v, torch.Tensor) and v.dim() == 4]
    return inputs, outputs


# ---------------------------------------------------------------------------------------------
# The decision


def test_prefers_channels_last_weighs_flops_by_kind_as_inductor_does():
    image = (32, 64, 56, 56)
    resnet = [ConvShape(image, (64, 64, 3, 3), image), ConvShape(image, (256, 64, 1, 1), (32, 256, 56, 56))]
    assert prefers_channels_last(resnet)
    depthwise = [ConvShape(image, (64, 1, 7, 7), image, groups=64)]  # one channel per group: not "grouped"
    assert prefers_channels_last(depthwise)
    grouped = [ConvShape(image, (64, 8, 3, 3), image, groups=8)]  # 1.358: slower channels-last
    assert not prefers_channels_last(grouped)
    # Mixed: the grouped convolution's FLOPs outweigh the 1x1's savings here, not with a larger 1x1.
    small_1x1 = ConvShape(image, (64, 64, 1, 1), image)  # 0.783
    assert not prefers_channels_last([*grouped * 3, small_1x1])
    assert prefers_channels_last([*grouped, small_1x1, small_1x1])


def conv_graph(convs, *, device="cuda", image=(2, 64, 16, 16), extra_nodes=0) -> torch.fx.GraphModule:
    """A Dynamo-like graph of chained 2-D convolutions, each (K, C per group, kernel, groups), then
    `extra_nodes` ReLUs; example values are fake tensors on `device` (no device needed)."""
    fake_mode, _ = _compat.fresh_shape_env()
    graph = torch.fx.Graph()
    with fake_mode:
        h = graph.placeholder("x")
        h.meta["example_value"] = torch.empty(image, device=device)
        weights = []
        for i, (k, c, r, _) in enumerate(convs):
            weights.append(graph.placeholder(f"w{i}"))
            weights[-1].meta["example_value"] = torch.empty(k, c, r, r, device=device)
        for w, (_, _, r, groups) in zip(weights, convs):
            args = (h, w, None, (1, 1), (r // 2, r // 2), (1, 1), groups)
            h = graph.call_function(torch.conv2d, args)
            h.meta["example_value"] = torch.conv2d(
                *[a.meta["example_value"] if hasattr(a, "meta") else a for a in args]
            )
        for _ in range(extra_nodes):
            value = h.meta["example_value"]
            h = graph.call_function(torch.relu, (h,))
            h.meta["example_value"] = torch.relu(value)
        graph.output((h,))
    return torch.fx.GraphModule(nn.Module(), graph)


class ContiguousOnly(EagerEngine):
    """An engine that takes contiguous tensors, as TensorRT's bindings do."""

    name = "contiguous-only"
    keeps_layout = False


BOTTLENECK = [(64, 64, 1, 1), (64, 64, 3, 1), (256, 64, 1, 1)]


def test_auto_goes_channels_last_where_inductor_would_for_the_whole_graph():
    assert memory_format.decide(conv_graph(BOTTLENECK), "auto", EagerEngine()) is None
    assert memory_format.decide(conv_graph([(64, 1, 7, 64)] * 2), "auto", EagerEngine()) is None  # depthwise


@pytest.mark.parametrize(
    ("graph", "engine", "why"),
    [
        (lambda: conv_graph(BOTTLENECK, device="cpu"), EagerEngine, "convolutions on cpu"),
        (lambda: conv_graph(BOTTLENECK), ContiguousOnly, "the contiguous-only engine takes contiguous inputs"),
        (lambda: conv_graph([(64, 8, 3, 8)] * 2), EagerEngine, "expects these convolutions to be slower"),
        (lambda: conv_graph([(64, 64, 3, 1)], extra_nodes=300), EagerEngine, "few convolutions (1 among 304 nodes)"),
        (lambda: conv_graph([], extra_nodes=3), EagerEngine, "no 2-D convolution"),
    ],
    ids=["cpu", "engine", "grouped", "few", "none"],
)
def test_auto_keeps_the_layout_and_says_why(graph, engine, why):
    assert why in memory_format.decide(graph(), "auto", engine())


def test_channels_last_is_applied_wherever_it_can_be():
    assert memory_format.decide(conv_graph(BOTTLENECK, device="cpu"), "channels_last", ContiguousOnly()) is None
    assert memory_format.decide(conv_graph([]), "channels_last", EagerEngine()) == "no 2-D convolution"
    assert memory_format.decide(conv_graph(BOTTLENECK), "preserve", EagerEngine()) == "requested"


def test_an_unknown_memory_format_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'memory_format' must be one of \['auto', 'preserve', 'channels_last'\]"):
        Options.from_user({"memory_format": "nhwc"})
    with pytest.raises(ValueError, match="memory_format must be one of"):
        memory_format.decide(conv_graph(BOTTLENECK), "nhwc", EagerEngine())
    assert Options.from_user({}).memory_format == "auto"


# ---------------------------------------------------------------------------------------------
# The rewrite, end to end on CPU


def test_auto_keeps_cpu_graphs_as_they_are():
    model, (x,) = models.build("resnet", depth=1, width=8, batch=2, image=32)
    actual, fresh = compile_and_run(model, x)
    assert trt_subgraph.last_report().memory_format.startswith("preserve (auto: convolutions on cpu")
    assert_matches_eager(model, fresh, actual)


@pytest.mark.parametrize("name", ["resnet", "convnext"])
def test_channels_last_pieces_agree_and_match_eager(name):
    model, (x,) = models.build(name, depth=3, width=16, batch=2, image=32)
    actual, fresh = compile_and_run(model, x, memory_format="channels_last")
    report = trt_subgraph.last_report()
    assert report.memory_format == "channels_last (requested; 1 conversion in the graph)"
    assert_matches_eager(model, fresh, actual)

    # Every piece takes and returns channels-last activations, but the first, which takes the
    # image and converts it; the blocks stay whole: as many regions, lowered as often, as without.
    inputs, outputs = piece_layouts(trt_subgraph.capture(model, x, memory_format="channels_last"))
    assert inputs.count("contiguous") == 1 and "channels_last" in inputs
    assert "contiguous" not in outputs and "channels_last" in outputs
    regions = trt_subgraph.last_report().regions
    inputs, outputs = piece_layouts(trt_subgraph.capture(model, x, memory_format="preserve"))
    assert trt_subgraph.last_report().regions == regions
    if name == "resnet":  # eager's NCHW throughout; ConvNeXt's LayerNorm2d returns channels-last itself
        assert "channels_last" not in inputs + outputs


def test_inductor_pieces_are_compiled_for_channels_last_and_match_eager():
    """Inductor asserts the strides of each piece's inputs when it runs, so a run checks that the
    pieces agree; the pieces are the channels-last ones the eager engine sees."""
    model, (x,) = models.build("convnext", depth=2, width=16, batch=2, image=32)
    actual, fresh = compile_and_run(model, x, engine="inductor", memory_format="channels_last")
    report = trt_subgraph.last_report()
    assert report.memory_format.startswith("channels_last")
    assert_matches_eager(model, fresh, actual)
    captured = trt_subgraph.capture(model, x, memory_format="channels_last")
    assert {s.fingerprint for s in report.subgraphs} == {u.sub.fingerprint for u in captured.unique}


class FeatureMap(nn.Module):
    """Returns a 4-D feature map and its pooled logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        features = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return features, self.fc(features.mean((2, 3)))


def test_graph_outputs_keep_eager_strides():
    model = FeatureMap().eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(
        model, backend="trt_subgraph", options={"engine": "eager", "memory_format": "channels_last"}
    )
    with torch.no_grad():
        features, logits = compiled(x)
        expected = model(x)
    assert trt_subgraph.last_report().memory_format.startswith("channels_last")
    assert features.is_contiguous() and features.stride() == expected[0].stride()
    torch.testing.assert_close(features, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected[1], rtol=1e-5, atol=1e-5)


class Flattening(nn.Module):
    """``view(n, -1)`` of a feature map: valid on contiguous memory only."""

    def __init__(self, strided: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)
        self.strided = strided

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.strided:
            return self.fc(h.as_strided((h.shape[0], 8 * 8 * 8), (8 * 8 * 8, 1)))
        return self.fc(h.view(h.shape[0], -1))


@pytest.mark.parametrize(
    ("strided", "why"),
    [
        (
            False,
            "preserve (channels_last: recomputing the graph's metadata channels-last failed (ValueError: Cannot view",
        ),
        (True, "preserve (channels_last: as_strided reads the memory layout"),
    ],
    ids=["view", "as_strided"],
)
def test_graphs_that_depend_on_the_layout_keep_it_and_say_why(strided, why, caplog):
    model = Flattening(strided).eval()
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        actual, fresh = compile_and_run(model, x, memory_format="channels_last")
    assert trt_subgraph.last_report().memory_format.startswith(why)
    assert "memory_format='channels_last' not applied" in caplog.text
    assert_matches_eager(model, fresh, actual)


def test_dynamic_shapes_keep_the_layout():
    model, (x,) = models.build("resnet", depth=1, width=8, batch=2, image=32)
    compiled = torch.compile(
        model, backend="trt_subgraph", dynamic=True, options={"engine": "eager", "memory_format": "channels_last"}
    )
    with torch.no_grad():
        actual = compiled(x)
    assert trt_subgraph.last_report().memory_format == "preserve (channels_last: dynamic shapes)"
    assert_matches_eager(model, x, actual)
