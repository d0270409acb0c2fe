"""Imports run one way: the control plane (orchestrator/) may use workers/ and shared/, never the other way round,
and shared/ uses neither."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(package: str) -> list[tuple[str, str]]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(str(path.relative_to(ROOT)), a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((str(path.relative_to(ROOT)), node.module))
    return out


def test_workers_and_shared_never_import_the_control_plane():
    upward = [(f, m) for pkg in ("workers", "shared") for f, m in _imports(pkg)
              if m == "orchestrator" or m.startswith("orchestrator.")]
    assert not upward, upward


def test_shared_imports_no_worker_code():
    assert not [(f, m) for f, m in _imports("shared") if m == "workers" or m.startswith("workers.")]


def test_kinds_never_import_the_control_plane():
    """Workers read the kinds (routes, work, finalisers), so a kind reaching into orchestrator/ would run upward."""
    assert not [(f, m) for f, m in _imports("kinds") if m == "orchestrator" or m.startswith("orchestrator.")]
    assert not [(f, m) for f, m in _imports("shared") if m == "kinds" or m.startswith("kinds.")]
