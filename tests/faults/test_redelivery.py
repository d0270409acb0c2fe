"""The same message delivered twice at once to two nodes, and a shard outliving Redis' visibility timeout: the
lease allows one execution."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from sqlalchemy import func, update

from shared import constants as C
from shared.db import session_scope
from shared.models import Job, Shard
from shared.settings import Settings
from shared.status import JobState, ShardState
from tests.faults import cluster as cl
from tests.faults.bench import (
    Bench,
    Outcome,
    attempts_of,
    conclude,
    fault_case,
    submit,
    wait_job,
    wait_running_on,
)
from tests.faults.conftest import assert_kept, run_case
from tests.faults.state import SMALL, create_unpublished

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _publish(settings: Settings, job_id: str, index: int, task_id: str) -> None:
    from workers.dispatch import get_app

    get_app(settings).send_task("invert.shard", kwargs={"job_id": job_id, "shard_index": index},
                                task_id=task_id)


@fault_case("duplicate")
def duplicate_delivery(bench: Bench) -> list[Outcome]:
    """Every shard's message is published twice with the same task id (a redelivery), back to back, so the two
    copies reach the two nodes at the same time; the lease lets one run, the other retries and then skips."""
    plan, s, t0 = SMALL, bench.fresh("duplicate"), time.monotonic()
    job_id = create_unpublished(s, bench.inputs, plan)
    task_ids = {i: str(uuid.uuid4()) for i in range(plan.shards)}
    with bench.cluster(s, "dup") as cluster:
        cluster.start(2)
        with cl.Watch(s, job_id) as watch:
            for i, tid in task_ids.items():
                _publish(s, job_id, i, tid)
                _publish(s, job_id, i, tid)
            with session_scope(s) as ss:  # what enqueue_shards records after publishing
                ss.execute(update(Shard).where(Shard.job_id == job_id, Shard.state == ShardState.PENDING)
                           .values(state=ShardState.QUEUED.value, enqueued_at=func.now()))
                ss.execute(update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED)
                           .values(state=JobState.RUNNING.value))
            wait_job(s, job_id)
            # the deferred copies must also have come back and found the shard done
            cl.wait_for(lambda: _skipped(cluster.logs(), task_ids) >= plan.shards, 60, 0.2, "every copy skipped")
        logs = cluster.logs()
    attempts = attempts_of(s, job_id)
    deferred = sum(1 for m in cl.RETRY_RE.finditer(logs) if m["id"] in task_ids.values())
    checks = {
        "each shard ran once (one claim per shard)": all(n == 1 for n in attempts.values()),
        "one owner per shard": all(len(watch.owners.get(i, [])) == 1 for i in task_ids),
        "every second copy was skipped": _skipped(logs, task_ids) == plan.shards,
        "some copies arrived while the shard ran (deferred by the lease)": deferred > 0,
    }
    notes = [f"{deferred} copies deferred by a live lease, {_skipped(logs, task_ids)} skipped as already done"]
    return [conclude(bench, s, "same message delivered twice", plan, job_id, plan.shards, t0, checks, notes)]


def _skipped(logs: str, task_ids: dict[int, str]) -> int:
    ids = set(task_ids.values())
    return sum(1 for line in logs.splitlines() if "'skipped': 'already done'" in line
               and any(t in line for t in ids))


def test_same_message_twice_runs_once(bench):
    (out,) = run_case(duplicate_delivery, bench)
    assert_kept(out)


@fault_case("visibility", backends=("servers",))
def visibility_timeout(bench: Bench) -> list[Outcome]:
    """A shard outlives Redis' visibility timeout: Redis makes its unacked message visible again and another node
    receives it while the first still runs the shard. The lease must prevent a second concurrent execution.

    Redis (kombu) keeps each unacked message in a hash with its delivery time in the `unacked_index` sorted set;
    a consumer's periodic scan puts back on the queue every message older than the timeout (2 h here). The case
    ages the running shard's entry by 3 h and runs that same scan (kombu's `QoS.restore_visible`) at once. The
    second node consumes only the `cpu` queue until then, and is told to consume `gpu` right after the scan, so it
    is idle and takes the restored message first, while the shard still runs on the first node (the real
    `orchestrator worker`, started cold: its first shard includes importing torch, so it lasts several seconds).
    """
    import redis as redis_lib
    from kombu import Connection

    from workers.dispatch import get_app

    plan, s, t0 = SMALL, bench.fresh("visibility"), time.monotonic()
    client = redis_lib.Redis.from_url(s.broker_url)
    with bench.cluster(s, "visibility") as cluster:
        (a,) = cluster.start(1, warm=False)
        (b,) = cluster.start(1, queues=C.QUEUE_CPU)
        job_id = submit(s, bench, plan)
        with cl.Watch(s, job_id) as watch, Connection(s.broker_url) as conn:
            r = wait_running_on(s, job_id, cluster, a)
            task_id = r.owner.rsplit(":", 1)[1]
            aged = 0
            for tag, raw in client.hgetall("unacked").items():
                if json.loads(raw)[0].get("headers", {}).get("id") == task_id:
                    client.zadd("unacked_index", {tag: time.time() - 3 * 3600})
                    aged += 1
            conn.default_channel.qos.restore_visible(num=100, interval=1)
            replies = get_app(s).control.add_consumer(C.QUEUE_GPU, destination=[b.hostname], reply=True, timeout=10)
            wait_job(s, job_id)
            cl.wait_for(lambda: _skipped(b.text() + a.text(), {0: task_id}) >= 1, 60, 0.2, "the copy skipped")
        logs = cluster.logs()
    attempts = attempts_of(s, job_id)
    lines = cl.task_log_lines(b.text(), task_id)
    checks = {
        "the running shard's message was aged past the timeout": aged == 1,
        "the second node started consuming the queue": bool(replies),
        "the second node received the restored message": any("received" in line for line in lines),
        "it arrived while the shard ran (the lease deferred it)": any(
            m["id"] == task_id for m in cl.RETRY_RE.finditer(logs)),
        "then it was skipped as already done": _skipped(logs, {0: task_id}) >= 1,
        "the shard ran once, under one owner": attempts[r.index] == 1 and watch.owners.get(r.index) == [r.owner],
        "no shard ran twice": all(n == 1 for n in attempts.values()),
    }
    notes = [f"shard {r.index} (task {task_id}) restored to the queue while {a.name} ran it; {b.name}: "
             + " | ".join(line.split("] ", 1)[-1][:90] for line in lines)]
    return [conclude(bench, s, "shard outlives visibility timeout", plan, job_id, 1, t0, checks, notes)]


def test_shard_outliving_visibility_timeout_runs_once(servers_bench):
    (out,) = run_case(visibility_timeout, servers_bench)
    assert_kept(out)
