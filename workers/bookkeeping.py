"""Exactly-once effects on at-least-once delivery: shard claims, leases with heartbeat, idempotent completion.

A shard is keyed (job_id, index). A delivery first *claims* it in the DB: done or cancelled shards are skipped, a live
lease held by someone else makes the delivery exit, an expired lease is taken over. While the work runs a heartbeat
thread renews the lease and watches for cancellation. Completion is one transaction that re-checks the lease, records
the outputs with upserts, marks the shard done and bumps the job's counter; the transaction that makes
shards_done == shards_total also ends the job (and runs its finaliser). No Celery chord is involved.

This module knows nothing of Celery, so the fault tests can drive it directly; its statements are the Store's
(shared/store_leases.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

import kinds
from shared import constants as C
from shared.models import Job, utcnow
from shared.settings import Settings
from shared.status import JobState
from shared.store import store
from shared.store_leases import Claim, aware
from workers.poison import wrong_task
from workers.renewer import Renewer

__all__ = ["Cancelled", "Claim", "Heartbeat", "LeaseLost", "aware", "claim_shard", "complete_shard", "fail_shard",
           "make_owner", "release_cancelled", "release_for_retry", "utcnow"]

log = logging.getLogger(__name__)

#: Longest time (s) a running shard takes to notice that its job was cancelled (Heartbeat.poll).
CANCEL_POLL_SECONDS = 1.0


def make_owner(task_id: str | None = None, node: str | None = None) -> str:
    """A lease owner `node:pid:task_id`. `node` is the Celery node name (`name@host`, what Flower lists), so the
    shard's worker column (`node:pid`) names the worker the way Flower does; the host name outside a worker."""
    return f"{node or socket.gethostname()}:{os.getpid()}:{task_id or uuid.uuid4().hex[:12]}"


def claim_shard(settings: Settings, job_id: str, index: int, owner: str, task_name: str | None = None) -> Claim:
    """Take the lease of shard (job_id, index) for `owner`, unless it is done, cancelled or leased by someone alive.

    `task_name`, the task of the message being run, must be the task of the job's kind: another task's code would
    run the shard with the wrong work function and fail the job, so such a claim is refused and changes nothing.
    The statements, and how the common case costs one UPDATE, are in shared/store_leases.py (`claim`).
    """
    if task_name is None:  # wrong_task refuses nothing without a task name
        return store(settings).claim(job_id, index, owner, settings.lease_seconds)
    return store(settings).claim(job_id, index, owner, settings.lease_seconds,
                                 lambda kind: wrong_task(kind, task_name))


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
        held, state = store(self.settings).renew(self.shard_id, self.job_id, self.owner, self.settings.lease_seconds,
                                                 self._progress)
        if not held:
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
                state = store(self.settings).job_state(self.job_id)
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
    shard is recorded, or nothing is. The transaction that counts the last shard runs the kind's finaliser and ends
    the job.
    """
    return store(settings).complete(job_id, index, owner, record, result, _finalize)


def _finalize(s: Session, job: Job) -> None:
    kind = kinds.find(job.kind)
    if kind is not None and kind.finalize is not None:
        kinds.resolve(kind.finalize)(s, job)


def fail_shard(settings: Settings, job_id: str, index: int, owner: str, error: str) -> None:
    """Mark a shard failed (if we still hold it) and the job failed with the shard's error."""
    store(settings).fail(job_id, index, owner, error)


def release_cancelled(settings: Settings, job_id: str, index: int, owner: str) -> bool:
    """A shard stopped because its job was cancelled: mark it cancelled, or, when the job was resumed meanwhile,
    pending again. Returns True when it must be re-enqueued."""
    return store(settings).release_cancelled(job_id, index, owner)


def release_for_retry(settings: Settings, job_id: str, index: int, owner: str, error: str) -> None:
    """A transient failure (DB or broker blip): give the lease up so the retried delivery can claim at once."""
    store(settings).release_for_retry(job_id, index, owner, error)
