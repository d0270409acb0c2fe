"""Fixtures of the training-script tests."""

from __future__ import annotations

import signal

import pytest
import torch


@pytest.fixture
def in_process(monkeypatch):
    """Run a training script's ``main`` in this process: no torchrun variables, and pytest's signal handlers put
    back after."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add contention on a shared machine
    yield
    torch.set_num_threads(threads)
    for s, h in old.items():
        signal.signal(s, h)
