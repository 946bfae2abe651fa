"""``trt-subgraph sparsity MODEL.onnx [--json]``: which weights of an ONNX model are 2:4 and eligible."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import add_command

DESCRIPTION = """\
Check every Conv, Gemm and MatMul weight of an ONNX model against TensorRT's 2:4
structured-sparsity rule and say why the others are not eligible (also the integer weights
of INT8 Q/DQ models)."""


def add_cli(subparsers: Any) -> None:
    """Register ``trt-subgraph sparsity``."""
    p = add_command(
        subparsers,
        "sparsity",
        help="report which Conv/Gemm/MatMul weights of an ONNX model are 2:4 sparse and eligible",
        description=DESCRIPTION,
    )
    p.add_argument("model", metavar="MODEL.onnx", help="path to the ONNX model")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..sparse.analysis import check_onnx

    try:
        table = check_onnx(args.model)
    except (OSError, ValueError) as e:
        print(f"trt-subgraph sparsity: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(table.to_dict(), indent=2) if args.json else table)
    return 0
