"""What every task module shares: this process's settings, and the thin shard-task wrapper."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import lru_cache

from shared.settings import Settings
from shared.store import store
from workers.celery_app import app
from workers.poison import WRONG_TASK
from workers.runner import TRANSIENT, LeasedElsewhere, ShardContext, ShardOutput, run_shard

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def settings() -> Settings:
    s = Settings.from_env()
    store(s).check_schema()  # before any first use: a claim, or recording a malformed message (plain session)
    return s


def shard_task(name: str, work: Callable[[ShardContext], ShardOutput]):
    """Register `work` as the Celery task `name(job_id, shard_index)`.

    Transient DB/broker errors retry with exponential backoff. A delivery that finds the shard leased by a live
    owner does not drop the message: it retries when that lease would expire, so a worker killed with -9 is taken
    over (and a training run resumed) without waiting for anyone.
    """

    @app.task(name=name, bind=True, autoretry_for=TRANSIENT, retry_backoff=2, retry_backoff_max=60,
              retry_jitter=True, max_retries=None)
    def task(self, *args, **kwargs) -> dict:
        parsed = parse_message(args, kwargs)
        if isinstance(parsed, str):  # malformed: refuse it, record it, keep the worker running
            reject_message(self, parsed, args, kwargs)
            return {"rejected": parsed}
        job_id, shard_index = parsed
        try:
            out = run_shard(settings(), job_id, shard_index, work, task=self)
        except LeasedElsewhere as e:
            raise self.retry(countdown=e.retry_in, max_retries=None) from None
        if str(out.get("skipped", "")).startswith(("unknown shard", WRONG_TASK)):
            reject_message(self, out["skipped"], args, kwargs)
            return {"rejected": out["skipped"]}
        return out

    return task


#: A job id as the orchestrator makes them (kind prefix, '-', hex); anything else is refused before any DB query.
_JOB_ID = re.compile(r"^[a-z0-9]{1,16}-[0-9a-f]{6,32}$")


def parse_message(args: tuple, kwargs: dict) -> tuple[str, int] | str:
    """(job_id, shard_index) from a task message, or the reason it is malformed."""
    fields = dict(kwargs)
    names = ("job_id", "shard_index")
    for name, value in zip(names, args, strict=False):
        fields.setdefault(name, value)
    extra = sorted(set(fields) - set(names))
    if len(args) > 2 or extra:
        return f"unexpected arguments {extra or list(args[2:])}"
    missing = [n for n in names if n not in fields]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    job_id, index = fields["job_id"], fields["shard_index"]
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        return f"job_id must be a job id string, got {type(job_id).__name__} {str(job_id)[:80]!r}"
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return f"shard_index must be a non-negative integer, got {type(index).__name__} {str(index)[:80]!r}"
    return job_id, index


def reject_message(task, reason: str, args: tuple, kwargs: dict) -> None:
    from workers.recording import record_rejection

    log.warning("rejected %s message %s: %s", task.name, task.request.id, reason)
    job_id = kwargs.get("job_id", args[0] if args else None)
    try:
        record_rejection(settings(), "bad_message", f"{task.name} {task.request.id}", reason,
                         job_id=job_id if isinstance(job_id, str) else None, worker=task.request.hostname)
    except Exception as e:  # the record is best effort; the refusal is not
        log.warning("could not record the rejected message: %s", e)


def _on_task_unknown(sender=None, name=None, id=None, message=None, exc=None, **_kw) -> None:
    """A message for a task this worker does not know: Celery discards it; we record it."""
    from workers.recording import record_rejection

    try:
        record_rejection(settings(), "bad_message", f"{name} {id}", f"unknown task name {name!r}")
    except Exception as e:
        log.warning("could not record the unknown task message: %s", e)


def _on_worker_ready(sender=None, **_kw) -> None:
    """Every worker's main process also reaps expired leases and orphaned jobs (ORCH_REAPER=0 turns it off)."""
    import os

    if os.environ.get("ORCH_REAPER", "1") != "0":
        from workers.reaper import start_reaper_thread

        # plain settings, not settings(): that one checks the schema, and a database that is down while the node
        # starts must not keep the reaper from ever starting (each round retries the database itself)
        start_reaper_thread(Settings.from_env())


from celery.signals import task_unknown, worker_ready  # noqa: E402

worker_ready.connect(_on_worker_ready, weak=False)
task_unknown.connect(_on_task_unknown, weak=False)
