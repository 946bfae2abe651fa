"""Contract tests: the TensorRT adapter against the published torch_tensorrt and TensorRT wheels.

Tests marked ``contract`` download seven wheels (about 18 MB: torch_tensorrt 2.11.0, 2.13.0 and
2.14.0, tensorrt-cu13-bindings 10.15.1.29, 11.0.0.114, 11.1.0.106 and 11.4.0.106) into
``$TRT_SUBGRAPH_CONTRACT_DIR`` (reused when present) or a pytest temporary directory, and check
them without importing anything from them. They skip only when the package index is
unreachable; any other download problem fails. Besides the adapter, they check the refit script
the ONNX export writes (``trt_subgraph/trt_refit.py``): every TensorRT name it uses is registered
by every version's bindings, and the index's commands are its command line.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import trt_subgraph
from trt_subgraph import trt_refit
from trt_subgraph.engines import tensorrt as adapter

_spec = importlib.util.spec_from_file_location("contract_tools", Path(__file__).with_name("contract_tools.py"))
ct = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ct)

ADAPTER = Path(adapter.__file__)
REFIT_SCRIPT = Path(trt_refit.__file__)
TORCH_TRT = ["torch_tensorrt-2.11", "torch_tensorrt-2.13", "torch_tensorrt-2.14"]
BINDINGS = ["tensorrt-10.15", "tensorrt-11.0", "tensorrt-11.1", "tensorrt-11.4"]


# ---- the adapter against its own tables (no network) --------------------------------------


def test_adapter_uses_nothing_outside_its_contract_tables():
    assert ct.usage_problems(ADAPTER, adapter.TORCH_TRT_CONTRACT, adapter.TRT_CONTRACT) == []


def test_contract_tables_have_no_stale_entries():
    used_tt, used_trt = ct.adapter_usage(ADAPTER)
    stale_tt = [
        name for name, spec in adapter.TORCH_TRT_CONTRACT.items() if name not in used_tt and "fields" not in spec
    ]  # field-only entries are read off results
    stale_trt = [
        (cls, member)
        for cls, members in adapter.TRT_CONTRACT.items()
        if cls != "BuilderFlag"
        for member in members
        if (cls, member) not in used_trt
    ]
    assert stale_tt == [] and stale_trt == []


def test_usage_scan_catches_an_undeclared_keyword(tmp_path):
    source = ADAPTER.read_text().replace("immutable_weights=False,", "immutable_weights=False, renamed_kw=1,")
    assert source != ADAPTER.read_text()
    (tmp_path / "tensorrt.py").write_text(source)
    problems = ct.usage_problems(tmp_path / "tensorrt.py", adapter.TORCH_TRT_CONTRACT, adapter.TRT_CONTRACT)
    assert problems == [
        "torch_tensorrt.dynamo.CompilationSettings is called with keywords ['renamed_kw'] missing from the contract"
    ]


def _refit_script_usage() -> dict[str, list[str]]:
    """Every TensorRT class and member the export's refit script uses, as a contract table."""
    torch_trt, trt = ct.adapter_usage(REFIT_SCRIPT, ct.REFIT_SCRIPT_RECEIVERS)
    assert torch_trt == {}  # the script needs TensorRT only
    table: dict[str, list[str]] = {}
    for name in sorted(trt):
        table.setdefault(name[0], []).extend(name[1:])
    return table


def test_refit_script_usage_scan_sees_the_build_and_refit_calls():
    """The scan behind the bindings check below finds what the script calls (not an empty table)."""
    table = _refit_script_usage()
    assert {"REFIT"} <= set(table["BuilderFlag"])
    assert {"STRONGLY_TYPED"} <= set(table["NetworkDefinitionCreationFlag"])
    assert {"create_network", "create_builder_config", "build_serialized_network"} <= set(table["Builder"])
    assert {"parse_from_file"} <= set(table["OnnxParser"])
    assert {"refit_from_bytes"} <= set(table["OnnxParserRefitter"])
    assert {"refit_cuda_engine"} <= set(table["Refitter"])
    assert {"deserialize_cuda_engine"} <= set(table["Runtime"])
    assert {"serialize"} <= set(table["ICudaEngine"])


# ---- against the wheels ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    directory = Path(os.environ.get("TRT_SUBGRAPH_CONTRACT_DIR") or tmp_path_factory.mktemp("trt_contract"))
    try:
        return ct.fetch(directory)
    except ct.NetworkUnavailable as exc:
        pytest.skip(f"package index unreachable, contract not checked: {exc}")


@pytest.fixture(scope="module")
def sources(wheels) -> dict[str, ct.SourceTree]:
    directory = wheels[TORCH_TRT[0]].parent
    return {
        label: ct.SourceTree(ct.extract(wheels[label], directory, lambda n: n.endswith(".py"))) for label in TORCH_TRT
    }


@pytest.fixture(scope="module")
def bindings(wheels) -> dict[str, ct.ElfStrings]:
    return {label: ct.bindings_strings(wheels[label], wheels[label].parent) for label in BINDINGS}


@pytest.mark.contract
@pytest.mark.parametrize("tt_label, trt_label", ct.PAIRS)
def test_bindings_are_the_ones_torch_tensorrt_requires(wheels, tt_label, trt_label):
    from packaging.specifiers import SpecifierSet

    dist, version = ct.WHEELS[trt_label]
    spec = ct.requirement_for(wheels[tt_label], dist)
    assert version in SpecifierSet(spec), f"{tt_label} requires {dist}{spec}, we check {version}"


@pytest.mark.contract
@pytest.mark.parametrize("label", TORCH_TRT)
def test_torch_tensorrt_declares_everything_the_adapter_uses(sources, label):
    assert ct.check_torch_trt(sources[label], adapter.TORCH_TRT_CONTRACT) == []


@pytest.mark.contract
def test_torch_tensorrt_check_fails_on_renamed_or_swallowed_keywords(sources):
    fabricated = {
        "torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine": {
            "kwargs": ["immutable_weights", "sparse_weights", "bogus_keyword"]
        },
        "torch_tensorrt.dynamo.CompilationSettings": {"kwargs": ["enabled_precisions"]},
        "torch_tensorrt.dynamo._refit.construct_refit_mapping": {"positional": 4},
        "torch_tensorrt.dynamo.no_such_function": {},
    }
    common = [
        "torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine: no parameter 'bogus_keyword'",
        "torch_tensorrt.dynamo._refit.construct_refit_mapping: takes 3 positional arguments, we pass 4",
        "torch_tensorrt.dynamo.no_such_function: not found",
    ]
    assert ct.check_torch_trt(sources["torch_tensorrt-2.11"], fabricated) == common
    # 2.13 removed enabled_precisions; its **kwargs would swallow it silently, the check does not.
    assert ct.check_torch_trt(sources["torch_tensorrt-2.13"], fabricated) == [
        common[0],
        "torch_tensorrt.dynamo.CompilationSettings: no parameter 'enabled_precisions'",
        *common[1:],
    ]


@pytest.mark.contract
def test_precision_follows_the_graph_dtypes_without_flags(sources):
    """Why the adapter passes no precision flag: 2.11 defaults to strong typing, 2.13 and 2.14 always are."""
    found = sources["torch_tensorrt-2.11"].resolve("torch_tensorrt.dynamo._defaults.USE_EXPLICIT_TYPING")
    assert found[0] == "value" and ast.literal_eval(found[1].value) is True
    for label in ("torch_tensorrt-2.13", "torch_tensorrt-2.14"):
        assert sources[label].resolve("torch_tensorrt.dynamo._defaults.USE_EXPLICIT_TYPING") is None
        assert ct.check_torch_trt(
            sources[label],
            {"torch_tensorrt.dynamo.CompilationSettings": {"fields": ["use_explicit_typing"]}},
        ) == ["torch_tensorrt.dynamo.CompilationSettings: no field 'use_explicit_typing'"]


@pytest.mark.contract
@pytest.mark.parametrize("label", TORCH_TRT)
def test_engine_weight_names_are_equal_across_depths(sources, label):
    """Run the wheel's own get_node_name (the node part of every engine weight name) on two blocks."""
    namespace: dict = {"torch": torch}
    exec(
        ct.function_source(sources[label], "torch_tensorrt.dynamo.conversion.converter_utils.get_node_name"), namespace
    )
    model = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)) for _ in range(3)]
    ).eval()
    (unit,) = [u for u in trt_subgraph.capture(model, torch.randn(2, 8)).unique if len(u.instance_weights) == 3]
    (val,) = [v for k, v in zip(unit.sub.input_kinds, unit.sub.example_inputs) if k == "activation"]
    names = []
    for weights in (unit.instance_weights[0], unit.instance_weights[2]):
        module = adapter.to_constant_module(unit.sub, weights)
        gm = torch.export.export(module, (torch.zeros(tuple(val.shape)),), strict=False).run_decompositions().module()
        names.append([namespace["get_node_name"](n) for n in gm.graph.nodes if n.op == "call_function"])
    assert names[0] == names[1] and names[0]
    assert all(name.startswith("/") for name in names[0])  # root module path '', no block path


@pytest.mark.contract
@pytest.mark.parametrize("label", BINDINGS)
def test_tensorrt_bindings_register_everything_the_adapter_uses(bindings, label):
    assert ct.check_trt(bindings[label], adapter.TRT_CONTRACT) == []


@pytest.mark.contract
@pytest.mark.parametrize("label", BINDINGS)
def test_tensorrt_bindings_register_everything_the_refit_script_uses(bindings, label):
    """The names only: pybind11 keeps no per-class table in the binary, so that a member belongs
    to its class (and its parameters) is from TensorRT's API documentation, not checked here."""
    assert ct.check_trt(bindings[label], _refit_script_usage()) == []


@pytest.mark.contract
def test_tensorrt_check_sees_removals_and_rejects_merged_suffixes(bindings):
    old, new = bindings["tensorrt-10.15"], bindings["tensorrt-11.0"]
    # Removed in TensorRT 11 (weak typing and implicit batch are gone), and not back since.
    removed = ["FP16", "EXPLICIT_BATCH", "platform_has_fast_fp16"]
    assert all(old.registered(name) for name in removed)
    for label in ("tensorrt-11.0", "tensorrt-11.1", "tensorrt-11.4"):
        assert not any(bindings[label].registered(name) for name in removed), label
    assert ct.check_trt(new, {"BuilderFlag": ["REFIT", "FP16"]}) == ["FP16"]
    # "Refitter" is registered but stored inside "OnnxParserRefitter": the suffix "ParserRefitter"
    # is in the binary too, yet nothing registers it, and the check says so.
    for strings in (old, new):
        assert strings.occurs("ParserRefitter") and not strings.registered("ParserRefitter")
        assert strings.registered("Refitter") and strings.registered("REFIT")


@pytest.mark.contract
@pytest.mark.parametrize("label", TORCH_TRT)
def test_torch_tensorrt_lowering_is_identical_across_depths(sources, tmp_path, label):
    """The wheel's own front end (TensorRT stubbed, CPU): what it hands the converters is the same
    graph with the same weight-name sources for every block, and only the values differ, which is
    why each instance's refit values come from lowering that instance."""
    probe = ct.lowering_probe(sources[label].root, ct.write_stubs(tmp_path / "stubs"))
    assert probe["torch_tensorrt"] == ct.WHEELS[label][1]
    (repeated,) = [s for s in probe["subgraphs"].values() if s["instances"] == 3]
    assert repeated["identical_graphs"] and repeated["identical_names"] and repeated["names"]
    assert not any("layers" in name for name in repeated["names"])  # no block path in any name
    assert repeated["distinct_values"] == 3  # folded constants (_frozen_param*) differ per block
    unsupported = {op for op, ok in repeated["supported"].items() if not ok}
    assert unsupported <= {"aten._scaled_dot_product_flash_attention_for_cpu.default"}  # CPU-only kernel
