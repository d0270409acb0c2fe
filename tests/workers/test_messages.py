"""Messages sent straight to the broker: malformed ones are refused and recorded, pickle is never deserialised,
and the worker keeps serving real work."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from orchestrator import jobs
from orchestrator.demo import local_workers
from shared import constants as C
from shared.db import session_scope
from shared.models import Rejection, Shard
from tests.orchestrator.conftest import invert_args
from workers.dispatch import get_app

pytestmark = pytest.mark.slow


def test_malformed_and_pickle_messages(embedded, tiny_sd, m3fd_small, tmp_path):
    from orchestrator.submit import submitter
    submit_invert = submitter("invert")

    s = embedded
    app = get_app(s)
    target = jobs.create_job(s, "invert", {"never": "run"}, 1)  # rows only: nothing published for it
    beat = tmp_path / "run" / "heartbeat"
    # no reaper: it would publish the rows-only target job once it is 30 s old (a slow run), and run its shard
    with local_workers(s, 1, "gpu,cpu", tmp_path / "logs", env={"ORCH_HEARTBEAT_FILE": str(beat), "ORCH_REAPER": "0"}):
        bad = [
            {"kwargs": {"job_id": 5, "shard_index": "x"}},
            {"kwargs": {}},
            {"kwargs": {"job_id": "invert-000000000000", "shard_index": 0}},  # unknown job
            {"args": [1, 2, 3]},
            {"kwargs": {"job_id": "'; DROP TABLE jobs; --", "shard_index": 0}},
        ]
        for m in bad:
            app.send_task("invert.shard", queue=C.QUEUE_GPU, **m)
        app.send_task("no.such.task", kwargs={"job_id": target, "shard_index": 0}, queue=C.QUEUE_GPU)
        # a pickle message for a real shard: if it were deserialised, the shard would run
        app.send_task("invert.shard", kwargs={"job_id": target, "shard_index": 0}, queue=C.QUEUE_GPU,
                      serializer="pickle")
        job_id = submit_invert(s, invert_args(m3fd_small, tiny_sd, shards=2))  # real work after all that
        job = jobs.wait(s, job_id, timeout=300)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with session_scope(s) as ss:
                rejected = ss.execute(select(Rejection.ref, Rejection.reason)
                                      .where(Rejection.kind == "bad_message")).all()
            if len(rejected) >= 7:
                break
            time.sleep(0.5)
    assert job.state == "succeeded"  # the worker survived every bad message
    assert beat.exists()  # the worker main process touches the health-check file
    reasons = " | ".join(r for _, r in rejected)
    assert len(rejected) == 7, reasons  # the pickle message too: refused by its content type, before decoding
    for needle in ("job_id must be", "missing field", "unknown shard", "unexpected arguments", "unknown task name",
                   "content type 'application/x-python-serialize' refused"):
        assert needle in reasons
    with session_scope(s) as ss:
        state = ss.execute(select(Shard.state, Shard.attempts).where(Shard.job_id == target)).one()
    assert tuple(state) == ("pending", 0)  # the pickle message was refused, never executed
    log = (tmp_path / "logs" / "worker-0.log").read_text()
    assert "x-python-serialize" in log  # the worker says why it refused it


def test_every_kind_routes_to_a_known_queue(embedded):
    """The reaper republishes a lost message to the queue the app routes its task to (one source of routing)."""
    import kinds
    from shared import constants as C
    from workers.dispatch import queue_for

    queues = {kind: queue_for(embedded, task) for kind, task in kinds.task_for_kind().items()}
    assert set(queues.values()) <= set(C.QUEUES)
    assert queues["invert"] == C.QUEUE_GPU and queues["bench"] == C.QUEUE_CPU
    assert queues["train-ncsn"] == C.QUEUE_TRAIN
    # every job kind has a task, and every task the workers register has an explicit route: a task without one
    # would silently land on Celery's default queue, which no worker consumes
    from workers.dispatch import get_app

    app = get_app(embedded)
    app.loader.import_default_modules()
    # the workers' own tasks (a task another app in this process defined with shared=True would also be listed)
    ours = {name for name, t in app.tasks.items() if t.__module__.startswith("workers.")}
    assert set(kinds.task_for_kind().values()) <= ours, ours
    routes = app.conf.task_routes
    assert ours and all(name in routes and routes[name]["queue"] in C.QUEUES for name in ours), (ours, routes)


def test_large_submissions_publish_without_sent_events(embedded, monkeypatch):
    """Up to SENT_EVENTS_MAX messages go out with task-sent events (Flower lists them as sent); a larger
    submission's do not (each event costs twice its message, and Flower keeps only its last 10,000 tasks)."""
    from orchestrator import jobs
    from workers import dispatch

    used = []
    real = dispatch._app_for

    def spy(settings, **kw):  # the publishing app is asked for with sent_events=...; get_app() asks without
        if "sent_events" in kw:
            used.append(kw["sent_events"])
        return real(settings, **kw)

    monkeypatch.setattr(dispatch, "_app_for", spy)
    monkeypatch.setattr(dispatch, "SENT_EVENTS_MAX", 3)
    jobs.submit(embedded, "bench", {}, 3)
    jobs.submit(embedded, "bench", {}, 4)
    assert used == [True, False]
    assert real(embedded, False).conf.task_send_sent_event is False
    assert real(embedded, True).conf.task_send_sent_event is True
    assert len(list((embedded.broker_folder / "in").glob("*.cpu.msg"))) == 7  # every message out either way
