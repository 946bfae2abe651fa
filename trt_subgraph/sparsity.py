"""The 2:4 sparsity user API: ``from trt_subgraph import sparsity; sparsity.check(model)``.

The code lives in :mod:`trt_subgraph.sparse` (``sparse.analysis``); this module keeps the
documented import path.
"""

from __future__ import annotations

from .sparse.analysis import *  # noqa: F403  (the user API: analysis.__all__)
from .sparse.analysis import KINDS, MIN_CHANNELS_TO_HELP, SPARSE_DTYPES
from .sparse.analysis import __all__ as _API

__all__ = [*_API, "KINDS", "MIN_CHANNELS_TO_HELP", "SPARSE_DTYPES"]
