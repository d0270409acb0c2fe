"""What every task module shares: this process's settings, and the thin shard-task wrapper."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from shared.db import ensure_schema
from shared.settings import Settings
from workers.celery_app import app
from workers.runner import TRANSIENT, LeasedElsewhere, ShardContext, ShardOutput, run_shard


@lru_cache(maxsize=1)
def settings() -> Settings:
    s = Settings.from_env()
    ensure_schema(s)
    return s


def shard_task(name: str, work: Callable[[ShardContext], ShardOutput]):
    """Register `work` as the Celery task `name(job_id, shard_index)`.

    Transient DB/broker errors retry with exponential backoff. A delivery that finds the shard leased by a live
    owner does not drop the message: it retries when that lease would expire, so a worker killed with -9 is taken
    over (and a training run resumed) without waiting for anyone.
    """

    @app.task(name=name, bind=True, autoretry_for=TRANSIENT, retry_backoff=2, retry_backoff_max=60,
              retry_jitter=True, max_retries=None)
    def task(self, job_id: str, shard_index: int) -> dict:
        try:
            return run_shard(settings(), job_id, shard_index, work, task=self)
        except LeasedElsewhere as e:
            raise self.retry(countdown=e.retry_in, max_retries=None) from None

    return task


def _on_worker_ready(sender=None, **_kw) -> None:
    """Every worker's main process also reaps expired leases and orphaned jobs (ORCH_REAPER=0 turns it off)."""
    import os

    if os.environ.get("ORCH_REAPER", "1") != "0":
        from workers.reaper import start_reaper_thread

        start_reaper_thread(settings())


from celery.signals import worker_ready  # noqa: E402

worker_ready.connect(_on_worker_ready, weak=False)
