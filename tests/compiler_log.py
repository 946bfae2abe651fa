"""A C++ compiler wrapper that logs each run, for tests that count what a process compiles."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# The compiler as inductor would find it (CXX, else g++).
COMPILER = shutil.which(os.environ.get("CXX", "g++"))

needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")


def logging_compiler(directory: Path) -> Path:
    """An executable in `directory` that appends its arguments to ``$CXX_LOG`` and runs
    :data:`COMPILER` with them; give its path as ``CXX``."""
    wrapper = directory / "cxx"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "$CXX_LOG"\nexec {COMPILER} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def compiles(log: Path) -> list[str]:
    """Compiler runs that compile or preprocess something (not ``-v`` / ``--version`` queries)."""
    if not log.exists():
        return []
    return [line for line in log.read_text().splitlines() if line.strip() not in ("-v", "--version")]
