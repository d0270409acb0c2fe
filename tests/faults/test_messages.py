"""Poison messages, wrong-task messages and a submission whose broker is down: nothing lost or duplicated, every
bad message refused and recorded, no worker exits, and a failed submission never runs on its own."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from sqlalchemy import update

from orchestrator import jobs
from shared import constants as C
from shared.db import session_scope
from shared.models import Job
from shared.status import JobState
from tests.faults import cluster as cl
from tests.faults.bench import (
    Bench,
    Outcome,
    attempts_of,
    cli,
    conclude,
    fault_case,
    shards_in,
    submit,
    wait_job,
)
from tests.faults.conftest import assert_kept, run_case
from tests.faults.messages import BROKEN, bad_messages, publish_raw, publish_task
from tests.faults.state import SMALL, create_unpublished, job_ids
from workers.dispatch import enqueue_shards

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _records(settings, n: int, after: int = 0, timeout: float = 60.0) -> list:
    """The bad-message records after the first `after` (the servers backend's database outlives a case), once
    there are `n` of them."""
    return cl.wait_for(lambda: (r := bad_messages(settings)[after:]) and len(r) >= n and r, timeout, 0.2,
                       f"{n} recorded bad messages")


@fault_case("poison")
def poison_messages(bench: Bench) -> list[Outcome]:
    """Every malformed shape of tests/faults/messages.py BROKEN (a JSON-object body, a two-item body, a non-JSON
    body, a non-JSON content type, no headers, args not a list), naming a shard of a running job, on both queues,
    while two nodes run the job. Each is rejected without requeue and recorded; no node exits."""
    plan, s, t0 = SMALL, bench.fresh("poison"), time.monotonic()
    before = len(bad_messages(s))
    with bench.cluster(s, "poison") as cluster:
        nodes = cluster.start(2)
        job_id = submit(s, bench, plan)
        for b in BROKEN:
            task = "invert.shard" if b.queue == C.QUEUE_GPU else "bench.shard"
            publish_raw(s, b.queue, task, {"job_id": job_id, "shard_index": 0}, b)
        wait_job(s, job_id)
        recorded = _records(s, len(BROKEN), before)
        time.sleep(1.0)  # a requeued copy would be refused (and recorded) again by now
        alive = sum(n.alive() for n in nodes)
        logs = cluster.logs()
    checks = {
        "worker count unchanged (2 nodes alive)": alive == len(nodes),
        "no Unrecoverable error in the logs": "Unrecoverable error" not in logs,
        "each poison message recorded once (none requeued)": len(bad_messages(s)) - before == len(BROKEN),
        "every record names the queue": all(r[0].split()[0] in (C.QUEUE_GPU, C.QUEUE_CPU) for r in recorded),
    }
    notes = [f"{r[0]}: {r[1][:160]}" for r in recorded]
    return [conclude(bench, s, "poison messages", plan, job_id, len(BROKEN), t0, checks, notes)]


def test_poison_messages(bench):
    assert_kept(*run_case(poison_messages, bench))


@fault_case("wrong_task")
def wrong_task_messages(bench: Bench) -> list[Outcome]:
    """A `train.run` and a `sample.shard` message for every shard of a running invert job, before its own
    messages: each claim refuses the task, records it and changes nothing; the invert messages then complete the
    job, each shard claimed once."""
    plan, s, t0 = SMALL, bench.fresh("wrong-task"), time.monotonic()
    job_id = create_unpublished(s, bench.inputs, plan)
    with session_scope(s) as ss:  # running, as once its messages are out (and so no reaper publishes it)
        ss.execute(update(Job).where(Job.id == job_id).values(state=JobState.RUNNING.value))
    before = len(bad_messages(s))
    with bench.cluster(s, "wrong-task", queues="gpu,cpu,train") as cluster:
        nodes = cluster.start(2)
        for i in range(plan.shards):
            publish_task(s, "train.run", job_id, i, C.QUEUE_TRAIN)
            publish_task(s, "sample.shard", job_id, i, C.QUEUE_GPU)
        recorded = _records(s, 2 * plan.shards, before)
        untouched = shards_in(s, job_id, "pending") == plan.shards and set(attempts_of(s, job_id).values()) == {0}
        enqueue_shards(s, job_id)
        wait_job(s, job_id)
        alive = sum(n.alive() for n in nodes)
    checks = {
        "worker count unchanged (2 nodes alive)": alive == len(nodes),
        "every wrong-task message refused and recorded": len(recorded) == 2 * plan.shards
        and all("wrong task" in r[1] for r in recorded),
        "the refused claims changed nothing": untouched,
        # a take-over after a lease lapsed under load may add a claim; a refused one never does (checked above)
        "every shard claimed by its own task": min(attempts_of(s, job_id).values()) >= 1,
    }
    notes = [recorded[0][1][:200], f"claims per shard: {sorted(attempts_of(s, job_id).values())}"]
    return [conclude(bench, s, "wrong-task messages", plan, job_id, 2 * plan.shards, t0, checks, notes)]


def test_wrong_task_messages(bench):
    assert_kept(*run_case(wrong_task_messages, bench))


@fault_case("submit_broker_down")
def submit_broker_down(bench: Bench) -> list[Outcome]:
    """`orchestrator submit` with the broker down (a closed port): one line, exit 2, no row, and a reaper pass
    publishes nothing. Then publishing fails after the rows exist (the connection drops mid-submission): the job
    is cancelled and named with `resume`, a reaper pass publishes nothing and no shard runs; `orchestrator resume
    JOB` then completes it."""
    plan, s, t0 = SMALL, bench.fresh("submit-broker"), time.monotonic()
    with bench.cluster(s, "submit-broker") as cluster:
        nodes = cluster.start(2)
        before = job_ids(s)
        args = bench.inputs.args(plan)
        down = cli(replace(s, broker_url="redis://127.0.0.1:1/0"), "submit", "invert", "--data", args.data,
                    "--model", args.model, "--shards", str(plan.shards), "--size", str(args.size))
        no_row = job_ids(s) == before
        reaped_after_refusal = cli(s, "reap", "--stale-after", "0")

        def unreachable(*_a, **_kw):
            raise ConnectionError("Connection closed by server.")

        orig, jobs.enqueue_shards = jobs.enqueue_shards, unreachable
        try:
            submit(s, bench, plan)
            told = ""
        except Exception as e:
            told = str(e)
        finally:
            jobs.enqueue_shards = orig
        (job_id,) = job_ids(s) - before
        cancelled = jobs.get_job(s, job_id).state == JobState.CANCELLED
        reaped = cli(s, "reap", "--stale-after", "0")
        time.sleep(2.0)
        never_ran = set(attempts_of(s, job_id).values()) == {0}
        resumed = cli(s, "resume", job_id)
        wait_job(s, job_id)
        alive = sum(n.alive() for n in nodes)
    lines = down.stderr.strip().splitlines()
    checks = {
        "broker down: exit 2, one line, no traceback": down.returncode == C.EXIT_USAGE and len(lines) == 1
        and "Traceback" not in down.stderr,
        "broker down: no row created": no_row,
        "a reaper pass after the refusal publishes nothing": "re-enqueued 0 shard" in reaped_after_refusal.stdout,
        "publish failure: one line naming the job and `resume`": f"orchestrator resume {job_id}" in told
        and "\n" not in told,
        "publish failure: the job is cancelled": cancelled,
        "a reaper pass publishes nothing, no shard ran": never_ran and "re-enqueued 0 shard" in reaped.stdout,
        "`orchestrator resume` exited 0": resumed.returncode == 0,
        "worker count unchanged (2 nodes alive)": alive == len(nodes),
    }
    notes = [f"submit with the broker down: {lines[-1] if lines else down.stdout[-200:]}", f"told: {told}",
             f"reap: {reaped_after_refusal.stdout.strip()} / {reaped.stdout.strip()}"]
    return [conclude(bench, s, "submit, broker down", plan, job_id, 2, t0, checks, notes)]


def test_submit_with_the_broker_down(bench):
    assert_kept(*run_case(submit_broker_down, bench))
