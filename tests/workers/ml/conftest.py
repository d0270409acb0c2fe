"""Shared fixtures of the ML tests: a tiny Stable Diffusion in the diffusers layout and a small synthetic M3FD."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.threads import torch_threads
from workers.fixtures.m3fd import write_synthetic
from workers.fixtures.tiny_sd import write_tiny_sd
from workers.ml.sd import SDParts, load_sd


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with one intra-op thread (use with ``pytest.mark.usefixtures``)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised SD (real classes, SD 1.x scheduler) written once per test session."""
    with torch_threads(1):
        return write_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir: Path) -> SDParts:
    """The tiny SD loaded on CPU in float32 through the same path as real weights."""
    with torch_threads(1):
        return load_sd(str(tiny_sd_dir))


@pytest.fixture(scope="session")
def m3fd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic 128x96 pairs in the flat M3FD_Detection layout (Vis/, Ir/, Annotation/)."""
    root = tmp_path_factory.mktemp("m3fd") / "M3FD_Detection"
    write_synthetic(root, n_pairs=6, width=128, height=96, seed=0)
    return root
