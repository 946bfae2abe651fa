"""2:4 structured sparsity, from analysis to runtime.

- ``analysis``: which conv/linear weights are 2:4 and eligible for sparse kernels, and pruning
  (the user API: :func:`check`, :func:`prune_2_4`, :func:`check_onnx`, re-exported here and by
  ``trt_subgraph.sparsity``);
- ``cusparselt``: a ctypes binding to cuSPARSELt with plans built once;
- ``runtime``: the graph rewrite that routes 2:4 linears, and 1x1 convolutions of channels-last
  inputs, through ``trt_subgraph::sparse_linear`` for the inductor engine (imported by the
  pipeline, not here).
"""

from __future__ import annotations

from .analysis import *  # noqa: F403  (the user API)
from .analysis import __all__ as __all__
