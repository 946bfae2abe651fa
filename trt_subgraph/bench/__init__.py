"""`trt-subgraph bench`: benchmark repeated-block models across torch.compile backends.

Importing this package is cheap (no torch import): the CLI imports it to register the
subcommand. The models live in `trt_subgraph.bench.models`, the sweep in `.runner`.
"""

from __future__ import annotations

from trt_subgraph.bench.cli import add_cli

__all__ = ["add_cli"]
