"""Publishing shard messages: batched on one producer connection, then recorded in the DB.

Messages carry only (job_id, shard_index): everything else is read from the DB, so a message can be replayed, a
duplicate is harmless, and Flower shows short, readable arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from celery import Celery
from sqlalchemy import select, update

from shared import constants as C
from shared.db import session_scope
from shared.models import Job, Shard
from shared.settings import Settings
from shared.status import JobState, ShardState
from workers.bookkeeping import utcnow


@lru_cache(maxsize=8)
def _app_for(settings: Settings) -> Celery:
    from workers.celery_app import make_app

    return make_app(settings)


def get_app(settings: Settings) -> Celery:
    return _app_for(settings)


def enqueue_shards(settings: Settings, job_id: str, indices: Sequence[int] | None = None) -> int:
    """Publish one message per shard (all of the job's unfinished shards when `indices` is None).

    Shards go from pending to queued only after their message is out; a claim that already moved a shard to running
    is never overwritten (the UPDATE is conditional on state = pending).
    """
    with session_scope(settings) as s:
        kind = s.execute(select(Job.kind).where(Job.id == job_id)).scalar_one()
        if indices is None:
            indices = list(
                s.execute(
                    select(Shard.index)
                    .where(Shard.job_id == job_id, Shard.state == ShardState.PENDING)
                    .order_by(Shard.index)
                ).scalars()
            )
    if not indices:
        return 0
    task_name = C.TASK_FOR_KIND[kind]
    app = get_app(settings)
    task = app.signature(task_name)
    with app.producer_or_acquire() as producer:
        for i in indices:
            task.clone(kwargs={"job_id": job_id, "shard_index": int(i)}).apply_async(producer=producer)
    now = utcnow()
    with session_scope(settings) as s:
        for start in range(0, len(indices), 5000):
            chunk = [int(i) for i in indices[start : start + 5000]]
            s.execute(
                update(Shard)
                .where(Shard.job_id == job_id, Shard.index.in_(chunk), Shard.state == ShardState.PENDING)
                .values(state=ShardState.QUEUED.value, enqueued_at=now)
            )
        s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED).values(state=JobState.RUNNING.value))
    return len(indices)
