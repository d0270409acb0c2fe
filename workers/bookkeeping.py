"""Exactly-once effects on at-least-once delivery: shard claims, leases with heartbeat, idempotent completion.

A shard is keyed (job_id, index). A delivery first *claims* it in the DB: done or cancelled shards are skipped, a live
lease held by someone else makes the delivery exit, an expired lease is taken over. While the work runs a heartbeat
thread renews the lease and watches for cancellation. Completion is one transaction that re-checks the lease, records
the outputs with upserts, marks the shard done and bumps the job's counter; the transaction that makes
shards_done == shards_total also ends the job (and runs its finaliser). No Celery chord is involved.

This module knows the DB and nothing of Celery, so the fault tests can drive it directly.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared import constants as C
from shared.db import session_scope
from shared.models import Job, Shard
from shared.settings import Settings
from shared.status import JobState, ShardState

log = logging.getLogger(__name__)

#: Called inside the completing transaction when a job's last shard finishes: kind -> fn(session, job).
FINALIZERS: dict[str, Callable[[Session, Job], None]] = {}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything we store is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=timezone.utc)


def make_owner(task_id: str | None = None) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{task_id or uuid.uuid4().hex[:12]}"


@dataclass
class Claim:
    ok: bool
    reason: str
    shard_id: int | None = None
    attempt: int = 0
    spec: dict[str, Any] = field(default_factory=dict)
    kind: str = ""
    #: set when another owner's lease is live: seconds until it would expire
    retry_in: float | None = None


def claim_shard(settings: Settings, job_id: str, index: int, owner: str) -> Claim:
    """Take the lease of shard (job_id, index) for `owner`, unless it is done, cancelled or leased by someone alive."""
    now = utcnow()
    with session_scope(settings) as s:
        shard = s.execute(
            select(Shard).where(Shard.job_id == job_id, Shard.index == index).with_for_update()
        ).scalar_one_or_none()
        if shard is None:
            return Claim(False, f"unknown shard {job_id}/{index}")
        job = s.get(Job, job_id)
        if job.state == JobState.CANCELLED or shard.state == ShardState.CANCELLED:
            return Claim(False, "cancelled")
        if job.state in (JobState.SUCCEEDED,) or shard.state == ShardState.DONE:
            return Claim(False, "already done")
        if shard.state == ShardState.FAILED and job.state == JobState.FAILED:
            return Claim(False, "failed; use `orchestrator retry JOB --failed`")
        expires = aware(shard.lease_expires_at)
        if (
            shard.state == ShardState.RUNNING
            and shard.lease_owner not in (None, owner)
            and expires is not None
            and expires > now
        ):
            return Claim(False, f"leased by {shard.lease_owner} until {expires.isoformat()}",
                         retry_in=(expires - now).total_seconds() + 1.0)
        shard.state = ShardState.RUNNING.value
        shard.attempts += 1
        shard.lease_owner = owner
        shard.lease_expires_at = now + timedelta(seconds=settings.lease_seconds)
        shard.worker = owner.rsplit(":", 1)[0]
        shard.started_at = now
        shard.error = None
        if job.state == JobState.QUEUED:
            job.state = JobState.RUNNING.value
        if job.started_at is None:
            job.started_at = now
        return Claim(True, "claimed", shard.id, shard.attempts, dict(job.spec), job.kind)


class LeaseLost(Exception):
    """Another delivery took the shard over (our lease expired): our results must not be recorded."""


class Cancelled(Exception):
    """The job was cancelled while this shard ran."""


class Heartbeat:
    """Renews a lease in a background thread; exposes `cancelled` and `lost` events to the work loop.

    Progress set with `progress(...)` is written with the next beat, so reporting it costs no extra transaction.
    """

    def __init__(self, settings: Settings, shard_id: int, job_id: str, owner: str, interval: float | None = None):
        self.settings, self.shard_id, self.job_id, self.owner = settings, shard_id, job_id, owner
        self.interval = interval or settings.lease_seconds / C.HEARTBEATS_PER_LEASE
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._progress: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}-{shard_id}", daemon=True)

    def progress(self, **values: Any) -> None:
        self._progress = values

    def beat(self) -> None:
        values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=self.settings.lease_seconds)}
        if self._progress is not None:
            values["progress"] = self._progress
        with session_scope(self.settings) as s:
            res = s.execute(
                update(Shard)
                .where(Shard.id == self.shard_id, Shard.lease_owner == self.owner, Shard.state == ShardState.RUNNING)
                .values(**values)
            )
            state = s.execute(select(Job.state).where(Job.id == self.job_id)).scalar_one()
        if res.rowcount == 0:
            self.lost.set()
        if state == JobState.CANCELLED:
            self.cancelled.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as e:  # a DB blip must not kill the work; the lease just ages
                log.warning("heartbeat failed: %s", e)

    def check(self) -> None:
        """Raise when the work should stop: call it between batches."""
        if self.lost.is_set():
            raise LeaseLost(f"lease on shard {self.shard_id} was taken over")
        if self.cancelled.is_set():
            raise Cancelled(self.job_id)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def complete_shard(
    settings: Settings,
    job_id: str,
    index: int,
    owner: str,
    record: Callable[[Session], None],
    result: dict[str, Any] | None = None,
) -> bool:
    """Record a shard's outputs and mark it done, exactly once. Returns False when the lease was lost.

    `record(session)` writes the outputs with upserts inside the same transaction, so either everything about the
    shard is recorded, or nothing is.
    """
    now = utcnow()
    with session_scope(settings) as s:
        res = s.execute(
            update(Shard)
            .where(
                Shard.job_id == job_id,
                Shard.index == index,
                Shard.lease_owner == owner,
                Shard.state == ShardState.RUNNING,
            )
            .values(
                state=ShardState.DONE.value, finished_at=now, lease_owner=None, lease_expires_at=None, result=result
            )
        )
        if res.rowcount != 1:
            s.rollback()
            return False
        record(s)
        s.execute(update(Job).where(Job.id == job_id).values(shards_done=Job.shards_done + 1))
        job = s.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one()
        s.refresh(job)
        if job.shards_done == job.shards_total and job.state == JobState.RUNNING:
            finalizer = FINALIZERS.get(job.kind)
            if finalizer is not None:
                finalizer(s, job)
            job.state = JobState.SUCCEEDED.value
            job.finished_at = now
    return True


def fail_shard(settings: Settings, job_id: str, index: int, owner: str, error: str) -> None:
    """Mark a shard failed (if we still hold it) and the job failed with the shard's error."""
    now = utcnow()
    with session_scope(settings) as s:
        res = s.execute(
            update(Shard)
            .where(Shard.job_id == job_id, Shard.index == index, Shard.lease_owner == owner)
            .values(state=ShardState.FAILED.value, finished_at=now, lease_owner=None, lease_expires_at=None,
                    error=error[:4000])
        )
        if res.rowcount != 1:
            return
        s.execute(update(Job).where(Job.id == job_id).values(shards_failed=Job.shards_failed + 1))
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
            .values(state=JobState.FAILED.value, finished_at=now, error=f"shard {index}: {error}"[:4000])
        )


def release_cancelled(settings: Settings, job_id: str, index: int, owner: str) -> bool:
    """A shard stopped because its job was cancelled: mark it cancelled, or, when the job was resumed meanwhile,
    pending again. Returns True when it must be re-enqueued."""
    with session_scope(settings) as s:
        state = s.execute(select(Job.state).where(Job.id == job_id)).scalar_one()
        new = ShardState.CANCELLED if state == JobState.CANCELLED else ShardState.PENDING
        res = s.execute(
            update(Shard)
            .where(Shard.job_id == job_id, Shard.index == index, Shard.lease_owner == owner)
            .values(state=new.value, lease_owner=None, lease_expires_at=None)
        )
        return res.rowcount == 1 and new == ShardState.PENDING


def release_for_retry(settings: Settings, job_id: str, index: int, owner: str, error: str) -> None:
    """A transient failure (DB or broker blip): give the lease up so the retried delivery can claim at once."""
    with session_scope(settings) as s:
        s.execute(
            update(Shard)
            .where(Shard.job_id == job_id, Shard.index == index, Shard.lease_owner == owner)
            .values(state=ShardState.QUEUED.value, lease_owner=None, lease_expires_at=None, error=error[:4000])
        )
