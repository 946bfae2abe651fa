"""ONNX export of unique subgraphs: runs in onnxruntime, matches PyTorch, names equal across instances,
every instance's weights map to the model's parameters, and the refit commands fit the refit script."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as safetensors_load
from safetensors.torch import save_file as safetensors_save

import trt_subgraph
from trt_subgraph import trt_refit
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


def _run_onnx(path_or_model, activations):
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), activations)}
    return session.run(None, feeds)


def _assert_matches(path_or_model, sub, weights, seed):
    activations = _activations(sub, seed)
    with torch.no_grad():
        expected = to_constant_module(sub, weights)(*activations)
    got = _run_onnx(path_or_model, activations)
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
        assert entry["instances"] == len(unit.instance_weights) == len(entry["instance_weights"])
        assert entry["initializers"] == [f"w_{k}" for k in range(len(unit.instance_weights[0]))]
        _assert_matches(tmp_path / entry["file"], unit.sub, unit.instance_weights[0], seed)


def _named(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer `name` of `model` (KeyError when it has none by that name)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}[name]


@pytest.mark.parametrize("name", ["encoder", "resnet", "decoder"])
def test_every_instance_runs_with_its_weights_and_maps_to_the_models_parameters(name, tmp_path):
    """Each instance: its ONNX model (the file with its safetensors weights put in, as the refit
    script does) matches PyTorch with the parameters the index names; the names are real and
    are exactly the tensors that instance computes with."""
    depth = (1, 3, 1, 1) if name == "resnet" else 2  # resnet: repeats after each stage's first block
    model, inputs = models.build(name, **{**SMALL[name], "depth": depth})
    index = export_onnx(model, *inputs, out_dir=tmp_path)
    captured = {u.sub.fingerprint: u for u in trt_subgraph.capture(model, *inputs).unique}
    assert any(entry["instances"] > 1 for entry in index["subgraphs"]), "the test model must repeat a block"
    for seed, entry in enumerate(index["subgraphs"]):
        unit = captured[entry["fingerprint"]]
        paths = [instance["module_path"] for instance in entry["instance_weights"]]
        assert paths == unit.instance_paths and len(set(paths)) == len(paths), paths
        for i, instance in enumerate(entry["instance_weights"]):
            assert set(instance["weights"]) == {f"w_{k}" for k in range(len(unit.instance_weights[i]))}
            named = [_named(model, instance["weights"][f"w_{k}"]) for k in range(len(instance["weights"]))]
            assert all(a is b for a, b in zip(named, unit.instance_weights[i]))
            stored = safetensors_load(tmp_path / instance["file"])
            assert sorted(stored) == sorted(instance["weights"])
            for k, tensor in enumerate(named):
                torch.testing.assert_close(stored[f"w_{k}"], tensor.detach(), rtol=0, atol=0)
            _assert_matches(
                trt_refit.instance_model(tmp_path / entry["file"], tmp_path / instance["file"]),
                unit.sub,
                named,
                seed=seed * 10 + i,
            )


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_each_instance_file_computes_its_block(tmp_path):
    """A stack whose pieces are whole blocks: instance i's ONNX model is block i of the model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_Block() for _ in range(3)]).eval()
    x = torch.randn(4, 16)
    index = export_onnx(model, x, out_dir=tmp_path)
    (entry,) = index["subgraphs"]
    assert [i["module_path"] for i in entry["instance_weights"]] == ["0", "1", "2"]
    assert len(entry["inputs"]) == 1 and len(entry["outputs"]) == 1
    assert entry["instance_weights"][2]["weights"] == {
        "w_0": "2.fc1.weight",
        "w_1": "2.fc1.bias",
        "w_2": "2.fc2.weight",
        "w_3": "2.fc2.bias",
    }
    for i, instance in enumerate(entry["instance_weights"]):
        block_input = torch.randn(4, 16, generator=torch.Generator().manual_seed(i))
        (got,) = _run_onnx(
            trt_refit.instance_model(tmp_path / entry["file"], tmp_path / instance["file"]), [block_input]
        )
        with torch.no_grad():
            expected = model[i](block_input)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
        assert not np.allclose(got, model[(i + 1) % 3](block_input).detach().numpy(), rtol=1e-3, atol=1e-3)


def test_index_commands_are_the_refit_scripts_command_line(tmp_path):
    model, inputs = models.build("encoder", **SMALL["encoder"])
    index = export_onnx(model, *inputs, out_dir=tmp_path)
    assert (tmp_path / index["refit_script"]).read_text() == Path(trt_refit.__file__).read_text()
    cli = trt_refit.parser()
    for entry in index["subgraphs"]:
        build = shlex.split(entry["build"])
        assert build[:2] == ["python", index["refit_script"]]
        built = cli.parse_args(build[2:])
        assert (built.command, built.onnx) == ("build", entry["file"])
        outs = set()
        for instance in entry["instance_weights"]:
            refit = cli.parse_args(shlex.split(instance["refit"])[2:])
            assert (refit.command, refit.plan, refit.onnx, refit.weights) == (
                "refit",
                built.plan,
                entry["file"],
                instance["file"],
            )
            assert (tmp_path / refit.weights).is_file()
            outs.add(refit.out)
        assert len(outs) == entry["instances"] and built.plan not in outs


def _fake_tensorrt() -> types.ModuleType:
    """A stand-in for TensorRT's Python API: an "engine" is the JSON of its weights by name."""
    trt = types.ModuleType("tensorrt")

    def arrays(model: onnx.ModelProto) -> dict:
        return {i.name: onnx.numpy_helper.to_array(i).tolist() for i in model.graph.initializer}

    class Plan(bytes):
        pass

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            assert flags == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
            return types.SimpleNamespace(weights=None)

        def create_builder_config(self):
            return types.SimpleNamespace(flags=[], set_flag=lambda flag: None)

        def build_serialized_network(self, network, config):
            return Plan(json.dumps(network.weights).encode())

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network.weights = arrays(onnx.load(path))
            return True

    class Engine:
        def __init__(self, weights):
            self.weights = weights

        def serialize(self):
            return json.dumps(self.weights).encode()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine(json.loads(plan))

    class Refitter:
        def __init__(self, engine, logger):
            self.engine, self.pending = engine, {}

        def refit_cuda_engine(self):
            self.engine.weights.update(self.pending)
            return True

    class OnnxParserRefitter:
        num_errors = 0

        def __init__(self, refitter, logger):
            self.refitter = refitter

        def refit_from_bytes(self, model):
            self.refitter.pending = arrays(onnx.load_from_string(model))
            return True

    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = types.SimpleNamespace(REFIT=3)
    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    trt.Refitter, trt.OnnxParserRefitter = Refitter, OnnxParserRefitter
    return trt


def test_refit_script_refits_each_instance_with_its_own_weights(tmp_path, monkeypatch):
    """The script's control flow, on a stand-in TensorRT: the engine built from the file is
    refit with instance i's weights and written as instance i's engine."""
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    model, inputs = models.build("encoder", **SMALL["encoder"])
    index = export_onnx(model, *inputs, out_dir=tmp_path)
    monkeypatch.chdir(tmp_path)
    (entry,) = [e for e in index["subgraphs"] if e["instances"] > 1]
    assert trt_refit.main(shlex.split(entry["build"])[2:]) == 0
    for instance in entry["instance_weights"]:
        assert trt_refit.main(shlex.split(instance["refit"])[2:]) == 0
        engine = json.loads((tmp_path / shlex.split(instance["refit"])[-1]).read_bytes())
        for k, name in instance["weights"].items():
            np.testing.assert_array_equal(np.array(engine[k], dtype=np.float32), _named(model, name).detach().numpy())


def test_instance_weights_must_fit_the_onnx_file(tmp_path):
    model, inputs = models.build("mlp", width=16, batch=2)
    index = export_onnx(model, *inputs, out_dir=tmp_path)
    entry = index["subgraphs"][0]
    weights = safetensors_load(tmp_path / entry["instance_weights"][0]["file"])
    wrong = tmp_path / "wrong.safetensors"
    safetensors_save({**weights, "w_0": weights["w_0"][:1].clone()}, str(wrong))
    with pytest.raises(ValueError, match=r"'w_0' is F32 \[1, \d+\], the initializer"):
        trt_refit.instance_model(tmp_path / entry["file"], wrong)
    safetensors_save({**weights, "not_there": weights["w_0"].clone()}, str(wrong))
    with pytest.raises(ValueError, match="'not_there' is not an initializer"):
        trt_refit.instance_model(tmp_path / entry["file"], wrong)


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
