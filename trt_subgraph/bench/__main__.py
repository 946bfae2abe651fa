"""`python -m trt_subgraph.bench ...`: same as `trt-subgraph bench ...`."""

from __future__ import annotations

import sys

from trt_subgraph.cli.bench import main

sys.exit(main())
