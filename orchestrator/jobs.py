"""Creating, cancelling, resuming and waiting for jobs (the control plane's writes)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from shared.errors import UserError
from shared.models import Job
from shared.settings import Settings
from shared.status import JobState, ShardState
from shared.store import get_job, store
from workers.dispatch import enqueue_shards


def new_job_id(kind: str) -> str:
    return f"{kind.split('-')[0][:8]}-{uuid.uuid4().hex[:12]}"


def create_job(
    settings: Settings,
    kind: str,
    spec: dict[str, Any],
    n_shards: int,
    items: Sequence[dict[str, Any]] = (),
    lineage: Sequence[tuple[str, str, str]] = (),
    rejections: Sequence[tuple[str, str, str]] = (),
) -> str:
    """Insert the job, its shards, items, lineage and refused inputs in ONE transaction: a job is never
    half-created."""
    job_id = new_job_id(kind)
    store(settings).create_job(job_id, kind, spec, n_shards, items, lineage, rejections)
    return job_id


def submit(settings: Settings, kind: str, spec: dict[str, Any], n_shards: int, items=(), lineage=(),
           rejections=()) -> str:
    """Check the broker, create the rows, then publish the shards.

    All or nothing from the user's side: a broker that cannot be reached (or an unknown scheme, or a refused
    password) is an error before any row exists. If publishing fails once the rows exist, the job is cancelled, so
    no reaper publishes it and no stray message runs it, and the error names the job and `orchestrator resume`.
    A submitter that crashes in between (no error reaches anyone) leaves a `queued` job with pending shards that
    `orchestrator resume` (or the reaper) publishes; nothing is lost.
    """
    from workers.dispatch import broker_problem

    problem = broker_problem(settings)
    if problem:
        raise UserError(f"{problem}: nothing was submitted (check ORCH_BROKER_URL and that the broker is up)")
    job_id = create_job(settings, kind, spec, n_shards, items, lineage, rejections)
    try:
        enqueue_shards(settings, job_id, range(n_shards), kind)
    except _publish_errors() as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        _abandon(settings, job_id, f"submission failed while publishing its shards ({why})")
        raise UserError(f"job {job_id} was created but its shards could not be published ({why}); it is cancelled "
                        f"and will not run: publish it with `orchestrator resume {job_id}` once the broker is "
                        "back") from None
    return job_id


def _publish_errors() -> tuple[type[BaseException], ...]:
    """What a failed publish raises: kombu's errors, socket errors, and the Redis client's own (a refused password,
    a dropped connection). Anything else (a crash, a bug) propagates and leaves the job to `resume` or the reaper."""
    from kombu.exceptions import KombuError

    errors: tuple[type[BaseException], ...] = (KombuError, OSError, TimeoutError)
    try:
        from redis.exceptions import RedisError

        errors += (RedisError,)
    except ImportError:  # pragma: no cover - redis is a dependency, but only the Redis broker needs it
        pass
    return errors


def _abandon(settings: Settings, job_id: str, error: str) -> None:
    """Cancel a job whose submission failed (the reaper publishes only queued and running jobs; a claim refuses a
    cancelled one), keeping its rows so that `resume` can still publish it."""
    cancel(settings, job_id)
    store(settings).set_job_error(job_id, error)


def cancel(settings: Settings, job_id: str) -> str:
    """Cancel a job: unstarted shards are cancelled at once; running ones stop at their next check (training runs
    get SIGTERM, save a checkpoint and stop)."""
    job = get_job(settings, job_id)
    if JobState(job.state).finished:
        return job.state
    store(settings).cancel_job(job_id)
    return JobState.CANCELLED.value


def resume(settings: Settings, job_id: str, failed_only: bool = False) -> int:
    """Re-enqueue only the unfinished shards of a cancelled, failed or stuck job (done shards are kept).

    Like `submit`: the broker is checked before anything changes, a job that never started reads `queued` until one
    of its shards starts, and a publish that fails leaves it cancelled, with the error saying so, rather than
    half-published for a reaper to pick up later."""
    from workers.dispatch import broker_problem

    job = get_job(settings, job_id)
    if job.state == JobState.SUCCEEDED:
        raise UserError(f"job '{job_id}' already succeeded: nothing to resume")
    problem = broker_problem(settings)
    if problem:
        raise UserError(f"{problem}: job {job_id} was not resumed (check ORCH_BROKER_URL and that the broker is up)")
    states = [ShardState.FAILED] if failed_only else [
        ShardState.PENDING, ShardState.QUEUED, ShardState.CANCELLED, ShardState.FAILED,
    ]
    # a job that never started (its submission failed to publish) waits as `queued` until a shard starts; one that
    # ran before is `running` again (workers that claimed its shards remember it started, and claim its next shards
    # without touching the job row: bookkeeping.claim_shard)
    store(settings).reopen_job(job_id, states, started=job.started_at is not None)
    try:
        n = enqueue_shards(settings, job_id)
    except _publish_errors() as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        _abandon(settings, job_id, f"resume failed while publishing its shards ({why})")
        raise UserError(f"job {job_id} could not be resumed: its shards could not be published ({why}); it is "
                        f"cancelled: run `orchestrator resume {job_id}` again once the broker is back") from None
    store(settings).succeed_if_all_done(job_id)  # every shard was already done (a cancel came after the work ended)
    return n


def wait(settings: Settings, job_id: str, timeout: float | None = None, poll: float = 0.5, on_tick=None) -> Job:
    """Block until the job ends (or `timeout` seconds pass) and return its final row."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = get_job(settings, job_id)
        if on_tick is not None:
            on_tick(job)
        if JobState(job.state).finished:
            return job
        if deadline is not None and time.monotonic() > deadline:
            return job
        time.sleep(poll)
