"""Hand-made task messages: envelopes and bodies Celery cannot parse (poison), and well-formed messages of the wrong
task for a shard. Used by tests/workers/test_poison.py and the fault cases (tests/faults/test_messages.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select

from shared import constants as C
from shared.db import session_scope
from shared.models import Rejection
from shared.settings import Settings
from workers.dispatch import get_app


@dataclass(frozen=True)
class Broken:
    """One malformed message: what is wrong with it, the queue it goes to, and how it is made from a good one."""

    name: str
    queue: str
    make: Callable[[dict, list], tuple[dict | None, bytes, str]]  # (headers, body) -> (headers, body, content type)


def _good(body: list) -> bytes:
    return json.dumps(body).encode()


#: Shapes Celery cannot parse. The first two made the worker's main process exit (`Unrecoverable error`, message
#: requeued, so the next worker died too); the others were dropped without a record.
BROKEN: tuple[Broken, ...] = (
    Broken("body is a JSON object", C.QUEUE_GPU, lambda h, b: (h, json.dumps(b[1]).encode(), "application/json")),
    Broken("body has two items", C.QUEUE_CPU, lambda h, b: (h, _good(b[:2]), "application/json")),
    Broken("body is not JSON", C.QUEUE_GPU, lambda h, b: (h, b"\x80\x81{not json", "application/json")),
    Broken("content type is not JSON", C.QUEUE_CPU, lambda h, b: (h, _good(b), "application/x-yaml")),
    Broken("no headers", C.QUEUE_GPU, lambda h, b: ({}, _good(b), "application/json")),
    Broken("args is not a list", C.QUEUE_CPU, lambda h, b: (h, _good([5, b[1], b[2]]), "application/json")),
)


def publish_raw(settings: Settings, queue: str, task: str, kwargs: dict, broken: Broken) -> str:
    """Publish Celery's own message for `task(**kwargs)`, spoiled by `broken`, to `queue`; returns its task id."""
    app = get_app(settings)
    task_id = str(uuid.uuid4())
    msg = app.amqp.as_task_v2(task_id, task, kwargs=kwargs)
    headers, body, content_type = broken.make(dict(msg.headers), list(msg.body))
    q = app.amqp.queues[queue]
    with app.producer_or_acquire() as producer:
        producer.publish(body, exchange=q.exchange, routing_key=q.routing_key, headers=headers,
                         content_type=content_type, content_encoding="utf-8", declare=[q], retry=True)
    return task_id


def publish_task(settings: Settings, task: str, job_id: str, index: int, queue: str) -> str:
    """A well-formed message of `task` for shard (job_id, index), to `queue`; returns its task id."""
    task_id = str(uuid.uuid4())
    get_app(settings).send_task(task, kwargs={"job_id": job_id, "shard_index": index}, queue=queue,
                                task_id=task_id)
    return task_id


def bad_messages(settings: Settings) -> list[tuple[str, str, str]]:
    """(ref, reason, worker) of every recorded bad message."""
    with session_scope(settings) as s:
        return [tuple(r) for r in s.execute(select(Rejection.ref, Rejection.reason, Rejection.worker)
                                            .where(Rejection.kind == "bad_message").order_by(Rejection.id))]
