"""trt-subgraph: inspect the engine cache, check 2:4 sparsity, export subgraphs as ONNX, compare
pieces with PyTorch, benchmark.

Every subcommand lives in its own module here (``cache``, ``sparsity``, ``export``, ``compare``,
``bench``) with an ``add_cli(subparsers)``. Building the parser and ``--help`` import no torch:
commands import what they need when they run.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["HelpFormatter", "add_command", "build_parser", "main", "make_writable_folder"]

_SUBCOMMANDS = ("cache", "sparsity", "export", "compare", "bench")

DESCRIPTION = """\
Tools around the trt_subgraph torch.compile backend: inspect or clean the persistent engine
cache, check which weights are 2:4 sparse, export each unique subgraph as ONNX, find the piece
that loses accuracy against PyTorch, and benchmark repeated-block models across backends."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default, unless
    the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.required or action.default is argparse.SUPPRESS:
            return text  # --help's default is SUPPRESS
        return f"{text} (default: %(default)s)"


def add_command(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand's parser, formatted like the main one."""
    return subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def make_writable_folder(path: Path) -> None:
    """Make `path` a folder (with its parents) that this process can write into, before a
    command's work, whose output would otherwise have nowhere to go; OSError when it cannot."""
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not writable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trt-subgraph", description=DESCRIPTION, formatter_class=HelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(_SUBCOMMANDS) + "}")
    for name in _SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``trt-subgraph``; returns the exit status. A closed output pipe (``| head``) ends quietly."""
    try:
        args = build_parser().parse_args(argv)
        status = int(args.func(args) or 0)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away: point stdout at devnull so the interpreter's final flush does
        # not fail again, and exit as a command killed by SIGPIPE would (128 + 13).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return status


if __name__ == "__main__":
    sys.exit(main())
