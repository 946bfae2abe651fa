"""trt_subgraph: a torch.compile backend that builds one engine per structurally unique subgraph.

``torch.compile(model, backend="trt_subgraph")`` works without importing this package (entry
point ``torch_dynamo_backends``). Importing it gives the report and the helpers.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .capture import Capture, capture
from .report import last_report, reports

__all__ = ["Capture", "__version__", "capture", "last_report", "reports"]
