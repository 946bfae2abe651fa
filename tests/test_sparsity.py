"""2:4 sparsity analysis, pruning, ONNX check and CLI (CPU only, no compilation)."""

from __future__ import annotations

import argparse
import json
import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from trt_subgraph import sparsity as sp
from trt_subgraph.cli import sparsity as sparsity_cli
from trt_subgraph.sparsity import LayerSparsity, SparsityTable, analyze_weight, check, prune_2_4

DTYPE_REASON = "(TensorRT sparse kernels need fp16, bf16 or int8)"


def nonzero_randn(*shape: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    """Random weights with no exact zeros, so only the masks below decide the pattern."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(*shape, generator=g) + 0.5
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return (w * sign).to(dtype)


def two_four_rows(out: int, inp: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    """(out, in) weight, exactly 2 non-zeros per group of 4 along `in`, at random positions."""
    g = torch.Generator().manual_seed(seed + 1)
    w = nonzero_randn(out, inp, dtype=dtype, seed=seed)
    keep = torch.rand(out, inp // 4, 4, generator=g).argsort(-1).argsort(-1) < 2
    return w * keep.reshape(out, inp).to(dtype)


def reasons(row: LayerSparsity) -> list[str]:
    return row.reason.split("; ") if row.reason else []


# ----------------------------------------------------------------------------- analyze_weight


def test_linear_exact_violating_counts():
    w = two_four_rows(8, 16)  # 8 * 4 = 32 groups
    base = analyze_weight(w, kind="linear", name="fc")
    assert base.pattern_ok and base.violating_groups == 0 and base.total_groups == 32
    assert base.eligible and not base.likely_to_help
    # three groups get a third non-zero, one group gets all four
    for row, grp, extra in [(0, 0, 1), (3, 2, 1), (7, 3, 1), (5, 1, 2)]:
        zeros = (w[row, 4 * grp : 4 * grp + 4] == 0).nonzero().flatten()
        w[row, 4 * grp + zeros[:extra]] = 1.0
    r = analyze_weight(w, kind="linear", name="fc")
    assert (r.violating_groups, r.total_groups) == (4, 32)
    assert r.violating_fraction == pytest.approx(4 / 32)
    assert not r.pattern_ok and not r.eligible and not r.likely_to_help
    assert reasons(r) == ["pattern violated in 12.5% of groups (4 of 32)", "too small (in=16, out=8 < 256)"]
    assert (r.name, r.kind, r.shape, r.dtype, r.groups) == ("fc", "linear", (8, 16), "float16", 1)


def test_fewer_than_two_nonzeros_is_fine():
    w = torch.zeros(4, 8, dtype=torch.float16)
    w[0, 1] = 3.0  # one non-zero; other groups all zero
    r = analyze_weight(w, kind="linear")
    assert r.pattern_ok and r.violating_groups == 0 and r.total_groups == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_large_eligible_layer_helps(dtype):
    w = two_four_rows(256, 512, dtype=dtype)
    r = analyze_weight(w, kind="linear")
    assert r.eligible and r.pattern_ok and r.large_enough and r.likely_to_help
    assert r.reason is None and r.in_features == 512 and r.out_features == 256


@pytest.mark.parametrize("out,inp", [(64, 64), (252, 512), (512, 252)])
def test_too_small(out, inp):
    r = analyze_weight(two_four_rows(out, inp), kind="linear")
    assert r.eligible and not r.large_enough and not r.likely_to_help
    assert r.reason == f"too small (in={inp}, out={out} < 256)"


def test_fp32_reports_pattern_separately():
    good = analyze_weight(two_four_rows(256, 256, dtype=torch.float32), kind="linear")
    assert good.pattern_ok and not good.eligible and not good.likely_to_help and good.large_enough
    assert good.reason == f"dtype float32 {DTYPE_REASON}"
    bad = analyze_weight(nonzero_randn(256, 256, dtype=torch.float32), kind="linear")
    assert not bad.pattern_ok and bad.violating_groups == bad.total_groups == 256 * 64
    assert reasons(bad) == ["pattern violated in 100% of groups (16384 of 16384)", f"dtype float32 {DTYPE_REASON}"]


def test_channels_not_multiple_of_4():
    w = torch.zeros(8, 30, dtype=torch.float16)
    w[:, ::2] = 1.0  # 2 non-zeros per (padded) group: the pattern itself holds
    r = analyze_weight(w, kind="linear")
    assert r.violating_groups == 0 and r.total_groups == 8 * 8
    assert not r.pattern_ok and not r.eligible
    assert reasons(r) == ["input channels 30 not a multiple of 4", "too small (in=30, out=8 < 256)"]


def conv_two_four(k: int, c: int, *kernel: int, dtype=torch.float16) -> torch.Tensor:
    """KC(RS) weight that is 2:4 along C at every (k, r, s)."""
    rows = two_four_rows(k * int(np.prod(kernel)), c, dtype=dtype)
    return rows.reshape(k, *kernel, c).movedim(-1, 1).contiguous()


@pytest.mark.parametrize("kernel", [(3,), (3, 3), (1, 3, 3)])
def test_conv_pattern_along_c(kernel):
    w = conv_two_four(256, 32, *kernel)
    r = analyze_weight(w, kind="conv", name="conv")
    spatial = int(np.prod(kernel))
    assert r.pattern_ok and r.eligible and r.total_groups == 256 * spatial * 8
    assert r.in_features == 32 * spatial and r.out_features == 256
    assert r.likely_to_help == (32 * spatial >= 256)


def test_conv_two_four_along_wrong_axis_fails():
    k, c, rr, s = 8, 16, 3, 4
    # 2:4 along the kernel width S: two zeros in each run of 4 along s, none along C
    w = nonzero_randn(k, c, rr, s)
    w[..., 2:] = 0
    r = analyze_weight(w, kind="conv")
    assert not r.pattern_ok
    # at s = 0, 1 every group of 4 channels has 4 non-zeros; at s = 2, 3 none
    assert (r.violating_groups, r.total_groups) == (k * rr * 2 * (c // 4), k * rr * s * (c // 4))
    # 2:4 along the output channels K: two of every four k are zero
    w = nonzero_randn(k, c, rr, s)
    w[2::4] = 0
    w[3::4] = 0
    r = analyze_weight(w, kind="conv")
    assert not r.pattern_ok and r.violating_fraction == pytest.approx(0.5)
    # the same values laid out 2:4 along C pass
    assert analyze_weight(conv_two_four(k, c, rr, s), kind="conv").pattern_ok


def test_grouped_and_depthwise_conv_not_eligible():
    grouped = analyze_weight(conv_two_four(256, 32, 3, 3), kind="conv", groups=4)
    assert grouped.pattern_ok and not grouped.eligible and not grouped.likely_to_help
    assert reasons(grouped) == ["grouped conv (groups=4)"]
    dw = analyze_weight(nonzero_randn(32, 1, 3, 3), kind="conv", groups=32)
    assert not dw.eligible and not dw.pattern_ok
    assert reasons(dw) == [
        "depthwise conv (groups=32)",
        "input channels per group 1 not a multiple of 4",
        "too small (in=9, out=32 < 256)",
    ]


def test_reason_order_most_important_first():
    w = nonzero_randn(16, 6, 3, 3, dtype=torch.float32)
    r = analyze_weight(w, kind="conv", groups=2)
    assert [x.split(" ")[0] for x in reasons(r)] == ["grouped", "input", "pattern", "dtype", "too"]


def test_matmul_and_gemm_reduce_along_the_right_axis():
    w = two_four_rows(64, 32)  # (out, in), 2:4 along in
    ref = analyze_weight(w, kind="linear")
    for kind, b, trans_b in [("matmul", w.t(), False), ("gemm", w, True), ("gemm", w.t(), False)]:
        r = analyze_weight(b, kind=kind, trans_b=trans_b)
        assert (r.pattern_ok, r.violating_groups, r.total_groups) == (True, 0, ref.total_groups)
        assert (r.in_features, r.out_features, r.reason) == (32, 64, ref.reason)
    # (out, in) handed over as a MatMul B operand is read (in=64, out=32) and violates
    wrong = analyze_weight(w, kind="matmul")
    assert not wrong.pattern_ok and (wrong.in_features, wrong.out_features) == (64, 32)


@pytest.mark.parametrize(
    "call,exc",
    [
        (lambda: analyze_weight(np.zeros((4, 4)), kind="linear"), TypeError),
        (lambda: analyze_weight(torch.zeros(4, 4), kind="attention"), ValueError),
        (lambda: analyze_weight(torch.zeros(4, 4, 4), kind="linear"), ValueError),
        (lambda: analyze_weight(torch.zeros(4, 4), kind="conv"), ValueError),
        (lambda: analyze_weight(torch.zeros(4, 4), kind="linear", groups=2), ValueError),
        (lambda: analyze_weight(torch.zeros(6, 4, 3, 3), kind="conv", groups=4), ValueError),
        (lambda: analyze_weight(torch.zeros(4, 4), kind="linear", trans_b=True), ValueError),
        (lambda: analyze_weight(torch.zeros(4, 4, 3, 3), kind="conv", groups=0), ValueError),
    ],
)
def test_bad_input(call, exc):
    with pytest.raises(exc):
        call()


# ----------------------------------------------------------------------------- check / table


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 256, 3, padding=1)
        self.dw = nn.Conv2d(256, 256, 3, padding=1, groups=256)
        self.proj = nn.Linear(256, 256)

    def forward(self, x):
        return self.proj(self.dw(self.conv(x)).mean((2, 3)))


def test_check_module_table():
    model = nn.Sequential(Block(), nn.ReLU(), nn.Linear(256, 10)).half()
    with torch.no_grad():
        model[0].proj.weight.copy_(two_four_rows(256, 256))
    table = check(model)
    assert [r.name for r in table.rows] == ["0.conv", "0.dw", "0.proj", "2"]
    assert [r.kind for r in table.rows] == ["conv", "conv", "linear", "linear"]
    assert table.eligible == ["0.proj"] and table.likely_to_help == ["0.proj"]
    text = str(table)
    assert text.splitlines()[-1] == "4 layers, 1 eligible, 1 likely to help"
    for r in table.rows:
        assert r.name in text
    d = json.loads(json.dumps(table.to_dict()))
    assert d["summary"] == {"layers": 4, "eligible": 1, "likely_to_help": 1}
    assert d["layers"][1]["reason"].startswith("depthwise conv (groups=256)")
    assert d["layers"][2]["shape"] == [256, 256] and d["layers"][2]["violating_fraction"] == 0.0


def test_table_from_rows_and_bad_input():
    rows = [analyze_weight(two_four_rows(8, 8), kind="linear", name=n) for n in ("a", "b")]
    table = SparsityTable(rows)
    assert table.eligible == ["a", "b"] and len(table) == 2 and list(table) == rows
    with pytest.raises(TypeError):
        SparsityTable([{"name": "a"}])
    with pytest.raises(TypeError):
        check(torch.zeros(3))


# ----------------------------------------------------------------------------- prune_2_4


def reference_keep(w: torch.Tensor) -> torch.Tensor:
    """Independent loop: keep the 2 largest |w| of each 4 input channels at each (k, *kernel),
    ties to the lower channel index."""
    keep = torch.zeros(w.shape, dtype=torch.bool)
    k, c = w.shape[:2]
    for ki in range(k):
        for pos in np.ndindex(*w.shape[2:]):
            for g in range(0, c, 4):
                mags = [(abs(float(w[(ki, g + j, *pos)])), j) for j in range(4)]
                for _, j in sorted(mags, key=lambda t: (-t[0], t[1]))[:2]:
                    keep[(ki, g + j, *pos)] = True
    return keep


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(8, 4, 3)
        self.c2 = nn.Conv2d(8, 4, 3)
        self.c3 = nn.Conv3d(4, 4, (1, 2, 2))
        self.g = nn.Conv2d(8, 8, 3, groups=2)
        self.odd = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(12, 5)


def test_prune_keeps_two_largest_and_passes_check(caplog):
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():  # integer-valued weights make ties common
        for m in (model.c2, model.fc):
            m.weight.copy_(torch.randint(-3, 4, m.weight.shape).float())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    ptrs = {n: p.data_ptr() for n, p in params.items()}

    with caplog.at_level(logging.WARNING, logger="trt_subgraph"):
        report = prune_2_4(model)

    assert report.pruned == ("c1", "c2", "c3", "fc")
    assert report.skipped == {"g": "grouped conv (groups=2)", "odd": "input channels 6 not a multiple of 4"}
    warns = [r for r in caplog.records if r.name.startswith("trt_subgraph")]
    assert len(warns) == 1 and "g (grouped conv" in warns[0].getMessage() and "odd" in warns[0].getMessage()

    for name in report.pruned:
        w0 = before[f"{name}.weight"]
        expected = torch.where(reference_keep(w0), w0, torch.zeros(()))
        assert torch.equal(getattr(model, name).weight.detach(), expected), name
    for name in ("g", "odd"):
        assert torch.equal(getattr(model, name).weight.detach(), before[f"{name}.weight"])
    for n, p in model.named_parameters():  # biases untouched; same tensors, dtype, grad flag
        if n.endswith("bias"):
            assert torch.equal(p.detach(), before[n])
        assert p is params[n] and p.data_ptr() == ptrs[n]
        assert p.dtype == torch.float32 and p.requires_grad and p.device.type == "cpu"

    rows = {r.name: r for r in report.table.rows}
    assert set(rows) == {"c1", "c2", "c3", "g", "odd", "fc"}
    assert all(rows[n].pattern_ok and rows[n].violating_groups == 0 for n in report.pruned)
    assert rows == {r.name: r for r in check(model).rows}


@pytest.mark.parametrize("layer", [nn.Linear(16, 8), nn.Conv2d(16, 8, 1)], ids=["linear", "conv"])
def test_prune_and_check_a_bare_layer(layer):
    """The model is the layer (module path ''): its weight is its own, not tied to ``weight``."""
    (row,) = check(layer).rows
    assert row.shared_with == () and not row.pattern_ok
    report = prune_2_4(layer)
    assert report.pruned == ("",) and report.skipped == {}
    (row,) = check(layer).rows
    assert row.pattern_ok and row.shared_with == ()


def test_prune_selected_layers_fp16():
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8)).half()
    before = model[1].weight.detach().clone()
    report = prune_2_4(model, layers=["0"])
    assert report.pruned == ("0",) and report.skipped == {}
    assert model[0].weight.dtype == torch.float16
    assert check(model).rows[0].eligible
    assert torch.equal(model[1].weight.detach(), before)
    with pytest.raises(ValueError, match=r"'nope'.*available: 0, 1"):
        prune_2_4(model, layers=["nope"])


def test_mask_matches_for_matmul_layout():
    w = nonzero_randn(8, 16, dtype=torch.float32)
    mask = sp.mask_2_4(w, kind="linear")
    assert torch.equal(sp.mask_2_4(w.t(), kind="matmul"), mask.t())
    assert torch.equal(mask, reference_keep(w.unsqueeze(-1)).squeeze(-1))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        sp.mask_2_4(torch.ones(4, 6), kind="linear")


# ----------------------------------------------------------------------------- ONNX

COMPARED = [
    "dtype",
    "groups",
    "in_features",
    "out_features",
    "pattern_ok",
    "violating_groups",
    "total_groups",
    "eligible",
    "large_enough",
    "likely_to_help",
    "reason",
]


def onnx_export(model: nn.Module, example: torch.Tensor, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy exporter deprecation; the dynamo one needs onnxscript
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False)


def pruned_net(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1, groups=4),
        nn.Conv2d(256, 6, 1),
        nn.Conv2d(6, 8, 1),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 256),
        nn.ReLU(),
        nn.Linear(256, 300, bias=False),
        nn.Linear(300, 8, bias=False),
    )
    prune_2_4(model, layers=["0", "2", "3", "4", "8"])  # "6" and "9" stay dense
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_onnx_matches_module(tmp_path, dtype):
    """Rows are matched by position: the module's layers run in definition order, and check_onnx
    reports weights in node order. MatMul weights are stored transposed, so only their shape
    differs."""
    model = pruned_net(dtype)
    path = tmp_path / "net.onnx"
    onnx_export(model, torch.randn(1, 16, 4, 4, dtype=dtype), path)
    mod_rows, onnx_rows = check(model).rows, sp.check_onnx(path).rows
    assert [r.kind for r in onnx_rows] == ["conv"] * 4 + ["gemm", "matmul", "matmul"]
    assert len(mod_rows) == len(onnx_rows)
    for m, o in zip(mod_rows, onnx_rows):
        assert {f: getattr(o, f) for f in COMPARED} == {f: getattr(m, f) for f in COMPARED}, m.name
        assert o.shape == (m.shape if o.kind != "matmul" else m.shape[::-1])
    # the table is not trivial: something eligible in fp16, the dense layers violate
    assert [r.pattern_ok for r in mod_rows] == [True, False, True, False, False, True, False]
    assert sum(r.eligible for r in mod_rows) == (3 if dtype == torch.float16 else 0)


def test_onnx_qdq_constant_and_bf16(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w_int8 = two_four_rows(32, 16, dtype=torch.float32).t().contiguous().to(torch.int8)  # MatMul B (in, out)
    conv_w = nonzero_randn(8, 4, 1, 1, dtype=torch.float32)  # Constant, group=2
    gemm_b = helper.make_tensor(
        "gemm_b", TensorProto.BFLOAT16, [32, 8], two_four_rows(8, 32, dtype=torch.float32).t().flatten().tolist()
    )  # Gemm B without transB: (in, out)
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "scale"], ["w_dq"]),
        helper.make_node("MatMul", ["x", "w_dq"], ["h"]),
        helper.make_node("Gemm", ["h", "gemm_b"], ["y"]),
        helper.make_node("MatMul", ["x", "w_dq"], ["h2"]),  # shared weight: reported once
        helper.make_node("Constant", [], ["cw"], value=numpy_helper.from_array(conv_w.numpy(), "cw")),
        helper.make_node("Conv", ["img", "cw"], ["z"], group=2),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 8, 2, 2]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "h2", "z")],
        initializer=[
            numpy_helper.from_array(w_int8.numpy(), "w_q"),
            numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
            gemm_b,
        ],
    )
    model = helper.make_model(graph)
    rows = sp.check_onnx(model).rows
    assert [(r.name, r.kind, r.dtype) for r in rows] == [
        ("w_q", "matmul", "int8"),
        ("gemm_b", "gemm", "bfloat16"),
        ("cw", "conv", "float32"),
    ]
    assert rows[0].eligible and rows[0].shape == (16, 32) and rows[0].in_features == 16
    assert rows[1].eligible and (rows[1].in_features, rows[1].out_features) == (32, 8)
    assert rows[2].groups == 2 and reasons(rows[2])[0] == "grouped conv (groups=2)"
    path = tmp_path / "qdq.onnx"
    path.write_bytes(model.SerializeToString())
    assert [r.to_dict() for r in sp.check_onnx(path)] == [r.to_dict() for r in rows]


class _TokenNet(nn.Module):
    """Linears on (batch, tokens, features): torch.onnx's exporter makes them MatMuls whose weights
    are folded transposes named val_N."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(8, 16, 1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(2))
        self.head = nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).transpose(1, 2)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def test_dynamo_exported_onnx_rows_are_named_like_the_module(tmp_path):
    pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs onnxscript")
    import onnx

    torch.manual_seed(0)
    model = _TokenNet().eval()
    prune_2_4(model, layers=["blocks.0.0", "head"])
    path = tmp_path / "tokens.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 8, 5),), str(path), dynamo=True, verbose=False)
    weights = [n.input[1] for n in onnx.load(str(path)).graph.node if n.op_type == "MatMul"]
    assert weights and all(w.startswith("val_") for w in weights)  # what the rows are traced from
    mod_rows, onnx_rows = check(model).rows, sp.check_onnx(path).rows
    assert [r.name for r in onnx_rows] == [r.name for r in mod_rows]
    assert [r.name for r in mod_rows] == ["stem", "blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2", "head"]
    assert [r.pattern_ok for r in onnx_rows] == [r.pattern_ok for r in mod_rows] == [False, True] + [False] * 3 + [True]


def test_check_onnx_reads_weights_fed_through_a_transpose_as_export_onnx_writes_them(tmp_path):
    pytest.importorskip("onnxscript", reason="export_onnx needs torch.onnx's dynamo exporter")
    import onnx
    from onnx import helper

    from trt_subgraph.export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    prune_2_4(model, layers=["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = export_onnx(model, torch.randn(4, 32), out_dir=tmp_path / "onnx")
    (entry,) = index["subgraphs"]
    path = tmp_path / "onnx" / entry["file"]
    assert "Transpose" in {n.op_type for n in onnx.load(str(path)).graph.node}  # what the rows come from
    rows = sp.check_onnx(path).rows
    assert [(r.shape, r.pattern_ok) for r in rows] == [((64, 32), True), ((32, 64), False)]

    # the same weight as MatMul B through a Transpose, and a Transpose that is not 2-D's swap
    w = torch.randn(8, 16)
    w[:, 1::2] = 0  # 2:4 along the input dim of (out, in)
    init = onnx.numpy_helper.from_array(w.numpy(), "w")
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])],
        [init],
    )
    (row,) = sp.check_onnx(helper.make_model(graph)).rows
    assert row.pattern_ok and row.shape == (8, 16)
    graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.zeros((0, 16), np.float32), "w"))
    assert sp.check_onnx(helper.make_model(graph)).rows == ()  # no elements, nothing to judge


def test_check_onnx_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        sp.check_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not protobuf\n")
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        sp.check_onnx(bad)
    with pytest.raises(TypeError):
        sp.check_onnx(42)


# ----------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trt-subgraph")
    sparsity_cli.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(tmp_path, capsys):
    model = pruned_net(torch.float16)
    path = tmp_path / "net.onnx"
    onnx_export(model, torch.randn(1, 16, 4, 4, dtype=torch.float16), path)
    assert run_cli(["sparsity", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "7 layers, 3 eligible, 1 likely to help"
    assert run_cli(["sparsity", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == sp.check_onnx(path).to_dict()

    assert run_cli(["sparsity", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert "no such ONNX file" in err and "missing.onnx" in err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xff garbage")
    assert run_cli(["sparsity", str(bad)]) == 2
    assert "not a valid ONNX model" in capsys.readouterr().err
