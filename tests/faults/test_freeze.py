"""SIGSTOP past the lease of a training worker: its supervisor alone, and the whole worker with its torchrun group
(both backends). The lease fences the stale attempt (tests/faults/training.py)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import assert_kept, run_case

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_frozen_training_worker(bench):
    outcomes = run_case("freeze_training", bench)
    assert [o.case for o in outcomes] == ["frozen training worker (supervisor SIGSTOP)",
                                          "frozen training worker (whole worker SIGSTOP)"]
    for out in outcomes:
        assert_kept(out)
