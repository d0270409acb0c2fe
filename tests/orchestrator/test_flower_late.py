"""A task that started before Flower did shows its name and arguments in Flower, not null: the progress events
carry them, and Celery's event state (which Flower uses) merges them into the task it first meets then."""

from __future__ import annotations

import time
from types import SimpleNamespace

from celery.events.state import State

from workers.runner import ShardContext


class _Task:
    name = "invert.shard"
    request = SimpleNamespace(id="6f1c-task")

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def send_event(self, type_: str, **fields) -> None:
        self.sent.append((type_, fields))


def test_progress_event_alone_names_the_task():
    task = _Task()
    hb = SimpleNamespace(progress=lambda **kw: None)
    ctx = ShardContext(None, None, "invert-0123456789ab", 3, "invert", {}, 1, "h:1:x", hb, task)
    ctx.progress(5, 40, unit="unet_calls")
    (type_, fields), = task.sent
    state = State()
    now = time.time()
    state.event({"type": type_, "uuid": task.request.id, "hostname": "n0@host", "timestamp": now,
                 "local_received": now, "clock": 1, **fields})
    t = state.tasks[task.request.id]
    assert t.name == "invert.shard" and "invert-0123456789ab" in t.kwargs and t.state == "PROGRESS"
