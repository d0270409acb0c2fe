"""The reaper: finds work that nobody will finish and publishes it again.

- a shard whose lease expired (its worker died: kill -9, node loss, OOM) goes back to pending and is re-enqueued;
  a training run then resumes from its latest recorded checkpoint; if its job has ended (cancelled, say), it is
  marked cancelled instead, so no shard stays `running` for ever;
- a job left `queued` with pending shards (the orchestrator died between creating the rows and publishing) gets its
  shards published;
- a shard `queued` for longer than `requeue_after` seconds while its queue is EMPTY lost its message (a broker
  restarted without persistence): it is published again. An empty queue is the guard: with a backlog, old queued
  shards are simply waiting. A duplicate this may create (a message a busy worker had reserved) is harmless:
  the claim skips a shard that is running or done.
Every change is a conditional UPDATE, so several reapers (one per worker node) never enqueue the same shard twice.
Runs as `orchestrator reap` and as a background thread in every worker's main process.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import and_, select, update

import kinds
from shared.db import session_scope
from shared.models import Job, Shard
from shared.settings import Settings
from shared.status import JobState, ShardState
from workers.bookkeeping import utcnow
from workers.dispatch import enqueue_shards, queue_for

log = logging.getLogger(__name__)

#: A job still `queued` this many seconds after creation is taken as orphaned by a crashed submitter.
STALE_QUEUED_SECONDS = 30.0


def reap(settings: Settings, stale_queued_seconds: float = STALE_QUEUED_SECONDS,
         requeue_after: float | None = None) -> list[tuple[str, int]]:
    now = utcnow()
    requeue_after = 2 * settings.lease_seconds if requeue_after is None else requeue_after
    reaped: list[tuple[str, int]] = []
    with session_scope(settings) as s:
        expired = s.execute(
            select(Shard.id, Shard.job_id, Shard.index)
            .join(Job, Job.id == Shard.job_id)
            .where(Shard.state == ShardState.RUNNING, Shard.lease_expires_at < now,
                   Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        ).all()
    for shard_id, job_id, index in expired:
        with session_scope(settings) as s:
            res = s.execute(
                update(Shard)
                .where(Shard.id == shard_id, Shard.state == ShardState.RUNNING, Shard.lease_expires_at < now)
                .values(state=ShardState.PENDING.value, lease_owner=None, lease_expires_at=None)
            )
        if res.rowcount == 1:
            enqueue_shards(settings, job_id, [index])
            reaped.append((job_id, index))
    _end_dead_shards_of_ended_jobs(settings, now)
    with session_scope(settings) as s:
        orphans = s.execute(
            select(Job.id).where(
                Job.state == JobState.QUEUED,
                Job.created_at < now - timedelta(seconds=stale_queued_seconds),
                select(Shard.id).where(and_(Shard.job_id == Job.id, Shard.state == ShardState.PENDING)).exists(),
            )
        ).scalars().all()
    for job_id in orphans:
        n = enqueue_shards(settings, job_id)
        reaped += [(job_id, -1)] * n
    reaped += _republish_lost(settings, now, requeue_after)
    if reaped:
        log.warning("reaper re-enqueued %d shard(s): %s", len(reaped), reaped[:10])
    return reaped


def _end_dead_shards_of_ended_jobs(settings: Settings, now) -> int:
    """A shard left `running` under an expired lease by a dead worker of a job that has ended (cancelled, or
    failed by another shard) will never be claimed again: mark it cancelled, so that status, the exporter and the
    report stop counting it as running. `resume` re-enqueues it like any other cancelled shard."""
    with session_scope(settings) as s:
        res = s.execute(
            update(Shard)
            .where(Shard.state == ShardState.RUNNING, Shard.lease_expires_at < now,
                   Shard.job_id.in_(select(Job.id).where(Job.state.in_([JobState.CANCELLED, JobState.FAILED,
                                                                         JobState.SUCCEEDED]))))
            .values(state=ShardState.CANCELLED.value, lease_owner=None, lease_expires_at=None, finished_at=now)
            .execution_options(synchronize_session=False)
        )
    if res.rowcount:
        log.warning("reaper: %d shard(s) of ended jobs left running by dead workers marked cancelled", res.rowcount)
    return res.rowcount


def _republish_lost(settings: Settings, now, requeue_after: float) -> list[tuple[str, int]]:

    cutoff = now - timedelta(seconds=requeue_after)
    with session_scope(settings) as s:
        stale = s.execute(
            select(Shard.id, Shard.job_id, Shard.index, Shard.enqueued_at, Job.kind)
            .join(Job, Job.id == Shard.job_id)
            .where(Shard.state == ShardState.QUEUED, Shard.enqueued_at < cutoff,
                   Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
            .limit(10000)
        ).all()
    if not stale:
        return []
    from workers.queues import queue_lengths

    lengths, _ = queue_lengths(settings)
    out = []
    for shard_id, job_id, index, enqueued_at, kind in stale:
        queue = queue_for(settings, kinds.get(kind).task)
        if lengths.get(queue, 1) != 0:
            continue  # a backlog: the message is most likely still waiting
        with session_scope(settings) as s:
            res = s.execute(
                update(Shard)
                .where(Shard.id == shard_id, Shard.state == ShardState.QUEUED, Shard.enqueued_at == enqueued_at)
                .values(state=ShardState.PENDING.value)
            )
        if res.rowcount == 1:
            enqueue_shards(settings, job_id, [index])
            out.append((job_id, index))
    return out


def start_reaper_thread(settings: Settings, interval: float | None = None) -> threading.Thread:
    interval = interval or max(1.0, settings.lease_seconds / 2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            try:
                reap(settings)
            except Exception as e:  # the DB may be away for a while: try again next round
                log.warning("reaper: %s", e)

    t = threading.Thread(target=loop, name="reaper", daemon=True)
    t.stop = stop  # type: ignore[attr-defined]
    t.start()
    return t
