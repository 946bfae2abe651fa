"""trt_subgraph: a torch.compile backend that builds one engine per structurally unique subgraph.

``torch.compile(model, backend="trt_subgraph")`` works without importing this package (entry
point ``torch_dynamo_backends``). Importing it gives the report and the helpers; it imports no
torch until one of them is used (the ``trt-subgraph`` command line stays fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._state import reset

__version__ = "0.1.0"

__all__ = [
    "Capture",
    "Comparison",
    "__version__",
    "capture",
    "compare",
    "last_report",
    "load",
    "reports",
    "reset",
    "save",
]

# name -> module that defines it, imported on first use (``capturing``, not ``capture``: a
# submodule named like the function would replace it as the package's attribute once imported)
_LAZY = {
    "Capture": "capturing",
    "capture": "capturing",
    "Comparison": "comparing",
    "compare": "comparing",
    "last_report": "report",
    "load": "saved",
    "reports": "report",
    "save": "saved",
}

if TYPE_CHECKING:
    from .capturing import Capture, capture
    from .comparing import Comparison, compare
    from .report import last_report, reports
    from .saved import load, save


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
