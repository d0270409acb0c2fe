"""Poison messages: a task message Celery cannot parse is refused where it is first decoded, never requeued.

Celery's consumer hands each message to the task's strategy, which builds a ``Request`` in the worker's MAIN
process. Some malformed messages (a body that decodes to a JSON object instead of ``[args, kwargs, embed]``, or a
list of the wrong length) raise there with an error Celery does not catch: the main process logs
``Unrecoverable error``, the message goes back to the queue, the worker exits, and the next worker to take the
message dies the same way. Others are dropped without a trace (no headers, a content type other than JSON, a body
that is not JSON at all). ``check`` looks at the envelope and body before Celery does; ``refuse`` rejects the
message without requeue and records it in the ``rejections`` table (kind ``bad_message``) with its queue, task name,
id and first bytes. The worker keeps serving.

A well-formed message can still name the wrong task for its shard (a ``train.run`` message for an invert job's
shard): ``wrong_task`` is the claim's check (workers/bookkeeping.py), refused and recorded the same way.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

#: Reason of a claim refused because the message's task is not the job kind's task (see `wrong_task`).
WRONG_TASK = "wrong task"

#: Bytes of a refused message's body kept in its rejection record.
FIRST_BYTES = 200

_recorder: ThreadPoolExecutor | None = None
_recorder_lock = threading.Lock()


def check(message: Any) -> str | None:
    """Why `message` is not a task message this system sends (protocol 2, JSON), or None when it is one."""
    headers = message.headers
    if not isinstance(headers, dict):
        return f"no message headers (got {type(headers).__name__})"
    for name in ("task", "id"):
        if not isinstance(headers.get(name), str) or not headers.get(name):
            return f"header {name!r} missing or not a string"
    if message.content_type != "application/json":
        return f"content type {message.content_type!r} refused: only application/json is accepted"
    try:
        body = message.decode()
    except Exception as e:  # DecodeError, ContentDisallowed, UnicodeDecodeError ...
        return f"body does not decode as JSON: {type(e).__name__}: {str(e)[:200]}"
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        shape = f"a {len(body)}-item list" if isinstance(body, (list, tuple)) else f"a JSON {type(body).__name__}"
        return f"body must be [args, kwargs, embed], got {shape}"
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) or not isinstance(embed, (dict, type(None))):
        return (f"body must be [args, kwargs, embed] (list, object, object), got "
                f"[{type(args).__name__}, {type(kwargs).__name__}, {type(embed).__name__}]")
    return None


def describe(message: Any) -> tuple[str, str]:
    """(ref, first bytes) of a message for its rejection record: `queue task id` and the start of its body."""
    info = getattr(message, "delivery_info", None) or {}
    queue = info.get("routing_key") or info.get("exchange") or "?"
    headers = message.headers if isinstance(message.headers, dict) else {}
    body = message.body
    if isinstance(body, str):
        body = body.encode("utf-8", "replace")
    first = bytes(body or b"")[:FIRST_BYTES]
    return f"{queue} {str(headers.get('task', '?'))[:200]} {str(headers.get('id', '?'))[:80]}", repr(first)


def refuse(message: Any, reason: str, worker: str | None = None) -> None:
    """Reject `message` without requeue (it would only come back and fail again), then record why."""
    ref, first = describe(message)
    log.error("refused malformed message on %s: %s; body starts %s", ref, reason, first)
    try:
        if not message.acknowledged:
            message.reject(requeue=False)
    except Exception as e:  # the connection may be gone: the message then comes back, and is refused again
        log.warning("could not reject the malformed message %s: %s", ref, e)
    # recorded off the event loop: the consumer must not wait on the database (it may be down) for a bad message
    _submit_record(ref, f"{reason}; body starts {first}", worker)


def _submit_record(ref: str, reason: str, worker: str | None) -> None:
    global _recorder
    with _recorder_lock:
        if _recorder is None:
            _recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="poison-record")
        _recorder.submit(_record, ref, reason, worker)


def _record(ref: str, reason: str, worker: str | None) -> None:
    from workers.recording import record_rejection
    from workers.tasks.common import settings

    try:
        record_rejection(settings(), "bad_message", ref, reason, worker=worker)
    except Exception as e:  # the record is best effort; the refusal is not
        log.warning("could not record the refused message %s: %s", ref, e)


def guard(handler, consumer):
    """Wrap Celery's ``on_task_received``: refuse what `check` refuses, and any message whose parsing still raises
    (other than a lost connection, which Celery handles by reconnecting) instead of letting it stop the worker."""
    connection_errors = tuple(consumer.connection_errors) + tuple(consumer.channel_errors)
    worker = consumer.hostname

    def on_task_received(message):
        reason = check(message)
        if reason is None:
            try:
                return handler(message)
            except connection_errors:
                raise
            except Exception as e:
                if message.acknowledged:  # already handed on (or settled): refusing now would settle it twice
                    log.exception("error after accepting message %s", describe(message)[0])
                    return None
                reason = f"Celery could not parse it: {type(e).__name__}: {str(e)[:300]}"
        refuse(message, reason, worker)
        return None

    return on_task_received


def wrong_task(kind: str, task_name: str | None) -> str | None:
    """Why a message of task `task_name` may not run a shard of a `kind` job (another task's code would run it with
    the wrong work function and fail the job), or None when it may, or when there is no task name to check."""
    import kinds

    expected = kinds.task_for_kind().get(kind)
    if task_name is None or task_name == expected:
        return None
    return f"{WRONG_TASK}: {task_name!r} cannot run a shard of a job of kind {kind!r} (its task is {expected!r})"
