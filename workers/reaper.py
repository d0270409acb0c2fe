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

import kinds
from shared.models import utcnow
from shared.settings import Settings
from shared.store import store
from workers.dispatch import enqueue_shards, queue_for

log = logging.getLogger(__name__)

#: A job still `queued` this many seconds after creation is taken as orphaned by a crashed submitter.
STALE_QUEUED_SECONDS = 30.0


def reap(settings: Settings, stale_queued_seconds: float = STALE_QUEUED_SECONDS,
         requeue_after: float | None = None) -> list[tuple[str, int]]:
    now = utcnow()
    requeue_after = 2 * settings.lease_seconds if requeue_after is None else requeue_after
    st = store(settings)
    reaped: list[tuple[str, int]] = []
    for shard_id, job_id, index in st.expired_leases(now):
        if st.reset_expired(shard_id, now):
            enqueue_shards(settings, job_id, [index])
            reaped.append((job_id, index))
    _end_dead_shards_of_ended_jobs(settings, now)
    for job_id in st.orphaned_jobs(now - timedelta(seconds=stale_queued_seconds)):
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
    n = store(settings).cancel_expired_of_ended_jobs(now)
    if n:
        log.warning("reaper: %d shard(s) of ended jobs left running by dead workers marked cancelled", n)
    return n


def _republish_lost(settings: Settings, now, requeue_after: float) -> list[tuple[str, int]]:
    st = store(settings)
    stale = st.stale_queued(now - timedelta(seconds=requeue_after))
    if not stale:
        return []
    from workers.queues import queue_lengths

    lengths, _ = queue_lengths(settings)
    out = []
    for shard_id, job_id, index, enqueued_at, kind in stale:
        queue = queue_for(settings, kinds.get(kind).task)
        if lengths.get(queue, 1) != 0:
            continue  # a backlog: the message is most likely still waiting
        if st.requeue_lost(shard_id, enqueued_at):
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
