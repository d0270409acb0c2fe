"""Every shard whose lease expired ends in a true state: re-queued if its job is live, cancelled if it ended."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from orchestrator import jobs
from shared.db import session_scope
from shared.models import Shard
from shared.status import ShardState
from workers import bookkeeping as bk
from workers.reaper import reap


def _expire(s, job_id: str, index: int) -> None:
    with session_scope(s) as ss:
        ss.execute(update(Shard).where(Shard.job_id == job_id, Shard.index == index)
                   .values(lease_expires_at=bk.utcnow() - timedelta(seconds=5)))


def _state(s, job_id: str, index: int) -> str:
    with session_scope(s) as ss:
        return ss.execute(select(Shard.state).where(Shard.job_id == job_id, Shard.index == index)).scalar_one()


def test_expired_shards_end_cancelled_or_requeued(embedded):
    s = embedded
    live = jobs.create_job(s, "invert", {}, 1)
    ended = jobs.create_job(s, "invert", {}, 2)
    for job_id, index in ((live, 0), (ended, 0), (ended, 1)):
        assert bk.claim_shard(s, job_id, index, bk.make_owner()).ok
    _expire(s, ended, 1)  # its worker died before the cancel
    assert jobs.cancel(s, ended) == "cancelled"
    assert _state(s, ended, 1) == ShardState.CANCELLED  # at once: no live worker will ever notice the cancel
    assert _state(s, ended, 0) == ShardState.RUNNING  # its worker is alive and stops itself
    # ... unless it dies too: once its lease expires, the reaper ends it
    _expire(s, ended, 0)
    _expire(s, live, 0)
    reaped = reap(s)
    assert _state(s, ended, 0) == ShardState.CANCELLED
    assert (live, 0) in reaped and _state(s, live, 0) == ShardState.QUEUED
