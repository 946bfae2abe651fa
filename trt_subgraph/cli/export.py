"""``trt-subgraph export --onnx DIR --model package.module:factory``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import add_command, make_writable_folder

DESCRIPTION = """\
Write each unique subgraph of a model as one ONNX file and every instance's weights, for building
one TensorRT engine per subgraph and refitting it per instance.

Each ONNX file is named after the subgraph's fingerprint and holds the first instance's weights as
initializers named by position (w_0, w_1, ...), the same names for every instance. Instance i's
weights are in <fingerprint>.<i>.safetensors under those names. index.json lists each file with
its inputs and outputs, each instance's module path and the model parameter behind every w_k, and
the commands that build an engine with trt_refit.py (written next to the files) and refit a copy
of it per instance (TensorRT's ONNX refitter, which matches initializers by name).

The factory is called without arguments and returns (model, example_inputs); its module is
looked up on the import path and in the current directory.

Exit status: 0 when written; 2 on bad arguments, an --onnx folder that cannot be made or written,
or a factory that fails; 3 when compiling or exporting the model fails."""


def add_cli(subparsers: Any) -> None:
    """Register ``trt-subgraph export``."""
    parser = add_command(
        subparsers,
        "export",
        help="write each unique subgraph of a model as ONNX, with every instance's weights",
        description=DESCRIPTION,
    )
    parser.add_argument("--onnx", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="callable returning (model, example_inputs), e.g. mypkg.models:make",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 13 or newer")
    parser.add_argument(
        "--min-block-size",
        type=int,
        default=1,
        help="fewest compute ops in a subgraph; smaller pieces stay in PyTorch (the backend option)",
    )
    parser.set_defaults(func=run)


def model_and_inputs(spec: str) -> tuple[Any, tuple]:
    """Call the factory ``spec`` names and return its ``(model, example_inputs)``. Raises what
    ``load_factory`` raises, TypeError for a factory that takes arguments or returns something
    else, and ValueError naming the factory for anything else it raised."""
    import torch

    from .factory import load_factory

    factory = load_factory(spec)
    try:
        result = factory()
    except TypeError as exc:
        raise TypeError(f"trt_subgraph: {spec} must be callable without arguments ({exc})") from exc
    except Exception as exc:  # the user's factory failed
        raise ValueError(f"{spec} raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise TypeError(f"trt_subgraph: {spec} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def run(args: argparse.Namespace) -> int:
    from ..export import check_opset, export_onnx
    from ..options import Options

    if not args.onnx.strip():
        print(
            "trt-subgraph export: error: --onnx is empty (an unset shell variable?); give the output directory",
            file=sys.stderr,
        )
        return 2
    out = Path(args.onnx)
    try:
        Options.from_user({"min_block_size": args.min_block_size})
        check_opset(args.opset)
    except ValueError as exc:
        print(f"trt-subgraph export: error: {exc}", file=sys.stderr)
        return 2
    try:
        make_writable_folder(out)
    except OSError as exc:
        print(f"trt-subgraph export: error: --onnx {out}: cannot write there ({exc.strerror or exc})", file=sys.stderr)
        return 2
    try:
        model, inputs = model_and_inputs(args.model)
    except (ValueError, TypeError, ImportError) as exc:
        print(f"trt-subgraph export: error: {exc}", file=sys.stderr)
        return 2
    try:
        index = export_onnx(model, *inputs, out_dir=out, opset=args.opset, min_block_size=args.min_block_size)
    except ImportError as exc:  # onnxscript missing
        print(f"trt-subgraph export: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the arguments were checked: the model failed
        print(
            f"trt-subgraph export: compiling or exporting the model failed: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 3
    for entry in index["subgraphs"]:
        weights = sum(name.startswith("w_") for name in entry["initializers"])
        paths = ", ".join(i["module_path"] or "(model)" for i in entry["instance_weights"])
        print(f"{entry['file']}  instances={entry['instances']}  weights={weights}  modules: {paths}")
    print(f"{len(index['subgraphs'])} unique subgraphs, index: {Path(args.onnx) / 'index.json'}")
    return 0
