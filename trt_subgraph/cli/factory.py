"""``--model package.module:factory``: find the factory a user names on the command line.

One helper for every subcommand (``export``, ``bench``): the module is looked up on the import
path and in the current working directory, as ``python -m`` would find it.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["check_factory_spec", "load_factory"]


def check_factory_spec(spec: str) -> tuple[str, str]:
    """(module, attribute) of ``package.module:factory``; ValueError for a spec of another form.
    Nothing is imported (the bench imports the module in each case's process)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"--model {spec!r}: expected 'package.module:factory' (a callable returning (model, example_inputs))"
        )
    return module_name, attr


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable that ``package.module:factory`` (or ``module:Class.method``) names.

    Raises ValueError for a spec of another form or one that names no callable; the module's
    own import errors propagate.
    """
    module_name, attr = check_factory_spec(spec)
    _with_working_directory()
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if not callable(obj):
        raise ValueError(f"--model {spec!r}: {attr!r} does not name a callable in module {module_name!r}")
    return obj


def _with_working_directory() -> None:
    """Put the working directory on the import path, as ``python -m`` and ``python -c`` do (a
    console script starts with its own directory there instead)."""
    cwd = os.getcwd()
    if not any(entry in ("", ".") or os.path.abspath(entry) == cwd for entry in sys.path):
        sys.path.insert(0, cwd)
