"""Find the piece that loses accuracy: each engine piece against PyTorch on the same inputs.

TensorRT users compare an engine with the framework layer by layer (Polygraphy's ``run --trt
--onnxrt`` with every layer's output marked). Here the unit is the piece: :func:`compare` runs
the compiled model once and, at every piece call, runs the piece's canonical ATen subgraph in
PyTorch on the very inputs the engine got (the intermediate values of the compiled model), once
in the model's dtype and once in float32, so an error is charged to the piece that made it,
not to the pieces downstream that inherit it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["DEFAULT_TOLERANCES", "Comparison", "PieceComparison", "compare"]

# (rtol, atol) per output dtype, when compare() is given none: Polygraphy's defaults (1e-5) for
# fp32 and fp64, and about eight units in the last place of fp16 (2**-10) and bf16 (2**-7).
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-5, 1e-5),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


@dataclasses.dataclass(frozen=True)
class PieceComparison:
    """One piece call: the engine's outputs against PyTorch's on the same inputs.

    ``max_abs``: largest absolute difference from PyTorch run in the model's dtype, over every
    output element (in the outputs' unit); ``max_rel``: ``max_abs`` over the largest magnitude of
    PyTorch's output (0 when both are 0; inf where NaN or inf appear in only one of them). The
    ``fp32_`` fields compare the engine with PyTorch run in float32 (inputs and weights upcast),
    ``pytorch_fp32_max_abs`` PyTorch in the model's dtype with that same reference (what the
    dtype alone loses); None where the float32 run failed (``note`` says why). ``within``: every
    element satisfies ``|engine - pytorch| <= atol + rtol * |pytorch|`` (``rtol``, ``atol``).
    """

    index: int  # call order in the forward
    fingerprint: str
    module_path: str  # '' for the model itself
    engine: str  # the engine that ran it, or "pytorch" where the piece runs in PyTorch
    dtype: str
    max_abs: float
    max_rel: float
    fp32_max_abs: float | None
    fp32_max_rel: float | None
    pytorch_fp32_max_abs: float | None
    rtol: float
    atol: float
    within: bool
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What :func:`compare` found: every piece call in order, and the model's output against eager."""

    engine: str
    pieces: list[PieceComparison]
    output_max_abs: float  # the compiled model's outputs against the model run eagerly
    output_max_rel: float

    @property
    def first_over(self) -> PieceComparison | None:
        """The first piece call, in forward order, over its tolerance (None when all are within)."""
        return next((p for p in self.pieces if not p.within), None)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_over
        return {
            "engine": self.engine,
            "output": {"max_abs": self.output_max_abs, "max_rel": self.output_max_rel},
            "first_over": None if first is None else first.index,
            "pieces": [p.to_dict() for p in self.pieces],
        }

    def __str__(self) -> str:
        header = (
            "#",
            "module",
            "fingerprint",
            "engine",
            "dtype",
            "max_abs",
            "max_rel",
            "fp32_abs",
            "fp32_rel",
            "pytorch_fp32_abs",
            "",
        )
        rows = [
            (
                str(p.index),
                p.module_path or "(model)",
                p.fingerprint,
                p.engine,
                p.dtype,
                _fmt(p.max_abs),
                _fmt(p.max_rel),
                _fmt(p.fp32_max_abs),
                _fmt(p.fp32_max_rel),
                _fmt(p.pytorch_fp32_max_abs),
                "ok" if p.within else f"OVER (rtol={p.rtol:g}, atol={p.atol:g})",
            )
            for p in self.pieces
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
        first = self.first_over
        if first is None:
            lines.append(f"all {len(self.pieces)} piece calls within tolerance (engine {self.engine})")
        else:
            lines.append(
                f"first piece over tolerance: #{first.index} {first.module_path or '(model)'} "
                f"(subgraph {first.fingerprint}), max abs {_fmt(first.max_abs)}, max rel {_fmt(first.max_rel)}"
            )
        lines.append(
            f"model output against eager PyTorch: max abs {_fmt(self.output_max_abs)}, "
            f"max rel {_fmt(self.output_max_rel)}"
        )
        for p in self.pieces:
            if p.note:
                lines.append(f"#{p.index}: {p.note}")
        return "\n".join(lines)


def check_arguments(options: dict[str, Any] | None, rtol: float | None, atol: float | None) -> str:
    """Check :func:`compare`'s options and tolerances: ValueError saying what is allowed,
    RuntimeError for ``engine="tensorrt"`` where TensorRT is not usable. Returns the name of the
    engine the backend will pick."""
    from . import engines
    from .options import Options

    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value)
        ):
            raise ValueError(f"trt_subgraph: {name} must be a finite number >= 0 or None, got {value!r}")
    checked = Options.from_user(options)
    chosen, _ = engines.select(checked.engine, torch_executed_ops=checked.torch_executed_ops, sparsity=checked.sparsity)
    return chosen.name


def compare(
    model: torch.nn.Module,
    inputs: Any,
    options: dict[str, Any] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> Comparison:
    """Run ``model`` compiled with the ``trt_subgraph`` backend once on ``inputs`` (a tensor or a
    tuple of positional inputs) and compare every engine piece call with PyTorch on the same
    intermediate inputs; also the model's outputs with the model run eagerly.

    ``options``: the backend's options (any engine; ``cudagraphs`` is turned off, since a replayed
    CUDA graph runs no Python to observe pieces, and replays the same kernels; so is
    ``background_glue``, so that every piece runs its engine in the one call observed). ``rtol``/``atol``:
    the tolerance of every piece, against PyTorch in the model's dtype; by default per output
    dtype, :data:`DEFAULT_TOLERANCES`. Runs under ``torch.no_grad()``, with the model in the mode
    it is in (call ``model.eval()`` first for inference), and resets torch.compile's caches first
    (as :func:`trt_subgraph.capture` does).

    Raises TypeError for a ``model`` that is not an ``nn.Module``, ValueError for a negative or
    non-numeric tolerance, ``options`` that are not a dict or an invalid option, RuntimeError for
    ``engine="tensorrt"`` where TensorRT is not usable (:func:`check_arguments`).
    """
    from . import runtime

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"trt_subgraph: compare needs a torch.nn.Module, got {type(model).__name__}")
    engine = check_arguments(options, rtol, atol)  # before anything compiles
    opts = {**(options or {}), "cudagraphs": False, "background_glue": False}
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)

    pieces: list[PieceComparison] = []

    def observe(piece: Any, module_path: str, piece_args: tuple, outputs: Any) -> None:
        pieces.append(_compare_piece(len(pieces), piece, module_path, piece_args, outputs, engine, rtol, atol))

    torch.compiler.reset()
    compiled = torch.compile(model, backend="trt_subgraph", options=opts)
    with torch.no_grad():
        with runtime.observe_pieces(observe):
            got = compiled(*args)
        expected = model(*args)
    out_abs, out_rel, _ = _errors(_tensors(got), _tensors(expected), 0.0, 0.0)
    return Comparison(engine=engine, pieces=pieces, output_max_abs=out_abs, output_max_rel=out_rel)


def _compare_piece(
    index: int,
    piece: Any,
    module_path: str,
    args: tuple,
    outputs: Any,
    engine: str,
    rtol: float | None,
    atol: float | None,
) -> PieceComparison:
    """One piece call's outputs against its canonical subgraph run by PyTorch on `args`."""
    got = _tensors(outputs)
    reference = _tensors(piece.canonical(*args))
    floating = [t for t in reference if t.is_floating_point()]
    dtype = floating[0].dtype if floating else (reference[0].dtype if reference else torch.float32)
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))  # integers: exact
    rtol = default_rtol if rtol is None else float(rtol)
    atol = default_atol if atol is None else float(atol)
    note = None
    if [t.shape for t in got] != [t.shape for t in reference]:
        max_abs, max_rel, within = math.inf, math.inf, False
        note = f"output shapes differ: engine {[tuple(t.shape) for t in got]}, PyTorch {[tuple(t.shape) for t in reference]}"
    else:
        max_abs, max_rel, within = _errors(got, reference, rtol, atol)
    fp32_abs = fp32_rel = pytorch_fp32 = None
    if note is None:
        if all(t.dtype in (torch.float32, torch.float64) for t in floating):
            fp32_abs, fp32_rel, pytorch_fp32 = max_abs, max_rel, 0.0  # the model's dtype is fp32 already
        else:
            try:
                upcast = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
                reference32 = _tensors(piece.canonical(*upcast))
                fp32_abs, fp32_rel, _ = _errors(got, reference32, 0.0, 0.0)
                pytorch_fp32 = _errors(reference, reference32, 0.0, 0.0)[0]
            except Exception as exc:  # explicit dtype casts in the graph can make fp32 inputs invalid
                note = f"no float32 reference ({type(exc).__name__}: {exc})"
    return PieceComparison(
        index=index,
        fingerprint=piece.fingerprint,
        module_path=module_path,
        engine="pytorch" if _fell_back(piece) else engine,
        dtype=str(dtype).removeprefix("torch."),
        max_abs=max_abs,
        max_rel=max_rel,
        fp32_max_abs=fp32_abs,
        fp32_max_rel=fp32_rel,
        pytorch_fp32_max_abs=pytorch_fp32,
        rtol=rtol,
        atol=atol,
        within=within,
        note=note,
    )


def _fell_back(piece: Any) -> bool:
    """This piece instance runs in PyTorch because its engine failed (to build, or at run time);
    the eager engine's artifact is the canonical subgraph too, but it did not fail."""
    record = piece.record
    failed = record is not None and (record.status == "fallback" or bool(record.demotions))
    return piece.runner is piece.canonical and (record is None or failed)


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of an output (a tensor, or nested tuples, lists and dicts of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _errors(
    got: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], rtol: float, atol: float
) -> tuple[float, float, bool]:
    """(max abs difference, that over the reference's largest magnitude, all within tolerance)."""
    if len(got) != len(reference):
        return math.inf, math.inf, False
    max_abs = max_rel = 0.0
    within = True
    for g, r in zip(got, reference):
        g, r = g.detach().double(), r.detach().to(g.device).double()
        same = (g == r) | (g.isnan() & r.isnan())
        diff = torch.where(same, torch.zeros_like(g), (g - r).abs()).nan_to_num(nan=math.inf)
        if diff.numel() == 0:
            continue
        finite = r[r.isfinite()].abs()
        scale = float(finite.max()) if finite.numel() else 0.0
        tensor_abs = float(diff.max())
        tensor_rel = tensor_abs / scale if scale > 0 else (0.0 if tensor_abs == 0 else math.inf)
        max_abs, max_rel = max(max_abs, tensor_abs), max(max_rel, tensor_rel)
        within = within and bool((diff <= atol + rtol * r.abs().nan_to_num(nan=0.0)).all())
    return max_abs, max_rel, within


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
