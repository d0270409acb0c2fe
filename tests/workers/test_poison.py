"""Poison and wrong-task messages, on both brokers, with a real worker: each is refused without requeue and
recorded, the worker stays up, and real work still completes."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import select

from orchestrator import jobs
from orchestrator import submit as submit_mod
from orchestrator.demo import local_workers
from shared import constants as C
from shared.db import session_scope
from shared.models import Job, Shard
from tests.faults.messages import BROKEN, bad_messages, publish_raw, publish_task
from tests.orchestrator.conftest import create_only, invert_args
from workers.dispatch import enqueue_shards

#: no reaper in these workers: the target jobs are rows only, and a reaper would publish them after 30 s
NO_REAPER = {"ORCH_REAPER": "0"}


def _wait_records(settings, n: int, timeout: float = 180.0) -> list[tuple[str, str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        got = bad_messages(settings)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


def _shard(settings, job_id: str, index: int = 0) -> tuple:
    with session_scope(settings) as s:
        return tuple(s.execute(select(Shard.state, Shard.attempts, Shard.error)
                               .where(Shard.job_id == job_id, Shard.index == index)).one())


@pytest.mark.slow
def test_poison_messages_are_refused_and_the_worker_stays_up(backend, tmp_path):
    s = backend
    target = jobs.create_job(s, "bench", {}, 1)  # rows only: the poison names its shard
    with local_workers(s, 1, "gpu,cpu", tmp_path / "logs", env=NO_REAPER) as procs:
        for b in BROKEN:
            task = "invert.shard" if b.queue == C.QUEUE_GPU else "bench.shard"
            publish_raw(s, b.queue, task, {"job_id": target, "shard_index": 0}, b)
        recorded = _wait_records(s, len(BROKEN))
        good = jobs.submit(s, "bench", {}, 2)  # real work after all that, on the same worker
        job = jobs.wait(s, good, timeout=180)
        alive = [p.poll() is None for p in procs]
    log = (tmp_path / "logs" / "worker-0.log").read_text()
    assert alive == [True], log[-3000:]
    assert "Unrecoverable error" not in log
    assert job.state == "succeeded", log[-3000:]
    assert len(bad_messages(s)) == len(BROKEN), recorded  # each refused once: none was requeued
    for b in BROKEN:  # the record names the queue and keeps the first bytes
        assert any(ref.startswith(b.queue + " ") for ref, _, _ in recorded), (b.name, recorded)
    reasons = " | ".join(r for _, r, _ in recorded)
    for needle in ("body must be [args, kwargs, embed], got a JSON dict", "got a 2-item list", "does not decode",
                   "content type 'application/x-yaml'", "header 'task' missing", "[int, dict, dict]",
                   "body starts b'"):
        assert needle in reasons, reasons
    assert all(w and w.startswith("local0@") for _, _, w in recorded)
    assert _shard(s, target) == ("pending", 0, None)  # no poison ran the shard it names


@pytest.mark.slow
def test_wrong_task_for_the_kind_is_refused(backend, tiny_sd, m3fd_small, tmp_path):
    """A train.run or sample.shard message naming a live invert job's shard is refused at the claim and recorded;
    the job is unharmed and the invert message completes the shard."""
    s = backend
    job_id = create_only(submit_mod.submitter("invert"), s, invert_args(m3fd_small, tiny_sd, shards=1))
    with session_scope(s) as ss:  # live: as if its messages were out
        ss.get(Job, job_id).state = "running"
    with local_workers(s, 1, "gpu,cpu,train", tmp_path / "logs", env=NO_REAPER) as procs:
        publish_task(s, "train.run", job_id, 0, C.QUEUE_TRAIN)
        publish_task(s, "sample.shard", job_id, 0, C.QUEUE_GPU)
        recorded = _wait_records(s, 2)
        untouched = _shard(s, job_id)
        state = jobs.get_job(s, job_id).state
        enqueue_shards(s, job_id)  # now the right message
        job = jobs.wait(s, job_id, timeout=300)
        alive = [p.poll() is None for p in procs]
    log = (tmp_path / "logs" / "worker-0.log").read_text()
    assert len(recorded) == 2, recorded
    assert {ref.split()[0] for ref, _, _ in recorded} == {"train.run", "sample.shard"}
    assert all("wrong task" in why and "kind 'invert'" in why for _, why, _ in recorded), recorded
    assert untouched == ("pending", 0, None) and state == "running"  # refused before the claim changed anything
    assert alive == [True]
    assert job.state == "succeeded", log[-3000:]
    assert _shard(s, job_id)[:2] == ("done", 1)  # one claim: the right task's


@pytest.mark.parametrize("broken", BROKEN, ids=lambda b: b.name)
def test_check_names_what_is_wrong(broken):
    """The guard's check on its own (no worker): each broken shape is refused, a good message passes."""
    from kombu.message import Message

    from workers import poison
    from workers.celery_app import app

    def message(headers, body, content_type):
        return Message(body=body, content_type=content_type, content_encoding="utf-8", headers=headers,
                       delivery_info={"routing_key": broken.queue}, accept={"application/json"})

    good = app.amqp.as_task_v2("id-1", "bench.shard", kwargs={"job_id": "bench-0123456789ab", "shard_index": 0})
    assert poison.check(message(dict(good.headers), json.dumps(list(good.body)).encode(), "application/json")) is None
    bad = message(*broken.make(dict(good.headers), list(good.body)))
    assert poison.check(bad)
    ref, first = poison.describe(bad)
    assert ref.startswith(broken.queue + " ") and first.startswith("b")


def test_wrong_task_names_both_tasks():
    from workers.poison import wrong_task

    assert wrong_task("invert", "invert.shard") is None and wrong_task("invert", None) is None
    why = wrong_task("invert", "train.run")
    assert why.startswith("wrong task") and "train.run" in why and "invert.shard" in why
    assert wrong_task("train-ncsn", "train.run") is None
