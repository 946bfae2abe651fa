"""Benchmark repeated-block models across torch.compile backends (``trt-subgraph bench``).

Importing this package is cheap (no torch import). The models live in
`trt_subgraph.bench.models`, the sweep in `.runner`, one case in `._case`, the tables and plots
in `.output`; the command line is `trt_subgraph.cli.bench`.
"""

from __future__ import annotations
