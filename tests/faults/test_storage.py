"""Artifact storage full, then not writable: a clear failure, nothing half-written recorded, and a retry completes
the job once storage is back. (Storage does not depend on the broker or database: the embedded default.)"""

from __future__ import annotations

import pytest

from tests.faults.conftest import assert_kept, run_case

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.fixture(scope="module")
def storage_outcomes(embedded_bench):
    return {o.case: o for o in run_case("storage", embedded_bench)}


def test_storage_full_fails_clearly_and_resumes(storage_outcomes):
    assert_kept(storage_outcomes["storage full"])


def test_storage_not_writable_fails_clearly_and_resumes(storage_outcomes):
    assert_kept(storage_outcomes["storage not writable"])
