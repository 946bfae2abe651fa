"""``python -m trt_subgraph ...``: same as ``trt-subgraph ...``."""

from __future__ import annotations

import sys

from trt_subgraph.cli import main

sys.exit(main())
