"""The orchestrator dies between creating a job and enqueuing its shards: `resume` or the reaper completes it."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from orchestrator import jobs
from orchestrator.submit import submitter
from shared.db import session_scope
from shared.models import Job, Shard
from shared.settings import Settings
from shared.status import JobState
from tests.faults.bench import Bench, Outcome, cli, conclude, fault_case, shards_in, wait_job
from tests.faults.conftest import assert_kept, run_case
from tests.faults.state import SMALL, SubmitterCrash, crash_before_publish, job_ids

submit_invert = submitter("invert")

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@fault_case("submitter")
def submitter_crash(bench: Bench) -> list[Outcome]:
    """The submitter dies after committing a job's rows and before publishing any shard: `orchestrator resume JOB`
    completes one such job, `orchestrator reap` (what every worker's reaper thread runs, here without waiting the
    30 s that mark a queued job as orphaned) the other. A crash inside the creating transaction leaves no row."""
    plan, s = SMALL, bench.fresh("submitter")
    outcomes = []
    with bench.cluster(s, "submitter") as cluster:
        cluster.start(2)
        for case, command in (("submitter crash -> resume", ("resume",)),
                              ("submitter crash -> reaper", ("reap", "--stale-after", "0"))):
            t0 = time.monotonic()
            before = job_ids(s)
            with crash_before_publish():
                try:
                    submit_invert(s, bench.inputs.args(plan))
                    crashed = False
                except SubmitterCrash:
                    crashed = True
            (job_id,) = job_ids(s) - before
            queued = jobs.get_job(s, job_id).state == JobState.QUEUED
            pending = shards_in(s, job_id, "pending") == plan.shards
            time.sleep(1.0)
            untouched = shards_in(s, job_id, "pending") == plan.shards  # nothing was published
            args = (command[0], job_id) if command[0] == "resume" else command
            run = cli(s, *args)
            wait_job(s, job_id)
            leftovers = shards_in(s, job_id, "pending", "queued", "running")
            checks = {
                "the submitter crashed after creating the rows": crashed and queued and pending,
                "no shard ran before recovery (no message existed)": untouched,
                f"`orchestrator {command[0]}` exited 0": run.returncode == 0,
                "no orphan rows (no shard left pending, queued or running)": leftovers == 0,
            }
            notes = [f"orchestrator {' '.join(args)}: {run.stdout.strip()} {run.stderr.strip()[-300:]}"]
            outcomes.append(conclude(bench, s, case, plan, job_id, 1, t0, checks, notes))
    outcomes[-1].checks["a crash inside create_job leaves no row"] = _crash_inside_create_job(s)
    return outcomes


def _crash_inside_create_job(settings: Settings) -> bool:
    """Two items with the same pair id make the creating transaction fail half-way: no job, shard or item row."""
    from sqlalchemy.exc import IntegrityError

    def counts():
        with session_scope(settings) as s:
            return tuple(s.execute(select(func.count()).select_from(t)).scalar_one() for t in (Job, Shard))

    before = counts()
    item = {"pair_id": "p", "split": "train", "rgb_path": "a", "ir_path": "b", "shard_index": 0}
    try:
        jobs.create_job(settings, "invert", {}, 2, [item, item])
    except IntegrityError:
        pass
    return counts() == before


@pytest.fixture(scope="module", params=["servers", "embedded"])
def submitter_outcomes(request):
    return {o.case: o for o in run_case(submitter_crash, request.getfixturevalue(f"{request.param}_bench"))}


def test_resume_completes_a_job_orphaned_before_publishing(submitter_outcomes):
    assert_kept(submitter_outcomes["submitter crash -> resume"])


def test_reaper_completes_a_job_orphaned_before_publishing(submitter_outcomes):
    assert_kept(submitter_outcomes["submitter crash -> reaper"])
