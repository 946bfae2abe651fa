"""ONNX export of unique subgraphs: runs in onnxruntime, matches PyTorch, names equal across instances."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

import numpy as np
import pytest
import torch

import trt_subgraph
from trt_subgraph.bench import models
from trt_subgraph.cli.export import add_cli
from trt_subgraph.cli.factory import load_factory
from trt_subgraph.engines.base import ACTIVATION
from trt_subgraph.engines.tensorrt import to_constant_module
from trt_subgraph.export import export_onnx, export_subgraph

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript", reason="torch.onnx's ATen exporter (dynamo=True) needs onnxscript")

SMALL = {
    "encoder": dict(depth=2, width=32, seq=8, batch=2),
    "vit": dict(depth=2, width=32, image=16, batch=2),
    "resnet": dict(depth=1, width=8, image=32, batch=2),
    "decoder": dict(depth=2, width=32, seq=8, batch=2),
    "mlp": dict(width=32, batch=2),
}


def _activations(sub, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for kind, val in zip(sub.input_kinds, sub.example_inputs):
        if kind == ACTIVATION:
            if val.dtype.is_floating_point:
                out.append(torch.randn(tuple(val.shape), generator=gen, dtype=val.dtype))
            else:  # token ids: every vocabulary here is larger than 10
                out.append(torch.randint(0, 10, tuple(val.shape), generator=gen, dtype=val.dtype))
    return out


def _run_onnx(path, activations):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), activations)}
    return session.run(None, feeds)


def _assert_matches(path, sub, weights, seed):
    activations = _activations(sub, seed)
    with torch.no_grad():
        expected = to_constant_module(sub, weights)(*activations)
    got = _run_onnx(path, activations)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        e = e.numpy()
        # fp32 rounding in a deep conv stack grows with the output's scale (resnet logits reach
        # ~65: onnxruntime and PyTorch then differ by ~2e-4 on near-zero logits), so the absolute
        # part of the tolerance is 1e-5 of the output's largest magnitude.
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(e).max())))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_unique_subgraph_runs_in_onnxruntime_and_matches_pytorch(name, tmp_path):
    model, inputs = models.build(name, **SMALL[name])
    index = export_onnx(model, *inputs, out_dir=tmp_path)
    captured = {u.sub.fingerprint: u for u in trt_subgraph.capture(model, *inputs).unique}
    assert [e["fingerprint"] for e in index["subgraphs"]] == list(captured)
    assert json.loads((tmp_path / "index.json").read_text()) == index
    for seed, entry in enumerate(index["subgraphs"]):
        unit = captured[entry["fingerprint"]]
        assert entry["instances"] == len(unit.instance_weights)
        assert entry["initializers"] == [f"w_{k}" for k in range(len(unit.instance_weights[0]))]
        _assert_matches(tmp_path / entry["file"], unit.sub, unit.instance_weights[0], seed)


@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_instances_share_initializer_names_and_differ_in_values(name, tmp_path):
    model, inputs = models.build(name, **SMALL[name])
    repeated = [u for u in trt_subgraph.capture(model, *inputs).unique if len(u.instance_weights) > 1]
    assert repeated, "the test model must repeat a block"
    for unit in repeated:
        first, last = unit.instance_weights[0], unit.instance_weights[-1]
        a, b = tmp_path / "first.onnx", tmp_path / "last.onnx"
        names_a = export_subgraph(unit.sub, first, a)
        names_b = export_subgraph(unit.sub, last, b)
        assert names_a == names_b
        graph_a, graph_b = onnx.load(str(a)).graph, onnx.load(str(b)).graph
        assert [(n.op_type, list(n.input), list(n.output)) for n in graph_a.node] == [
            (n.op_type, list(n.input), list(n.output)) for n in graph_b.node
        ]
        values_a = {i.name: onnx.numpy_helper.to_array(i) for i in graph_a.initializer}
        values_b = {i.name: onnx.numpy_helper.to_array(i) for i in graph_b.initializer}
        differing = [k for k in values_a if k.startswith("w_") and not np.array_equal(values_a[k], values_b[k])]
        assert differing, "instances at different depths must differ in weight values"
        for k, w in enumerate(last):  # the file holds exactly this instance's weights
            np.testing.assert_array_equal(values_b[f"w_{k}"], w.detach().numpy())
        _assert_matches(b, unit.sub, last, seed=7)


def test_cli_writes_files_and_index(tmp_path, monkeypatch, capsys):
    package = tmp_path / "factories"
    package.mkdir()
    (package / "tiny_models.py").write_text(
        textwrap.dedent("""
        from trt_subgraph.bench import models

        def make():
            return models.build("mlp", width=16, batch=2)
    """)
    )
    monkeypatch.syspath_prepend(str(package))
    parser = argparse.ArgumentParser(prog="trt-subgraph")
    add_cli(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "onnx"
    args = parser.parse_args(["export", "--onnx", str(out), "--model", "tiny_models:make"])
    assert args.func(args) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["subgraphs"] and all((out / e["file"]).is_file() for e in index["subgraphs"])
    assert "unique subgraphs" in capsys.readouterr().out
    sys.modules.pop("tiny_models", None)


@pytest.mark.parametrize("spec", ["no_colon", "os:", ":make", "os:not_there"])
def test_bad_factory_spec_is_a_value_error(spec):
    with pytest.raises(ValueError, match=r"--model|callable"):
        load_factory(spec)


def test_bad_opset_is_a_value_error(tmp_path):
    model, inputs = models.build("mlp", width=16, batch=2)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, *inputs, out_dir=tmp_path, opset=7)
