"""A checkpoint that needs code to load is refused, and the code never runs: the marker file its pickle would
create stays absent (the classifier loader of eval-fid, and torch-fidelity's Inception loader, which itself passes
weights_only=False)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.errors import UserError
from workers.ml import weights


class _Evil:
    """Unpickling this calls open(marker, "w"): a stand-in for any command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1), "x": _Evil(marker)}, "config": {}}, path)
    return path, marker


def test_the_fixture_really_runs_code_when_unpickled(tmp_path, monkeypatch):
    monkeypatch.delenv(weights.FORCE_ENV, raising=False)
    path, marker = _evil_checkpoint(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()  # so its absence below means the loader refused it


def test_classifier_checkpoint_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    from workers.tasks.ncsn import load_classifier_checkpoint

    monkeypatch.delenv(weights.FORCE_ENV, raising=False)  # our own loader is safe without the process-wide switch
    path, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(UserError, match="refused") as e:
        load_classifier_checkpoint(str(path), "cpu")
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_third_party_weights_only_false_is_overridden(tmp_path, monkeypatch):
    """torch-fidelity calls torch.load(path, weights_only=False) on --inception-weights: the extractor forces
    weights-only loads first, so a crafted weights file fails to load instead of running."""
    import pickle

    from workers.ml.fid import _InceptionExtractor

    monkeypatch.delenv(weights.FORCE_ENV, raising=False)
    path, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        _InceptionExtractor(path, torch.float32)
    assert not marker.exists()


def test_workers_force_weights_only_for_their_process_tree(tmp_path):
    import os
    import subprocess
    import sys

    path, marker = _evil_checkpoint(tmp_path)
    code = ("import workers.celery_app, torch, sys; torch.load(sys.argv[1], weights_only=False)")
    env = {k: v for k, v in os.environ.items() if k != weights.FORCE_ENV}
    r = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "UnpicklingError" in r.stderr
    assert not marker.exists()
