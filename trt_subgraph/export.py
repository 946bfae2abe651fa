"""ONNX export of each unique subgraph with every instance's weights, for building with TensorRT.

Every unique canonical subgraph becomes ``<fingerprint>.onnx`` with its weights as initializers
named by position (``w_0``, ``w_1``, ...), the same names for every instance, so one engine built
from the file can be refit with any instance's weights (TensorRT's ONNX refitter matches by
initializer name). Each instance ``i`` (in the order the model runs them) gets
``<fingerprint>.<i>.safetensors``: its weights under those names. ``index.json`` lists each file
with its inputs and outputs, each instance's module path and the parameter or buffer of the
model behind each ``w_k``, and the commands that build one engine and refit it per instance with
``trt_refit.py`` (copied next to the files).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .engines.base import ACTIVATION, SYMINT, CanonicalSubgraph
from .engines.tensorrt import to_constant_module
from .fx_utils import output_values

__all__ = ["INDEX_FORMAT", "REFIT_SCRIPT", "export_onnx", "export_subgraph"]

log = logging.getLogger(__name__)

INDEX_FORMAT = 2
REFIT_SCRIPT = "trt_refit.py"


def check_opset(opset: Any) -> None:
    """ValueError unless `opset` is an int from 13 (the oldest torch.onnx exports) to the newest
    the installed onnx package knows (``onnx.defs.onnx_opset_version()``)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not 13 <= opset <= newest:
        raise ValueError(f"trt_subgraph: opset must be an int from 13 to {newest} (this onnx's newest), got {opset!r}")


def export_onnx(
    model: torch.nn.Module,
    *example_inputs: Any,
    out_dir: str | os.PathLike,
    opset: int = 18,
    **options: Any,
) -> dict[str, Any]:
    """Write every unique subgraph of ``model`` as ONNX and every instance's weights; return the index.

    Writes to ``out_dir`` (created if missing): ``<fingerprint>.onnx`` per unique subgraph (the
    first instance's weights inside), ``<fingerprint>.<i>.safetensors`` per instance ``i``,
    ``trt_refit.py`` and ``index.json`` (the returned index). Per subgraph the index gives
    ``instance_weights``: for each instance its ``module_path`` (``layers.3``; '' for the model
    itself), its ``file``, ``weights`` mapping each ``w_k`` to the name of the model's parameter
    or buffer it holds (None where it is none of them: a constant of the traced graph), and its
    ``refit`` command; and ``build``, the command that builds the engine those refit. Commands
    run in ``out_dir``.

    ``options`` go to :func:`trt_subgraph.capture` (backend options such as ``min_block_size``).
    Raises ValueError for an opset outside :func:`check_opset`'s range or symbolic shapes,
    ImportError without onnxscript.
    """
    from . import __version__
    from .capturing import capture

    check_opset(opset)
    _require_onnxscript()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    captured = capture(model, *example_inputs, **options)
    names_of = _parameter_names(model)
    entries = []
    for unit in captured.unique:
        sub = unit.sub
        path = out / f"{sub.fingerprint}.onnx"
        first = unit.instance_weights[0]
        names = export_subgraph(sub, first, path, opset=opset)
        plan = f"{sub.fingerprint}.plan"
        instances = []
        for i, (weights, module_path) in enumerate(zip(unit.instance_weights, unit.instance_paths)):
            # None: a weight the traced graph holds itself, the same for every instance
            weights = [w if w is not None else f for w, f in zip(weights, first)]
            mapping = {f"w_{k}": names_of.get(id(w)) for k, w in enumerate(weights)}
            weights_file = out / f"{sub.fingerprint}.{i}.safetensors"
            _save_weights(weights, weights_file, sub.fingerprint, i, module_path, mapping)
            instances.append(
                {
                    "module_path": module_path,
                    "file": weights_file.name,
                    "weights": mapping,
                    "refit": _command("refit", plan, path.name, weights_file.name, f"{sub.fingerprint}.{i}.plan"),
                }
            )
        entries.append(
            {
                "fingerprint": sub.fingerprint,
                "instances": len(instances),
                "file": path.name,
                "inputs": [_describe(name, val) for name, val in zip(names["inputs"], _activations(sub))],
                "outputs": [_describe(name, val) for name, val in zip(names["outputs"], _output_vals(sub))],
                "initializers": names["initializers"],
                "build": _command("build", path.name, plan),
                "instance_weights": instances,
            }
        )
    shutil.copyfile(Path(__file__).with_name(REFIT_SCRIPT), out / REFIT_SCRIPT)
    index = {
        "format": INDEX_FORMAT,
        "trt_subgraph": __version__,
        "torch": torch.__version__,
        "opset": opset,
        "refit_script": REFIT_SCRIPT,
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


def _parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """id of each parameter and buffer of `model` -> its name (the first name of a tied one)."""
    names: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        names.setdefault(id(tensor), name)
    return names


def _save_weights(
    weights: Sequence[torch.Tensor], path: Path, fingerprint: str, instance: int, module_path: str, mapping: dict
) -> None:
    """One instance's weights as ``w_k``; the metadata repeats what the index says of them."""
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share memory (tied weights, views of one buffer)
    tensors = {f"w_{k}": w.detach().to("cpu").contiguous().clone() for k, w in enumerate(weights)}
    metadata = {
        "fingerprint": fingerprint,
        "instance": str(instance),
        "module_path": module_path,
        "weights": json.dumps(mapping),
    }
    save_file(tensors, str(path), metadata=metadata)


def _command(*args: str) -> str:
    return shlex.join(["python", REFIT_SCRIPT, *args])


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
