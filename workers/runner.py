"""Running one shard inside a Celery task: claim, heartbeat, work, record — with the right end state for every outcome.

The Celery task stays thin: it names the work function; this module owns the protocol (STYLE.md habit 1).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from shared.errors import UserError
from shared.settings import Settings
from shared.storage import Storage, StorageError, open_storage
from workers import bookkeeping as bk

log = logging.getLogger(__name__)

#: Errors worth retrying with backoff: the DB or the broker went away for a while.
TRANSIENT = (OperationalError, DBAPIError, ConnectionError, TimeoutError)


class LeasedElsewhere(Exception):
    """Another live owner holds the shard's lease: try again once it would have expired."""

    def __init__(self, reason: str, retry_in: float):
        super().__init__(reason)
        self.retry_in = retry_in


@dataclass
class ShardContext:
    settings: Settings
    storage: Storage
    job_id: str
    index: int
    kind: str
    spec: dict[str, Any]
    attempt: int
    owner: str
    heartbeat: bk.Heartbeat
    task: Any = None

    def progress(self, done: int, total: int, **extra: Any) -> None:
        """Report progress to the DB (with the next heartbeat) and to Flower (the custom task state PROGRESS).

        `done`/`total` count the shard's units (pairs, samples, training steps); `extra` adds what a person watches
        (epoch, loss, samples_per_s). Flower gets a `task-progress` event rather than `update_state`, which needs a
        result backend (there is none: results live in the DB). Celery's event state turns an unknown task-* event
        into a custom state named after it and keeps the event's fields: `progress` holds the numbers and `result`
        a one-line summary, because `result` is a field every Flower lists. Events go out at most once a second
        (the last one always), never retry, and never fail the shard: monitoring must not stop work.
        """
        import time

        meta = {"job_id": self.job_id, "shard": self.index, "done": done, "total": total, **extra}
        self.heartbeat.progress(**meta)
        if self.task is None or not getattr(getattr(self.task, "request", None), "id", None):
            return
        now = time.monotonic()
        last = self.__dict__.get("_progress_event_at")
        if last is not None and now - last < 1.0 and not (total and done >= total):
            return
        self.__dict__["_progress_event_at"] = now
        parts = [f"{done}/{total}" + (f" ({100.0 * done / total:.0f}%)" if total else "")]
        for key, value in extra.items():
            if value is not None:
                parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        try:
            # name and arguments too: a Flower started after the task's task-received event would otherwise list
            # it with a null name (Celery's event state merges every field of a custom event into the task)
            self.task.send_event("task-progress", retry=False, progress=meta, result=" ".join(parts),
                                 name=self.task.name, args="()",
                                 kwargs=f"{{'job_id': {self.job_id!r}, 'shard_index': {self.index}}}")
        except Exception as e:  # a broker hiccup costs one progress update, nothing more
            log.debug("progress event of shard %s/%s not sent: %s", self.job_id, self.index, e)

    def check(self) -> None:
        """Raise Cancelled / LeaseLost when the shard must stop (reads the job's state at most once a second)."""
        self.heartbeat.poll()

    def step(self, done: int, total: int, **extra: Any) -> None:
        """Progress from inside a batch (one U-Net call, one Langevin step) and the cancel check: cheap enough
        to call per step (a dict update, a clock read; a DB read and an event at most once a second)."""
        self.progress(done, total, **extra)
        self.heartbeat.poll()


@dataclass
class ShardOutput:
    record: Callable[[Session], None]
    result: dict[str, Any] = field(default_factory=dict)


def run_shard(
    settings: Settings,
    job_id: str,
    index: int,
    work: Callable[[ShardContext], ShardOutput],
    task: Any = None,
) -> dict[str, Any]:
    request = getattr(task, "request", None)
    owner = bk.make_owner(getattr(request, "id", None), getattr(request, "hostname", None))
    claim = bk.claim_shard(settings, job_id, index, owner, getattr(task, "name", None))
    if not claim.ok and claim.retry_in is not None:
        raise LeasedElsewhere(claim.reason, claim.retry_in)
    if not claim.ok:
        log.info("shard %s/%s skipped: %s", job_id, index, claim.reason)
        return {"job_id": job_id, "shard": index, "skipped": claim.reason}
    storage = open_storage(settings)
    try:
        with bk.Heartbeat(settings, claim.shard_id, job_id, owner) as hb:
            ctx = ShardContext(settings, storage, job_id, index, claim.kind, claim.spec, claim.attempt, owner, hb, task)
            out = work(ctx)
            hb.check()
        if not bk.complete_shard(settings, job_id, index, owner, out.record, out.result):
            return {"job_id": job_id, "shard": index, "skipped": "lease lost before completion"}
        return {"job_id": job_id, "shard": index, **out.result}
    except bk.Cancelled:
        if bk.release_cancelled(settings, job_id, index, owner):
            from workers.dispatch import enqueue_shards

            enqueue_shards(settings, job_id, [index])
        return {"job_id": job_id, "shard": index, "cancelled": True}
    except bk.LeaseLost as e:
        return {"job_id": job_id, "shard": index, "skipped": str(e)}
    except TRANSIENT as e:
        log.warning("shard %s/%s: transient error, will retry: %s", job_id, index, e)
        try:
            bk.release_for_retry(settings, job_id, index, owner, f"{type(e).__name__}: {e}")
        except Exception:
            pass
        raise
    except (UserError, StorageError) as e:
        bk.fail_shard(settings, job_id, index, owner, str(e))
        raise
    except Exception as e:
        bk.fail_shard(settings, job_id, index, owner, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}")
        raise
