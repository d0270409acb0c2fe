"""`make venv TORCH=cpu` installs torch and torchvision from the CPU wheel index in one resolve, within the same
bounds as the pyproject's worker extra (so the pair stays matched); the default install has no extra index.

The CPU index cannot be reached from every machine, so this checks the recipe `make` would run, not a download."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path, *variables: str) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-n", "-B", "venv", f"VENV={tmp_path / 'v'}", *variables], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stdout.splitlines() if "pip install" in ln]


def _worker_bounds() -> dict[str, str]:
    """{torch: bounds, torchvision: bounds} as the pyproject's worker extra states them."""
    text = (ROOT / "pyproject.toml").read_text()
    return dict(re.findall(r'^\s*"(torch|torchvision)([<>=!][^"]*)"', text, flags=re.M))


def test_cpu_wheels_come_from_the_cpu_index_within_the_worker_bounds(tmp_path):
    lines = _recipe(tmp_path, "TORCH=cpu", "TORCH_CPU_INDEX=https://example.invalid/whl/cpu")
    cpu = [ln for ln in lines if "--index-url https://example.invalid/whl/cpu" in ln]
    assert len(cpu) == 1, lines
    bounds = _worker_bounds()
    assert set(bounds) == {"torch", "torchvision"}
    for name, spec in bounds.items():  # one resolve, both packages, the pyproject's own bounds
        assert f"'{name}{spec}'" in cpu[0], (name, spec, cpu[0])
    assert lines.index(cpu[0]) < next(i for i, ln in enumerate(lines) if "-e '.[" in ln)  # before the package


def test_the_default_install_uses_the_configured_index_only(tmp_path):
    lines = _recipe(tmp_path)
    assert not any("--index-url" in ln for ln in lines), lines
    assert any("-e '.[worker,dev]'" in ln for ln in lines)
