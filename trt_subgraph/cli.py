"""``trt-subgraph``: cache, sparsity, export and bench subcommands."""
from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = ("cache", "sparsity", "export", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trt-subgraph", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMANDS:
        importlib.import_module(f"trt_subgraph.{name}").add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
