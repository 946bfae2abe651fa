"""ONNX export of each unique subgraph, for users who build with trtexec or Polygraphy.

Every unique canonical subgraph becomes ``<fingerprint>.onnx`` with its weights as initializers
named by position (``w_0``, ``w_1``, ...), the same names for every instance, so one engine built
from the file can be refit with any instance's weights (TensorRT's ONNX refitter matches by
initializer name). ``index.json`` lists each file with its instance count, inputs and outputs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .engines.base import ACTIVATION, SYMINT, CanonicalSubgraph
from .engines.tensorrt import to_constant_module
from .fx_utils import output_values

__all__ = ["INDEX_FORMAT", "export_onnx", "export_subgraph"]

log = logging.getLogger(__name__)

INDEX_FORMAT = 1


def export_onnx(
    model: torch.nn.Module,
    *example_inputs: Any,
    out_dir: str | os.PathLike,
    opset: int = 18,
    **options: Any,
) -> dict[str, Any]:
    """Write one ONNX file per unique subgraph of ``model`` plus ``index.json``; return the index.

    ``options`` go to :func:`trt_subgraph.capture` (backend options such as ``min_block_size``).
    The weights written are the first instance's.
    """
    from . import __version__
    from .capturing import capture

    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 13:
        raise ValueError(f"trt_subgraph: opset must be an int >= 13, got {opset!r}")
    _require_onnxscript()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    captured = capture(model, *example_inputs, **options)
    entries = []
    for unit in captured.unique:
        sub = unit.sub
        path = out / f"{sub.fingerprint}.onnx"
        names = export_subgraph(sub, unit.instance_weights[0], path, opset=opset)
        entries.append(
            {
                "fingerprint": sub.fingerprint,
                "instances": len(unit.instance_weights),
                "file": path.name,
                "inputs": [_describe(name, val) for name, val in zip(names["inputs"], _activations(sub))],
                "outputs": [_describe(name, val) for name, val in zip(names["outputs"], _output_vals(sub))],
                "initializers": names["initializers"],
            }
        )
    index = {
        "format": INDEX_FORMAT,
        "trt_subgraph": __version__,
        "torch": torch.__version__,
        "opset": opset,
        "subgraphs": entries,
    }
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    log.info("trt_subgraph: wrote %d unique subgraphs to %s", len(entries), out)
    return index


def export_subgraph(
    sub: CanonicalSubgraph,
    weights: Sequence[torch.Tensor],
    path: str | os.PathLike,
    *,
    opset: int = 18,
) -> dict[str, list[str]]:
    """Export one instance of ``sub`` (its ``weights``) to ``path``; return the I/O and initializer names.

    Inputs keep the canonical placeholder names, outputs are ``out_0..``, weights ``w_0..`` (the
    exporter names initializers after the module's buffers), so the file is identical in structure
    and names for every instance.
    """
    import onnx

    _require_onnxscript()
    module = to_constant_module(sub, weights).eval()
    activations = [torch.zeros(tuple(v.shape), dtype=v.dtype, device=v.device) for v in _activations(sub)]
    input_names = [p.name for p, kind in zip(sub.placeholders, sub.input_kinds) if kind == ACTIVATION]
    output_names = [f"out_{i}" for i in range(len(_output_vals(sub)))]
    path = Path(path)
    # optimize=False: the optimizer folds constants, and a folded weight (w_0 transposed) would
    # become a new initializer that TensorRT's refitter cannot fill from the instance's w_0.
    program = torch.onnx.export(
        module,
        tuple(activations),
        dynamo=True,
        opset_version=opset,
        optimize=False,
        verbose=False,
        input_names=input_names,
        output_names=output_names,
    )
    program.save(str(path))
    initializers = [init.name for init in onnx.load(str(path), load_external_data=False).graph.initializer]
    renamed = sorted(set(f"w_{k}" for k in range(len(weights))) - set(initializers))
    if renamed:  # torch.onnx names initializers after the module's buffers; if that ever changes, stop
        raise RuntimeError(
            f"trt_subgraph: torch.onnx did not keep the weight names {renamed} as ONNX "
            f"initializers (found {initializers[:8]}); the exported file could not be refit by name"
        )
    return {"inputs": input_names, "outputs": output_names, "initializers": initializers}


def _require_onnxscript() -> None:
    """torch.onnx's exporter for ATen graphs (``dynamo=True``) is built on onnxscript."""
    if importlib.util.find_spec("onnxscript") is None:
        raise ImportError(
            "trt_subgraph: ONNX export needs the onnxscript package (pip install onnxscript); "
            "torch.onnx's TorchScript exporter cannot export ATen-level subgraphs"
        )


def _activations(sub: CanonicalSubgraph) -> list[torch.Tensor]:
    vals = []
    for kind, val in zip(sub.input_kinds, sub.example_inputs):
        if kind == SYMINT or (isinstance(val, torch.Tensor) and not all(isinstance(s, int) for s in val.shape)):
            raise ValueError(
                f"trt_subgraph: ONNX export needs static shapes; subgraph {sub.fingerprint} "
                "has symbolic sizes (capture with static example inputs)"
            )
        if kind == ACTIVATION:
            vals.append(val)
    return vals


def _output_vals(sub: CanonicalSubgraph) -> list[Any]:
    return [v.meta.get("val") if isinstance(v, torch.fx.Node) else v for v in output_values(sub.gm)]


def _describe(name: str, val: Any) -> dict[str, Any]:
    if isinstance(val, torch.Tensor):
        return {"name": name, "shape": list(val.shape), "dtype": str(val.dtype).removeprefix("torch.")}
    return {"name": name, "value": repr(val)}
