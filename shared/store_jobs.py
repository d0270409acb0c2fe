"""The Store's statements about jobs: creating, cancelling and re-opening them (orchestrator/jobs.py), marking their
published shards queued (workers/dispatch.py), and listing and counting them (orchestrator/queries.py,
orchestrator/watch.py, orchestrator/exporter.py). Part of shared/store.py."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, or_, select, update

from shared.models import Item, Job, Lineage, Rejection, Shard, utcnow
from shared.status import JobState, ShardState

if TYPE_CHECKING:
    from shared.store import Store


@dataclass(frozen=True)
class RunningShard:
    index: int
    worker: str | None
    progress: dict[str, Any] | None
    started_at: datetime | None
    attempts: int


@dataclass(frozen=True)
class JobStatus:
    """A job (detached), its shards counted by state, its running shards and its inputs (kind, ref, role)."""

    job: Job
    by_state: dict[str, int]
    running: list[RunningShard]
    lineage: list[tuple[str, str, str]]


@dataclass(frozen=True)
class JobRow:
    """A line of the job list."""

    id: str
    kind: str
    state: str
    shards_done: int
    shards_total: int
    created_at: datetime | None


class JobStatements:
    # -- writes ---------------------------------------------------------------------------------------------------------

    def create_job(self: Store, job_id: str, kind: str, spec: dict[str, Any], n_shards: int,
                   items: Sequence[dict[str, Any]] = (), lineage: Sequence[tuple[str, str, str]] = (),
                   rejections: Sequence[tuple[str, str, str]] = ()) -> None:
        """Insert the job, its shards, items, lineage and refused inputs in ONE transaction."""
        with self.session() as s:
            s.add(Job(id=job_id, kind=kind, spec=spec, state=JobState.QUEUED.value, shards_total=n_shards))
            s.flush()
            # Core executemany (multi-row VALUES), not the ORM's bulk path: the same rows at a fraction of the CPU
            conn = s.connection()
            conn.execute(insert(Shard.__table__), [{"job_id": job_id, "index": i, "state": ShardState.PENDING.value}
                                                   for i in range(n_shards)])
            if items:
                conn.execute(insert(Item.__table__), [{"job_id": job_id, **it} for it in items])
            if lineage:
                conn.execute(insert(Lineage.__table__), [{"job_id": job_id, "input_kind": k, "input_ref": r,
                                                          "role": role} for k, r, role in lineage])
            if rejections:
                conn.execute(insert(Rejection.__table__), [{"job_id": job_id, "kind": k, "ref": r, "reason": why}
                                                           for k, r, why in rejections])

    def set_job_error(self: Store, job_id: str, error: str) -> None:
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(error=error[:4000]))

    def cancel_job(self: Store, job_id: str) -> None:
        """Cancel a live job and its unstarted shards, and the running shards whose lease has expired (a worker
        already gone never notices the cancel itself)."""
        now = utcnow()
        with self.session() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                .values(state=JobState.CANCELLED.value, finished_at=now)
            )
            s.execute(
                update(Shard)
                .where(Shard.job_id == job_id, Shard.state.in_([ShardState.PENDING, ShardState.QUEUED]))
                .values(state=ShardState.CANCELLED.value)
            )
            s.execute(
                update(Shard)
                .where(Shard.job_id == job_id, Shard.state == ShardState.RUNNING,
                       or_(Shard.lease_expires_at.is_(None), Shard.lease_expires_at < now))
                .values(state=ShardState.CANCELLED.value, lease_owner=None, lease_expires_at=None, finished_at=now)
            )

    def reopen_job(self: Store, job_id: str, states: Iterable[ShardState], started: bool) -> None:
        """Make the job's shards in `states` pending again and the job live: `running` when it `started` before,
        `queued` otherwise (it waits as queued until a shard starts). Running shards keep their lease: they notice
        the job is running again and carry on (or requeue themselves)."""
        with self.session() as s:
            s.execute(
                update(Shard)
                .where(Shard.job_id == job_id, Shard.state.in_(list(states)))
                .values(state=ShardState.PENDING.value, error=None)
            )
            failed = s.execute(
                select(Shard.index).where(Shard.job_id == job_id, Shard.state == ShardState.FAILED)
            ).scalars().all()
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(state=(JobState.RUNNING if started else JobState.QUEUED).value,
                        finished_at=None, error=None, shards_failed=len(failed))
            )

    def succeed_if_all_done(self: Store, job_id: str) -> None:
        """End a live job whose every shard is done (a cancel that came after the work ended, then a resume)."""
        with self.session() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
                       Job.shards_done == Job.shards_total)
                .values(state=JobState.SUCCEEDED.value, finished_at=utcnow())
            )

    def mark_queued(self: Store, job_id: str, indices: Sequence[int], now: datetime) -> None:
        """Mark the shards whose messages are out `queued`: only pending ones, so a claim that already moved a shard
        to running is never overwritten. The job stays `queued` until a worker claims a shard."""
        with self.session() as s:
            s.execute(
                update(Shard)
                .where(Shard.job_id == job_id, Shard.index.in_(list(indices)), Shard.state == ShardState.PENDING)
                .values(state=ShardState.QUEUED.value, enqueued_at=now)
            )

    # -- reads ----------------------------------------------------------------------------------------------------------

    def job_kind(self: Store, job_id: str) -> str:
        """The job's kind (NoResultFound when there is no such job)."""
        with self.session() as s:
            return s.execute(select(Job.kind).where(Job.id == job_id)).scalar_one()

    def pending_shards(self: Store, job_id: str) -> list[int]:
        """The indexes of the job's pending shards, in order."""
        with self.session() as s:
            return list(s.execute(select(Shard.index)
                                  .where(Shard.job_id == job_id, Shard.state == ShardState.PENDING)
                                  .order_by(Shard.index)).scalars())

    def list_jobs(self: Store, kind: str | None = None, state: str | None = None, limit: int = 50) -> list[JobRow]:
        """The newest `limit` jobs, optionally of one kind and/or state."""
        q = select(Job.id, Job.kind, Job.state, Job.shards_done, Job.shards_total, Job.created_at).order_by(
            Job.created_at.desc()
        )
        if kind:
            q = q.where(Job.kind == kind)
        if state:
            q = q.where(Job.state == state)
        with self.session() as s:
            return [JobRow(*r) for r in s.execute(q.limit(limit)).all()]

    def job_status(self: Store, job_id: str, running_limit: int | None = None, lineage: bool = True) -> JobStatus:
        """The job, its shard counts by state, its running shards (in index order, the first `running_limit`) and,
        with `lineage`, its inputs; UserError when there is no such job."""
        with self.session() as s:
            job = self._job_in(s, job_id)
            by_state = s.execute(
                select(Shard.state, func.count()).where(Shard.job_id == job_id).group_by(Shard.state)
            ).all()
            q = (select(Shard.index, Shard.worker, Shard.progress, Shard.started_at, Shard.attempts)
                 .where(Shard.job_id == job_id, Shard.state == ShardState.RUNNING).order_by(Shard.index))
            running = s.execute(q if running_limit is None else q.limit(running_limit)).all()
            inputs = s.execute(select(Lineage.input_kind, Lineage.input_ref, Lineage.role)
                               .where(Lineage.job_id == job_id)).all() if lineage else []
            s.expunge(job)
        return JobStatus(job, {str(k): int(v) for k, v in by_state}, [RunningShard(*r) for r in running],
                         [tuple(r) for r in inputs])

    def state_counts(self: Store, shard_states: Iterable[str]) -> tuple[dict[str, int], dict[str, int]]:
        """({job state: jobs}, {shard state: shards} for the shard states asked for); states with none are absent."""
        with self.session() as s:
            jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            shards = dict(s.execute(select(Shard.state, func.count())
                                    .where(Shard.state.in_(list(shard_states)))
                                    .group_by(Shard.state)).all())
        return jobs, shards
