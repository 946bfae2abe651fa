"""``trt-subgraph compare --model package.module:factory``: which piece first loses accuracy."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import add_command

DESCRIPTION = """\
Run a model compiled with the trt_subgraph backend once and compare every engine piece with
PyTorch on the same intermediate inputs, in the model's dtype and in float32: per piece call its
fingerprint, module path, max abs and relative error, and the first piece over the tolerance
(by default 1e-5 for float32, 1e-3 for float16, 1e-2 for bfloat16, relative and absolute).

The factory is called without arguments and returns (model, example_inputs); its module is
looked up on the import path and in the current directory. Exit status: 0 when every piece is
within tolerance, 1 when one is not, 2 on bad input (options, tolerances, a factory that is
missing, raises or returns something else), 3 when compiling or running the model failed."""


def add_cli(subparsers: Any) -> None:
    """Register ``trt-subgraph compare``."""
    parser = add_command(
        subparsers,
        "compare",
        help="compare every engine piece with PyTorch on the same inputs; name the first over tolerance",
        description=DESCRIPTION,
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="callable returning (model, example_inputs), e.g. mypkg.models:make",
    )
    parser.add_argument(
        "--options",
        default="",
        metavar="K=V,...",
        help="options for the trt_subgraph backend, e.g. engine=inductor,min_block_size=2; a list in brackets: "
        "torch_executed_ops=[aten.gelu,aten.softmax] (default: none)",
    )
    parser.add_argument("--rtol", type=float, help="relative tolerance of every piece (default: by dtype)")
    parser.add_argument("--atol", type=float, help="absolute tolerance of every piece (default: by dtype)")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..comparing import check_arguments, compare
    from .bench import parse_kv
    from .export import model_and_inputs

    try:
        options = parse_kv(args.options)
        check_arguments(options, args.rtol, args.atol)
    except (ValueError, RuntimeError) as exc:
        print(f"trt-subgraph compare: error: {exc}", file=sys.stderr)
        return 2
    try:
        model, inputs = model_and_inputs(args.model)
    except (ValueError, TypeError, ImportError) as exc:
        print(f"trt-subgraph compare: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = compare(model, inputs, options, rtol=args.rtol, atol=args.atol)
    except Exception as exc:  # the arguments were checked: the model failed
        print(
            f"trt-subgraph compare: compiling or running the model failed: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return 3
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0 if result.first_over is None else 1
