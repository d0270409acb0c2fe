"""The Store's statements of the lease protocol: claims, heartbeats, completion, failure and release of shards
(their rules are described in workers/bookkeeping.py), and what the reaper reads and resets (workers/reaper.py).
Part of shared/store.py.

Which task may run a kind's shards and what ends a kind's job are the kind's (kinds/, workers/poison.py); the
callers pass them in, so this module stays below both.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, and_, bindparam, case, func, literal_column, or_, select, update
from sqlalchemy.orm import Session

from shared.models import Job, Shard, utcnow
from shared.status import JobState, ShardState

if TYPE_CHECKING:
    from shared.store import Store


def aware(dt: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything we store is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=timezone.utc)


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
#: Extend `owner`'s lease of a running shard (a training run's fencing check, `hold_lease`).
_HOLD = (
    _shards.update()
    .where(_shards.c.id == _p("p_shard"), _shards.c.lease_owner == _p("p_owner"),
           _shards.c.state == ShardState.RUNNING.value)
    .values(lease_expires_at=_p("p_expires", _TS))
)
#: A job's state (the cancel poll).
_JOB_STATE = select(_jobs.c.state).where(_jobs.c.id == _p("p_job"))

#: (database URL, job id) -> (kind, spec) of jobs whose shards this process claimed and which have started. A job's
#: kind and spec never change after creation, so later claims of the same job need no read of the job row.
_STARTED_JOBS: OrderedDict[tuple[str, str], tuple[str, dict[str, Any]]] = OrderedDict()
_STARTED_JOBS_MAX = 256
_started_lock = threading.Lock()


def _no_refusal(_kind: str) -> None:
    return None


class LeaseStatements:
    def claim(self: Store, job_id: str, index: int, owner: str, lease_seconds: float,
              refuse: Callable[[str], str | None] = _no_refusal) -> Claim:
        """Take the lease of shard (job_id, index) for `owner` (workers/bookkeeping.py's claim_shard says when);
        `refuse(kind)`, a reason or None, may turn a job's kind away before anything changes.

        The common case (a queued shard of a live job) is ONE conditional UPDATE ... RETURNING once this process
        knows the job (its kind and spec, and that it has started); the first claim of a job in a process also reads
        the job and, if needed, marks it running. Anything the UPDATE does not take (done, cancelled, leased
        elsewhere, a failed shard, a finished job) goes through `_claim_checked`, which locks the row and says why.
        """
        now = utcnow()
        key = (self.url, job_id)
        with _started_lock:
            known = _STARTED_JOBS.get(key)
        params = {"p_job": job_id, "p_index": int(index), "p_owner": owner, "p_now": now,
                  "p_expires": now + timedelta(seconds=lease_seconds), "p_worker": owner.rsplit(":", 1)[0]}
        if known is not None and (why := refuse(known[0])):
            return Claim(False, why, kind=known[0])
        with self.transaction() as conn:
            if known is None:
                job = conn.execute(
                    select(_jobs.c.kind, _jobs.c.spec, _jobs.c.state, _jobs.c.started_at).where(_jobs.c.id == job_id)
                ).one_or_none()
                if job is not None and (why := refuse(job.kind)):
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
            return self._claim_checked(job_id, index, owner, lease_seconds)
        with _started_lock:  # committed: the job is running and started
            _STARTED_JOBS[key] = known
            _STARTED_JOBS.move_to_end(key)
            while len(_STARTED_JOBS) > _STARTED_JOBS_MAX:
                _STARTED_JOBS.popitem(last=False)
        return Claim(True, "claimed", row.id, row.attempts, copy.deepcopy(known[1]), known[0])

    def _claim_checked(self: Store, job_id: str, index: int, owner: str, lease_seconds: float) -> Claim:
        """The full claim: lock the shard row, refuse with a reason, or take the lease (any state the fast path
        skips)."""
        now = utcnow()
        with self.session() as s:
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
            shard.lease_owner = owner
            shard.lease_expires_at = now + timedelta(seconds=lease_seconds)
            shard.worker = owner.rsplit(":", 1)[0]
            shard.started_at = now
            shard.error = None
            shard.attempts += 1
            if job.state == JobState.QUEUED:
                job.state = JobState.RUNNING.value
            if job.started_at is None:
                job.started_at = now
            return Claim(True, "claimed", shard.id, shard.attempts, dict(job.spec), job.kind)

    def renew(self: Store, shard_id: int, job_id: str, owner: str, lease_seconds: float,
              progress: dict[str, Any] | None = None) -> tuple[bool, str]:
        """Extend `owner`'s lease (and write `progress`, if any): (whether the lease is still ours, the job's state)."""
        values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=lease_seconds)}
        if progress is not None:
            values["progress"] = progress
        with self.session() as s:
            res = s.execute(
                update(Shard)
                .where(Shard.id == shard_id, Shard.lease_owner == owner, Shard.state == ShardState.RUNNING)
                .values(**values)
            )
            state = s.execute(select(Job.state).where(Job.id == job_id)).scalar_one()
        return res.rowcount != 0, state

    @staticmethod
    def hold_lease(s: Session, shard_id: int, owner: str, lease_seconds: float) -> bool:
        """Renew `owner`'s lease inside the caller's transaction: False when `owner` no longer holds it.

        The UPDATE locks the shard row until the caller commits, so no claim can take the lease over between this
        check and the rows the caller writes: they are written by the lease holder or not at all (the fencing token).
        """
        return s.connection().execute(_HOLD, {"p_shard": shard_id, "p_owner": owner,
                                              "p_expires": utcnow() + timedelta(seconds=lease_seconds)}).rowcount == 1

    def job_state(self: Store, job_id: str) -> str | None:
        """The job's state, or None when there is no such job (one prebuilt statement: the cancel poll)."""
        with self.transaction() as conn:
            return conn.execute(_JOB_STATE, {"p_job": job_id}).scalar_one_or_none()

    def complete(self: Store, job_id: str, index: int, owner: str, record: Callable[[Session], None],
                 result: dict[str, Any] | None = None,
                 finalize: Callable[[Session, Job], None] | None = None) -> bool:
        """Mark the shard done and run `record(session)` in the same transaction, only while `owner` holds its
        lease; the transaction that counts the job's last shard runs `finalize(session, job)` and ends the job.
        False when the lease was lost (nothing is written)."""
        now = utcnow()
        params = {"p_job": job_id, "p_index": int(index), "p_owner": owner, "p_now": now, "p_result": result}
        with self.session() as s:
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
                if finalize is not None:
                    finalize(s, job)
                job.state = JobState.SUCCEEDED.value
                job.finished_at = now
        return True

    def fail(self: Store, job_id: str, index: int, owner: str, error: str) -> None:
        """Mark the shard failed (if `owner` still holds it) and its job failed with the shard's error."""
        now = utcnow()
        with self.session() as s:
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

    def release_cancelled(self: Store, job_id: str, index: int, owner: str) -> bool:
        """Give up `owner`'s lease of a shard stopped by a cancel: cancelled, or pending again when the job was
        resumed meanwhile. True when it must be re-enqueued."""
        with self.session() as s:
            state = s.execute(select(Job.state).where(Job.id == job_id)).scalar_one()
            new = ShardState.CANCELLED if state == JobState.CANCELLED else ShardState.PENDING
            res = s.execute(
                update(Shard)
                .where(Shard.job_id == job_id, Shard.index == index, Shard.lease_owner == owner)
                .values(state=new.value, lease_owner=None, lease_expires_at=None)
            )
            return res.rowcount == 1 and new == ShardState.PENDING

    def release_for_retry(self: Store, job_id: str, index: int, owner: str, error: str) -> None:
        """Give up `owner`'s lease of a shard back to `queued`, so that a retried delivery can claim it at once."""
        with self.session() as s:
            s.execute(
                update(Shard)
                .where(Shard.job_id == job_id, Shard.index == index, Shard.lease_owner == owner)
                .values(state=ShardState.QUEUED.value, lease_owner=None, lease_expires_at=None, error=error[:4000])
            )

    # -- the reaper (workers/reaper.py) -------------------------------------------------------------------------------
    # Every change is conditional on the state it was read in, so several reapers never take the same shard twice.

    def expired_leases(self: Store, now: datetime) -> list[tuple[int, str, int]]:
        """(shard id, job id, index) of running shards of live jobs whose lease expired before `now`."""
        with self.session() as s:
            return [tuple(r) for r in s.execute(
                select(Shard.id, Shard.job_id, Shard.index)
                .join(Job, Job.id == Shard.job_id)
                .where(Shard.state == ShardState.RUNNING, Shard.lease_expires_at < now,
                       Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
            ).all()]

    def reset_expired(self: Store, shard_id: int, now: datetime) -> bool:
        """Make a shard whose lease expired before `now` pending again; False when someone else already did."""
        with self.session() as s:
            return s.execute(
                update(Shard)
                .where(Shard.id == shard_id, Shard.state == ShardState.RUNNING, Shard.lease_expires_at < now)
                .values(state=ShardState.PENDING.value, lease_owner=None, lease_expires_at=None)
            ).rowcount == 1

    def cancel_expired_of_ended_jobs(self: Store, now: datetime) -> int:
        """Mark cancelled the running shards of ended jobs whose lease expired before `now`; how many."""
        with self.session() as s:
            return s.execute(
                update(Shard)
                .where(Shard.state == ShardState.RUNNING, Shard.lease_expires_at < now,
                       Shard.job_id.in_(select(Job.id).where(Job.state.in_([JobState.CANCELLED, JobState.FAILED,
                                                                             JobState.SUCCEEDED]))))
                .values(state=ShardState.CANCELLED.value, lease_owner=None, lease_expires_at=None, finished_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount

    def orphaned_jobs(self: Store, created_before: datetime) -> list[str]:
        """Ids of jobs still `queued`, created before `created_before`, with pending shards."""
        with self.session() as s:
            return list(s.execute(
                select(Job.id).where(
                    Job.state == JobState.QUEUED,
                    Job.created_at < created_before,
                    select(Shard.id).where(and_(Shard.job_id == Job.id, Shard.state == ShardState.PENDING)).exists(),
                )
            ).scalars().all())

    def stale_queued(self: Store, enqueued_before: datetime, limit: int = 10000) -> list[tuple]:
        """(shard id, job id, index, enqueued_at, job kind) of shards of live jobs `queued` since before
        `enqueued_before`."""
        with self.session() as s:
            return [tuple(r) for r in s.execute(
                select(Shard.id, Shard.job_id, Shard.index, Shard.enqueued_at, Job.kind)
                .join(Job, Job.id == Shard.job_id)
                .where(Shard.state == ShardState.QUEUED, Shard.enqueued_at < enqueued_before,
                       Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                .limit(limit)
            ).all()]

    def requeue_lost(self: Store, shard_id: int, enqueued_at: datetime) -> bool:
        """Make a shard still `queued` since `enqueued_at` pending again; False when it moved on meanwhile."""
        with self.session() as s:
            return s.execute(
                update(Shard)
                .where(Shard.id == shard_id, Shard.state == ShardState.QUEUED, Shard.enqueued_at == enqueued_at)
                .values(state=ShardState.PENDING.value)
            ).rowcount == 1
