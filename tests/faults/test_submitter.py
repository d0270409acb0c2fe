"""The orchestrator dies between creating a job and enqueuing its shards: `resume` or the reaper completes it."""

from __future__ import annotations

import pytest

from tests.faults.conftest import assert_kept, run_case

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.fixture(scope="module", params=["servers", "embedded"])
def submitter_outcomes(request):
    return {o.case: o for o in run_case("submitter", request.getfixturevalue(f"{request.param}_bench"))}


def test_resume_completes_a_job_orphaned_before_publishing(submitter_outcomes):
    assert_kept(submitter_outcomes["submitter crash -> resume"])


def test_reaper_completes_a_job_orphaned_before_publishing(submitter_outcomes):
    assert_kept(submitter_outcomes["submitter crash -> reaper"])
