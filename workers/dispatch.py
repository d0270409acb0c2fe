"""Publishing shard messages: batched on one producer connection (pipelined on Redis), then recorded in the DB.

Messages carry only (job_id, shard_index): everything else is read from the DB, so a message can be replayed, a
duplicate is harmless, and Flower shows short, readable arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from functools import lru_cache

from celery import Celery

import kinds
from shared.settings import Settings
from shared.store import store
from workers.bookkeeping import utcnow

#: Messages published per pipeline (Redis) and per DB update of their shards.
PUBLISH_CHUNK = 1000

#: A submission of more messages than this publishes them without task-sent events. Each event costs twice its
#: message to publish (benchmarks/README.md, "Submission"), and Flower keeps only its last 10,000 tasks (its
#: ``max_tasks``), so 10,000 "sent" tasks would push every other task out of its list. Flower still sees each shard
#: from the moment a worker receives it; shards waiting in the broker are in `orchestrator status` and in the
#: exporter's queue-depth gauge.
SENT_EVENTS_MAX = 1000


@lru_cache(maxsize=8)
def _app_for(settings: Settings, sent_events: bool = True) -> Celery:
    from workers.celery_app import make_app

    return make_app(settings, sent_events=sent_events, set_as_current=sent_events)  # the bulk app: never current


def _batch(producer, max_size: int):
    """kombu's ``Producer.batch`` (5.7+: a Redis pipeline), or nothing on older kombu."""
    batch = getattr(producer, "batch", None)
    return batch(max_size=max_size) if batch is not None else nullcontext()


def get_app(settings: Settings) -> Celery:
    return _app_for(settings)


#: Seconds a submission waits for the broker before saying it cannot be reached.
BROKER_CHECK_SECONDS = 5.0


def broker_problem(settings: Settings) -> str | None:
    """Why the broker cannot take messages right now (unreachable, unknown scheme, refused login), or None.

    The submitter asks before it creates any row, so a submission that cannot be published leaves nothing behind.
    """
    if settings.embedded_broker:
        try:
            settings.ensure_local_folders()
        except OSError as e:
            return f"the embedded broker's folder is not usable: {e}"
        return None
    try:
        with get_app(settings).connection_for_write() as conn:
            # one try, no retry loop: kombu connects (Redis: and PINGs, which checks the password) or raises
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=BROKER_CHECK_SECONDS)
    except KeyError as e:  # kombu: "No such transport: <scheme>"
        return f"unknown broker scheme in {_masked(settings.broker_url)} ({e.args[0] if e.args else e})"
    except Exception as e:
        why = (str(e).splitlines() or [type(e).__name__])[0].rstrip(".")
        return f"cannot reach the broker {_masked(settings.broker_url)}: {why}"
    return None


def _masked(url: str) -> str:
    from shared.settings import mask_url

    return mask_url(url)


def queue_for(settings: Settings, task_name: str) -> str:
    """The queue a task's messages go to, from the app's own routing (``task_routes``, else the default queue)."""
    conf = get_app(settings).conf
    route = (conf.task_routes or {}).get(task_name) or {}
    return route.get("queue", conf.task_default_queue)


def enqueue_shards(settings: Settings, job_id: str, indices: Sequence[int] | None = None,
                   kind: str | None = None) -> int:
    """Publish one message per shard (all of the job's unfinished shards when `indices` is None).

    Shards go from pending to queued only after their message is out; a claim that already moved a shard to running
    is never overwritten (the UPDATE is conditional on state = pending). A caller that knows the job's kind and the
    shards (the submitter, which just created them) passes both and saves a read.
    """
    if kind is None:
        kind = store(settings).job_kind(job_id)
    if indices is None:
        indices = store(settings).pending_shards(job_id)
    if not indices:
        return 0
    task_name = kinds.get(kind).task
    indices = [int(i) for i in indices]
    app = _app_for(settings, sent_events=len(indices) <= SENT_EVENTS_MAX)
    queue = app.amqp.queues[queue_for(settings, task_name)]
    with app.producer_or_acquire() as producer:
        # declared once here rather than checked per message (kombu's maybe_declare binds a copy of the queue each
        # time: ~0.1 ms a message); the repr strings Flower shows are built directly instead of by Celery's saferepr
        producer.maybe_declare(queue)
        for start in range(0, len(indices), PUBLISH_CHUNK):
            chunk = indices[start : start + PUBLISH_CHUNK]
            # Redis: one pipeline per chunk (messages and their task-sent events) instead of two round trips per
            # message; transports without batching (the filesystem one) publish immediately. Leaving the block
            # flushes the pipeline, and raises if it failed, so the rows below are only marked after their
            # messages are out.
            with _batch(producer, 2 * PUBLISH_CHUNK):
                for i in chunk:
                    # send_task routes and publishes like apply_async, without building a signature per message
                    app.send_task(task_name, kwargs={"job_id": job_id, "shard_index": i}, producer=producer,
                                  queue=queue, declare=[], argsrepr="()",
                                  kwargsrepr=f"{{'job_id': {job_id!r}, 'shard_index': {i}}}")
            # the job stays `queued` until a worker claims a shard (bookkeeping.claim_shard marks it running): a job
            # nobody consumes must not look as if it ran. A submitter that dies half-way leaves it queued with
            # pending shards, which the reaper publishes.
            store(settings).mark_queued(job_id, chunk, utcnow())
    return len(indices)
