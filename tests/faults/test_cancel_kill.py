"""A cancel, then kill -9 of the node running a shard: the shard must not stay `running` under its dead owner's
expired lease. The surviving node's reaper marks it cancelled (its job is cancelled); `status` and the exporter
agree; `resume` then re-runs it and the job succeeds."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from orchestrator import jobs, queries
from orchestrator.exporter import db_gauges
from orchestrator.submit import submitter
from shared.db import session_scope
from shared.models import Shard
from shared.status import JobState, ShardState
from tests.faults import cluster as cl
from tests.faults.bench import LEASE_SECONDS, shards_in, short_lease, wait_job, wait_running_on
from tests.faults.state import SMALL

submit_invert = submitter("invert")

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_cancel_then_kill_leaves_no_shard_running(backend, fault_inputs, tmp_path):
    # real `orchestrator worker` nodes (no fork server: this test needs no fault-free reference either)
    s = short_lease(backend)
    with cl.Cluster(s, tmp_path / "logs") as cluster:
        a, _b = cluster.start(2, warm=False, ready_timeout=400)
        job_id = submit_invert(s, fault_inputs.args(SMALL))
        r = wait_running_on(s, job_id, cluster, a, timeout=400)
        jobs.cancel(s, job_id)
        a.kill_node()  # at once: before the shard's once-a-second cancel check can release it
        # the lease expires after LEASE_SECONDS; the other node's reaper runs every LEASE_SECONDS / 2
        cl.wait_for(lambda: _state(s, job_id, r.index) != ShardState.RUNNING, LEASE_SECONDS + 60, 0.2,
                    "the killed shard to leave running")
        # the other node's shards stop themselves (after loading their model, on a cold node)
        cl.wait_for(lambda: shards_in(s, job_id, ShardState.RUNNING) == 0, 400, 0.2, "no shard left running")
        st = queries.job_status(s, job_id)
        _, gauges = db_gauges(s)
        assert st["state"] == JobState.CANCELLED
        assert "running" not in st["shards_by_state"] and st["running"] == []
        assert gauges["running"] == 0, gauges
        assert _state(s, job_id, r.index) == ShardState.CANCELLED  # cancelled, not pending
        # resume picks the cancelled shards up again, the killed one included
        assert jobs.resume(s, job_id) > 0
        job = wait_job(s, job_id, timeout=400)
    assert job.state == JobState.SUCCEEDED, job.error


def _state(s, job_id: str, index: int) -> str:
    with session_scope(s) as sess:
        return sess.execute(select(Shard.state).where(Shard.job_id == job_id, Shard.index == index)).scalar_one()
