"""The 2:4 sparsity user API: ``from trt_subgraph import sparsity; sparsity.check(model)``.

The code lives in :mod:`trt_subgraph.sparse` (``sparse.analysis``); this module keeps the
documented import path.
"""

from __future__ import annotations

from .sparse.analysis import (
    KINDS,
    MIN_CHANNELS_TO_HELP,
    SPARSE_DTYPES,
    LayerSparsity,
    PruneReport,
    SparsityTable,
    analyze_weight,
    check,
    check_onnx,
    mask_2_4,
    prune_2_4,
)

__all__ = [
    "KINDS",
    "MIN_CHANNELS_TO_HELP",
    "SPARSE_DTYPES",
    "LayerSparsity",
    "PruneReport",
    "SparsityTable",
    "analyze_weight",
    "check",
    "check_onnx",
    "mask_2_4",
    "prune_2_4",
]
