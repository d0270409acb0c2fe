"""Exactly-once effects on at-least-once delivery: shard claims, leases with heartbeat, idempotent completion.

A shard is keyed (job_id, index). A delivery first *claims* it in the DB: done or cancelled shards are skipped, a live
lease held by someone else makes the delivery exit, an expired lease is taken over. While the work runs a heartbeat
thread renews the lease and watches for cancellation. Completion is one transaction that re-checks the lease, records
the outputs with upserts, marks the shard done and bumps the job's counter; the transaction that makes
shards_done == shards_total also ends the job (and runs its finaliser). No Celery chord is involved.

This module knows the DB and nothing of Celery, so the fault tests can drive it directly.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import JSON, and_, bindparam, case, func, literal_column, or_, select, update
from sqlalchemy.orm import Session

import kinds
from shared import constants as C
from shared.db import session_scope, transaction
from shared.models import Job, Shard
from shared.settings import Settings
from shared.status import JobState, ShardState
from workers.poison import wrong_task
from workers.renewer import Renewer

log = logging.getLogger(__name__)

#: Longest time (s) a running shard takes to notice that its job was cancelled (Heartbeat.poll).
CANCEL_POLL_SECONDS = 1.0

def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything we store is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=timezone.utc)


def make_owner(task_id: str | None = None, node: str | None = None) -> str:
    """A lease owner `node:pid:task_id`. `node` is the Celery node name (`name@host`, what Flower lists), so the
    shard's worker column (`node:pid`) names the worker the way Flower does; the host name outside a worker."""
    return f"{node or socket.gethostname()}:{os.getpid()}:{task_id or uuid.uuid4().hex[:12]}"


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


# -- the hot path's statements ------------------------------------------------------------------------------------------
# Built once and executed on the session's connection with bound parameters: a shard's claim and completion are
# four statements in two transactions, and building ORM statements anew for each costs more CPU than running them.

_shards, _jobs = Shard.__table__, Job.__table__
_TS = _shards.c.started_at.type


def _p(name: str, type_=None):
    return bindparam(name, type_=type_)


def _one_of(column, values: list[str]):
    """``column IN ('a', 'b')`` with the values inlined: our own constants, so the statement needs no per-execution
    expansion of an IN-list parameter (SQLAlchemy's "postcompile" step)."""
    return column.in_([literal_column("'" + v.replace("'", "''") + "'") for v in values])


#: Take the lease of a claimable shard (pending or queued, or running under no/our/an expired lease) of a live job.
_TAKE = (
    _shards.update()
    .where(
        _shards.c.job_id == _p("p_job"),
        _shards.c.index == _p("p_index"),
        or_(
            _one_of(_shards.c.state, [ShardState.PENDING.value, ShardState.QUEUED.value]),
            and_(
                _shards.c.state == ShardState.RUNNING.value,
                or_(_shards.c.lease_owner.is_(None), _shards.c.lease_owner == _p("p_owner"),
                    _shards.c.lease_expires_at.is_(None), _shards.c.lease_expires_at <= _p("p_now", _TS)),
            ),
        ),
        select(_jobs.c.id)
        .where(_jobs.c.id == _p("p_job"), _one_of(_jobs.c.state, [JobState.QUEUED.value, JobState.RUNNING.value]))
        .exists(),
    )
    .values(state=ShardState.RUNNING.value, attempts=_shards.c.attempts + 1, lease_owner=_p("p_owner"),
            lease_expires_at=_p("p_expires", _TS), worker=_p("p_worker"), started_at=_p("p_now", _TS), error=None)
    .returning(_shards.c.id, _shards.c.attempts)
)
#: Mark a shard done, only while `owner` still holds its lease.
_FINISH = (
    _shards.update()
    .where(_shards.c.job_id == _p("p_job"), _shards.c.index == _p("p_index"),
           _shards.c.lease_owner == _p("p_owner"), _shards.c.state == ShardState.RUNNING.value)
    .values(state=ShardState.DONE.value, finished_at=_p("p_now", _TS), lease_owner=None, lease_expires_at=None,
            result=_p("p_result", JSON(none_as_null=True)))  # None stays SQL NULL, as before
)
#: Count a finished shard; RETURNING reads the value this transaction wrote, under the row lock the UPDATE took.
_COUNT_DONE = (
    _jobs.update()
    .where(_jobs.c.id == _p("p_job"))
    .values(shards_done=_jobs.c.shards_done + 1)
    .returning(_jobs.c.shards_done, _jobs.c.shards_total, _jobs.c.state)
)


#: A job's state (the cancel poll).
_JOB_STATE = select(_jobs.c.state).where(_jobs.c.id == _p("p_job"))

#: (database URL, job id) -> (kind, spec) of jobs whose shards this process claimed and which have started. A job's
#: kind and spec never change after creation, so later claims of the same job need no read of the job row.
_STARTED_JOBS: OrderedDict[tuple[str, str], tuple[str, dict[str, Any]]] = OrderedDict()
_STARTED_JOBS_MAX = 256
_started_lock = threading.Lock()


def claim_shard(settings: Settings, job_id: str, index: int, owner: str, task_name: str | None = None) -> Claim:
    """Take the lease of shard (job_id, index) for `owner`, unless it is done, cancelled or leased by someone alive.

    `task_name`, the task of the message being run, must be the task of the job's kind: another task's code would
    run the shard with the wrong work function and fail the job, so such a claim is refused and changes nothing.

    The common case (a queued shard of a live job) is ONE conditional UPDATE ... RETURNING once this process knows
    the job (its kind and spec, and that it has started); the first claim of a job in a process also reads the job
    and, if needed, marks it running. Anything the UPDATE does not take (done, cancelled, leased elsewhere, a
    failed shard, a finished job) goes through `_claim_checked`, which locks the row and says why.
    """
    now = utcnow()
    key = (settings.database_url, job_id)
    with _started_lock:
        known = _STARTED_JOBS.get(key)
    params = {"p_job": job_id, "p_index": int(index), "p_owner": owner, "p_now": now,
              "p_expires": now + timedelta(seconds=settings.lease_seconds), "p_worker": owner.rsplit(":", 1)[0]}
    if known is not None and (why := wrong_task(known[0], task_name)):
        return Claim(False, why, kind=known[0])
    with transaction(settings) as conn:
        if known is None:
            job = conn.execute(
                select(_jobs.c.kind, _jobs.c.spec, _jobs.c.state, _jobs.c.started_at).where(_jobs.c.id == job_id)
            ).one_or_none()
            if job is not None and (why := wrong_task(job.kind, task_name)):
                return Claim(False, why, kind=job.kind)
            if job is None or job.state not in (JobState.QUEUED, JobState.RUNNING):
                row = None
            else:
                known = (job.kind, job.spec)
                row = conn.execute(_TAKE, params).one_or_none()
                if row is not None and (job.state == JobState.QUEUED or job.started_at is None):
                    conn.execute(
                        _jobs.update()
                        .where(_jobs.c.id == job_id)
                        .values(
                            state=case((_jobs.c.state == JobState.QUEUED.value, JobState.RUNNING.value),
                                       else_=_jobs.c.state),
                            started_at=func.coalesce(_jobs.c.started_at, now),
                        )
                    )
        else:
            row = conn.execute(_TAKE, params).one_or_none()
    if row is None:
        return _claim_checked(settings, job_id, index, owner)
    with _started_lock:  # committed: the job is running and started
        _STARTED_JOBS[key] = known
        _STARTED_JOBS.move_to_end(key)
        while len(_STARTED_JOBS) > _STARTED_JOBS_MAX:
            _STARTED_JOBS.popitem(last=False)
    return Claim(True, "claimed", row.id, row.attempts, copy.deepcopy(known[1]), known[0])


def _lease_values(settings: Settings, owner: str, now: datetime) -> dict[str, Any]:
    return {
        "state": ShardState.RUNNING.value,
        "lease_owner": owner,
        "lease_expires_at": now + timedelta(seconds=settings.lease_seconds),
        "worker": owner.rsplit(":", 1)[0],
        "started_at": now,
        "error": None,
    }


def _claim_checked(settings: Settings, job_id: str, index: int, owner: str) -> Claim:
    """The full claim: lock the shard row, refuse with a reason, or take the lease (any state the fast path skips)."""
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
        for key, value in _lease_values(settings, owner, now).items():
            setattr(shard, key, value)
        shard.attempts += 1
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
    """Renews a lease in the background; exposes `cancelled` and `lost` events to the work loop.

    Progress set with `progress(...)` is written with the next beat, so reporting it costs no extra transaction.
    Beats run on the process's one renewer thread (`_RENEWER`), not a thread per shard: starting and joining a
    thread for every shard cost ~1-2 ms of a busy core (benchmarks/overhead.py). Leaving the block stops the
    beats and waits for a beat in flight, as joining a thread did.
    """

    def __init__(self, settings: Settings, shard_id: int, job_id: str, owner: str, interval: float | None = None):
        self.settings, self.shard_id, self.job_id, self.owner = settings, shard_id, job_id, owner
        self.interval = interval or settings.lease_seconds / C.HEARTBEATS_PER_LEASE
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._progress: dict[str, Any] | None = None
        self._polled_at = time.monotonic()

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

    def check(self) -> None:
        """Raise when the work should stop: call it between batches."""
        if self.lost.is_set():
            raise LeaseLost(f"lease on shard {self.shard_id} was taken over")
        if self.cancelled.is_set():
            raise Cancelled(self.job_id)

    def poll(self, min_interval: float = CANCEL_POLL_SECONDS) -> None:
        """`check()`, reading the job's state first when the last reading is `min_interval` s old or more.

        Called from inside the work (per U-Net call, per Langevin step), so a cancel stops a long batch within
        about a second instead of at the next beat (lease/4 s) or batch end. Between readings it costs one clock
        read; a failed reading is left to the next one (the beat still renews the lease).
        """
        now = time.monotonic()
        if now - self._polled_at >= min_interval:
            self._polled_at = now
            try:
                with transaction(self.settings) as conn:
                    state = conn.execute(_JOB_STATE, {"p_job": self.job_id}).scalar_one_or_none()
            except Exception as e:
                log.debug("cancel poll of job %s failed: %s", self.job_id, e)
            else:
                if state == JobState.CANCELLED:
                    self.cancelled.set()
        self.check()

    def should_stop(self) -> bool:
        """`poll()` as a boolean, for loops that stop their work themselves (the training supervisor)."""
        try:
            self.poll()
        except (Cancelled, LeaseLost):
            return True
        return False

    def __enter__(self) -> Heartbeat:
        _RENEWER.add(self)
        return self

    def __exit__(self, *exc) -> None:
        _RENEWER.remove(self)


_RENEWER = Renewer()


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
    params = {"p_job": job_id, "p_index": int(index), "p_owner": owner, "p_now": now, "p_result": result}
    with session_scope(settings) as s:
        conn = s.connection()
        if conn.execute(_FINISH, params).rowcount != 1:
            s.rollback()
            return False
        record(s)
        # The counter's UPDATE locks the job row until commit: exactly one completing transaction sees
        # shards_done == shards_total (no separate SELECT ... FOR UPDATE needed).
        done, total, state = conn.execute(_COUNT_DONE, params).one()
        if done == total and state == JobState.RUNNING:
            job = s.get(Job, job_id, populate_existing=True)  # `record` may have loaded it before the UPDATE
            kind = kinds.find(job.kind)
            if kind is not None and kind.finalize is not None:
                kinds.resolve(kind.finalize)(s, job)
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
