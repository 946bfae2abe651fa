"""trt_subgraph.compare: every piece against PyTorch on the same inputs, the first one over tolerance."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

import pytest
import torch

import trt_subgraph
from trt_subgraph.bench import models
from trt_subgraph.cli.compare import add_cli
from trt_subgraph.engines.eager import EagerEngine

ENCODER = dict(depth=3, width=32, seq=8, batch=2)
PATHS = ["embed", "layers.0", "layers.1", "layers.2", "norm"]


def _break_piece_of(monkeypatch, weight: torch.Tensor, factor: float = 1.01) -> None:
    """Make the eager engine wrong (outputs scaled by `factor`) for the piece instance that
    computes with `weight`; the other instances of its subgraph run the same artifact, rightly."""
    bind = EagerEngine.bind

    def broken_bind(self, artifact, sub):
        runner = bind(self, artifact, sub)

        def run(*args):
            out = runner(*args)
            if any(a is weight for a in args):
                return tuple(o * factor if o.is_floating_point() else o for o in out)
            return out

        return run

    monkeypatch.setattr(EagerEngine, "bind", broken_bind)


def test_every_piece_matches_with_an_engine_that_computes_like_pytorch():
    model, inputs = models.build("encoder", **ENCODER)
    result = trt_subgraph.compare(model, inputs, {"engine": "eager"})
    assert [p.module_path for p in result.pieces] == PATHS
    assert [p.index for p in result.pieces] == list(range(len(PATHS)))
    assert len({p.fingerprint for p in result.pieces[1:4]}) == 1  # one subgraph, three instances
    assert all(p.within and p.max_abs == 0 and p.engine == "eager" for p in result.pieces)
    assert result.first_over is None and result.output_max_abs == 0


def test_a_plan_from_the_plan_cache_names_each_piece_by_its_module_path():
    """The second compare finds the plan in the disk cache (no lowering); its pieces keep the
    module paths the first lowering found."""
    model, inputs = models.build("encoder", **ENCODER)
    first = trt_subgraph.compare(model, inputs, {"engine": "eager"})
    assert trt_subgraph.last_report().regions["plan"] == "stored"
    second = trt_subgraph.compare(model, inputs, {"engine": "eager"})
    assert trt_subgraph.last_report().regions["plan"] == "cache hit"
    assert [p.module_path for p in second.pieces] == [p.module_path for p in first.pieces] == PATHS


def test_a_broken_piece_is_named_with_its_module_path_and_the_others_are_within(monkeypatch):
    model, inputs = models.build("encoder", **ENCODER)
    _break_piece_of(monkeypatch, model.layers[1].qkv.weight)
    result = trt_subgraph.compare(model, inputs, {"engine": "eager"})
    assert [p.module_path for p in result.pieces] == PATHS
    first = result.first_over
    assert first is not None and first.module_path == "layers.1" and first.index == 2
    assert first.fingerprint == result.pieces[1].fingerprint == result.pieces[3].fingerprint
    assert first.max_abs > 1e-3 and 5e-3 < first.max_rel < 2e-2  # outputs off by 1%
    assert first.fp32_max_abs == first.max_abs  # an fp32 model: its dtype is the fp32 reference
    others = [p for p in result.pieces if p is not first]
    assert all(p.within and p.max_abs == 0 for p in others)  # downstream pieces get its outputs, not blamed
    assert result.output_max_abs > 0
    text = str(result)
    assert "first piece over tolerance: #2 layers.1" in text and "OVER" in text
    data = result.to_dict()
    assert data["first_over"] == 2 and json.loads(json.dumps(data)) == data


def test_low_precision_pieces_are_also_compared_with_float32(monkeypatch):
    model, inputs = models.build("encoder", **ENCODER, dtype=torch.bfloat16)
    result = trt_subgraph.compare(model, inputs, {"engine": "eager"})
    assert all(p.dtype == "bfloat16" and p.within and (p.rtol, p.atol) == (1e-2, 1e-2) for p in result.pieces)
    compared = [p for p in result.pieces if p.fp32_max_abs is not None]
    assert compared, [p.note for p in result.pieces]
    # the engine computes as PyTorch does in bf16, so it is as far from fp32 as PyTorch in bf16 is
    assert all(p.fp32_max_abs == p.pytorch_fp32_max_abs for p in compared)
    assert any(p.fp32_max_abs > 0 for p in compared)


def test_tolerance_is_the_users_choice(monkeypatch):
    model, inputs = models.build("encoder", **ENCODER)
    _break_piece_of(monkeypatch, model.layers[2].qkv.weight, factor=1.001)
    assert trt_subgraph.compare(model, inputs, {"engine": "eager"}).first_over.module_path == "layers.2"
    loose = trt_subgraph.compare(model, inputs, {"engine": "eager"}, rtol=1e-2, atol=1e-2)
    assert loose.first_over is None and all((p.rtol, p.atol) == (1e-2, 1e-2) for p in loose.pieces)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(self.norm(x)))


def test_inductor_pieces_are_within_the_default_tolerance():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_Block() for _ in range(2)]).eval()
    result = trt_subgraph.compare(model, torch.randn(4, 16), {"engine": "inductor", "cache_dir": None})
    assert [p.module_path for p in result.pieces] == ["0", "1"]
    assert all(p.engine == "inductor" for p in result.pieces)
    assert result.first_over is None, str(result)


def test_glue_building_in_the_background_is_compared_as_its_engine_runs_it():
    """With build workers, glue builds in the background and PyTorch runs it meanwhile: compare
    builds it before its one call, so that every piece it reports ran its engine."""
    model, inputs = models.build("encoder", **ENCODER)
    result = trt_subgraph.compare(model, inputs, {"engine": "inductor", "cache_dir": None, "build_workers": 2})
    assert [p.module_path for p in result.pieces] == PATHS
    assert all(p.engine == "inductor" for p in result.pieces)
    assert all(s.status == "built" for s in trt_subgraph.last_report().subgraphs)  # none still "building"


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda m, x: trt_subgraph.compare(lambda t: t, x), TypeError),
        (lambda m, x: trt_subgraph.compare(m, x, rtol=-1.0), ValueError),
        (lambda m, x: trt_subgraph.compare(m, x, atol="1e-3"), ValueError),
        (lambda m, x: trt_subgraph.compare(m, x, {"engine": "bogus"}), ValueError),
        (lambda m, x: trt_subgraph.compare(m, x, {"no_such_option": 1}), ValueError),
        (lambda m, x: trt_subgraph.compare(m, x, "engine=eager"), ValueError),
        (lambda m, x: trt_subgraph.compare(m, x, {"cudagraphs": "true"}), ValueError),
    ],
)
def test_bad_arguments_say_what_is_allowed(call, error):
    with pytest.raises(error, match=r"nn\.Module|finite number|must be one of|unknown option|must be a (dict|bool)"):
        call(torch.nn.Linear(4, 4), torch.randn(2, 4))


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trt-subgraph")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prints_the_table_or_json_and_exits_1_when_a_piece_is_over(tmp_path, monkeypatch, capsys):
    (tmp_path / "compare_models.py").write_text(
        textwrap.dedent("""
        import torch
        from trt_subgraph.bench import models

        BUILT = models.build("encoder", depth=3, width=32, seq=8, batch=2)

        def make():
            return BUILT

        def raises():
            raise RuntimeError("no weights here")

        def wrong_inputs():
            model, (ids,) = BUILT
            return model, (ids.float(),)  # token ids as floats: the embedding refuses them

        class Refuses(torch.nn.Module):
            def forward(self, x):
                raise ValueError("model says bad batch")

        def refuses():
            return Refuses(), (torch.randn(2, 4),)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert _run_cli(["compare", "--model", "compare_models:make", "--options", "engine=eager"]) == 0
        out = capsys.readouterr().out
        assert "all 5 piece calls within tolerance" in out and "layers.2" in out
        model, _ = sys.modules["compare_models"].BUILT
        _break_piece_of(monkeypatch, model.layers[0].qkv.weight)
        status = _run_cli(["compare", "--model", "compare_models:make", "--options", "engine=eager", "--json"])
        data = json.loads(capsys.readouterr().out)
        assert status == 1 and data["first_over"] == 1 and data["pieces"][1]["module_path"] == "layers.0"
        assert _run_cli(["compare", "--model", "compare_models:make", "--options", "engine=nope"]) == 2
        assert "must be one of" in capsys.readouterr().err
        assert _run_cli(["compare", "--model", "compare_models:raises"]) == 2  # bad input, not "over"
        assert "compare_models:raises raised RuntimeError: no weights here" in capsys.readouterr().err
        assert _run_cli(["compare", "--model", "compare_models:wrong_inputs", "--options", "engine=eager"]) == 3
        assert "compiling or running the model failed" in capsys.readouterr().err
        assert _run_cli(["compare", "--model", "compare_models:refuses", "--options", "engine=eager"]) == 3
        assert "ValueError: model says bad batch" in capsys.readouterr().err  # the model's error, not bad input
    finally:
        sys.modules.pop("compare_models", None)
