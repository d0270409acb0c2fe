"""The fault cases: each injects one kind of fault into a real job on real worker nodes and returns what happened,
compared with the fault-free run of the same job (tests/faults/bench.py). The pytest modules and
`python -m tests.faults.summary` run these same registered cases (CASES).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from orchestrator import jobs
from orchestrator.submit import submitter
from shared import constants as C
from shared.db import session_scope
from shared.models import Job, Shard
from shared.settings import Settings
from shared.status import JobState, ShardState
from tests.faults import cluster as cl
from tests.faults.bench import (
    JOB_TIMEOUT,
    Bench,
    Outcome,
    Skip,
    attempts_of,
    conclude,
    shards_in,
    submit,
    wait_job,
    wait_running_on,
)
from tests.faults.infra import PrivateRedis, TcpProxy, Tmpfs
from tests.faults.state import (
    MANY,
    SMALL,
    SubmitterCrash,
    crash_before_publish,
    create_unpublished,
    fingerprint,
    job_ids,
)
from tests.faults.training import frozen_training_worker

# -- kill -9 ------------------------------------------------------------------------------------------------------


def kill_pool_children(bench: Bench, kills: int = 20, seed: int = 0, per_shard: int = 2, nodes: int = 4,
                       ) -> list[Outcome]:
    """kill -9 of the pool child running a shard, `kills` times in one 20-shard job on `nodes` nodes, at seeded
    random moments inside shards, at most `per_shard` times per shard.

    The Celery main process forks a new child, and after `worker_lost_wait` (10 s) requeues the message
    (acks_late + reject_on_worker_lost); meanwhile the lease expires and the reaper thread re-enqueues the shard.
    Whichever delivery comes first takes the shard over; the other finds it leased or done.
    """
    plan, s, t0 = MANY, bench.fresh("kill-children"), time.monotonic()
    rng = random.Random(seed)
    killed: list[tuple[int, int]] = []
    late = 0
    notes: list[str] = []
    with bench.cluster(s, "kill-children") as cluster:
        started = cluster.start(nodes)
        job_id = submit(s, bench, plan)
        done_killing = time.monotonic() + JOB_TIMEOUT
        while len(killed) < kills and time.monotonic() < done_killing:
            if JobState(jobs.get_job(s, job_id).state).finished:
                break
            victims = [r for r in cl.running_shards(s, job_id)
                       if (r.index, r.attempts) not in killed
                       and sum(1 for i, _ in killed if i == r.index) < per_shard
                       and r.pid not in {n.pid for n in started} and cluster.node_holding(r.pid)]
            if not victims:
                time.sleep(0.02)
                continue
            r = rng.choice(victims)
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the shard
            state, owner, _ = cl.shard_row(s, job_id, r.index)
            if state != ShardState.RUNNING or owner != r.owner or not cluster.node_holding(r.pid):
                continue  # it finished first: that would not be a mid-shard kill
            os.kill(r.pid, signal.SIGKILL)
            if _finished_by(s, job_id, r.index, r.pid):
                late += 1  # it committed its completion just before the signal: not a mid-shard kill
                continue
            killed.append((r.index, r.attempts))
        wait_job(s, job_id)
        alive = all(n.alive() for n in started)
    attempts = attempts_of(s, job_id)
    per = Counter(i for i, _ in killed)
    notes.append(f"killed (shard, attempt): {killed}; {late} kill(s) landed just after a shard completed")
    checks = {
        f"{kills} pool children killed mid-shard": len(killed) == kills,
        "each killed shard was run again (attempts > kills of it)": all(attempts[i] > n for i, n in per.items()),
        "every node survived (new pool children forked)": alive,
    }
    return [conclude(bench, s, "kill -9 pool child mid-shard", plan, job_id, len(killed), t0, checks, notes)]


def _finished_by(settings: Settings, job_id: str, index: int, pid: int | None) -> bool:
    """Whether the shard is done and its result was recorded by process `pid`."""
    with session_scope(settings) as s:
        state, result = s.execute(select(Shard.state, Shard.result)
                                  .where(Shard.job_id == job_id, Shard.index == index)).one()
    return state == ShardState.DONE and (result or {}).get("pid") == pid


def _all_gone(pids: list[int | None], timeout: float = 10.0) -> bool:
    """Whether every process in `pids` has ended within `timeout` s (a killed process takes a moment to go)."""
    try:
        cl.wait_for(lambda: not any(p and cl.pid_alive(p) for p in pids), timeout, 0.05, "processes to end")
        return True
    except TimeoutError:
        return False


def kill_node_mid_shard(bench: Bench) -> list[Outcome]:
    """kill -9 of a whole node (main process and children) while its child runs a shard; the other node's reaper
    re-enqueues the shard once its lease expires (the filesystem broker lost the message with the node; Redis would
    hold it unacked for the 2 h visibility timeout)."""
    plan, s, t0 = SMALL, bench.fresh("kill-node"), time.monotonic()
    with bench.cluster(s, "kill-node") as cluster:
        a, b = cluster.start(2)
        job_id = submit(s, bench, plan)
        with cl.Watch(s, job_id) as watch:
            r = wait_running_on(s, job_id, cluster, a)
            a.kill_node()
            gone = _all_gone([r.pid, a.pid])
            wait_job(s, job_id)
        b_alive = b.alive()
    attempts = attempts_of(s, job_id)
    owners = watch.owners.get(r.index, [])
    checks = {
        "the node's main process and child are gone": gone,
        "the killed shard ran exactly twice": attempts[r.index] == 2,
        "every other shard ran once": all(n == 1 for i, n in attempts.items() if i != r.index),
        "the second run was not on the killed node": len(owners) == 2 and cl.owner_pid(owners[-1]) != r.pid,
        "the surviving node is still up": b_alive,
    }
    notes = [f"killed node {a.name} (pid {a.pid}) while shard {r.index} ran in pid {r.pid}; owners seen: {owners}"]
    return [conclude(bench, s, "kill -9 whole node mid-shard", plan, job_id, 1, t0, checks, notes)]


def kill_node_mid_training(bench: Bench, epochs: int = 6, every: int = 5) -> list[Outcome]:
    """kill -9 of the node running a DDP training run (2 gloo ranks under torchrun) after it recorded a checkpoint.

    The node's pool child dies with the node; torchrun (in its own session, with a parent-death signal) and its
    ranks follow. The other node's reaper re-enqueues the run when the lease expires, and the run resumes from its
    latest recorded checkpoint. A run without the fault would record the same checkpoints (at the same steps),
    the same metric rows and end at the same step; the steps trained again after the resume must reproduce the
    losses the killed attempt logged for them (training resumes deterministically), so the end state is the
    fault-free run's.
    """
    from orchestrator.submit import submitter
    submit_train_translator = submitter("train-translator")
    from shared.models import Checkpoint, Metric

    s, t0 = bench.fresh("train"), time.monotonic()
    with bench.cluster(s, "train", queues="gpu,train,cpu") as cluster:
        a, b = cluster.start(2)
        inv = submit(s, bench, SMALL)
        inv_state = wait_job(s, inv).state
        args = argparse.Namespace(latents=inv, preset="readme", epochs=epochs, lr=1e-3, weight_decay=None,
                                  batch_size=2, gpus=2, base_channels=8, depth=2, amp=False, checkpoint_every=every,
                                  max_steps=None, log_every=1, seed=0)
        job_id = submit_train_translator(s, args)

        def checkpoint_on_a_node():
            with session_scope(s) as ss:
                n = ss.execute(select(func.count()).select_from(Checkpoint)
                               .where(Checkpoint.job_id == job_id)).scalar_one()
            running = cl.running_shards(s, job_id)
            return n > 0 and running and cluster.node_holding(running[0].pid)

        victim = cl.wait_for(checkpoint_on_a_node, 240, 0.1, "a recorded checkpoint")
        run_dir = Path(s.storage) / "jobs" / job_id / "run"
        first = cl.processes_mentioning(str(run_dir / "config-attempt001.json"))  # torchrun and its ranks
        before = max(step for step, _ in _checkpoints(s, job_id))
        victim.kill_node()
        gone_at = time.time() if _all_gone(first, 60.0) else None
        job = wait_job(s, job_id, 300)
        survivor_alive = (b if victim is a else a).alive()
        if not JobState(job.state).finished:
            jobs.cancel(s, job_id)
    ev = _events(run_dir)
    starts = [next((e for e in evs if e["event"] == "start"), None) for evs in ev.values()]
    start1 = starts[0] or {}
    total, spe = int(start1.get("total_steps", -1)), int(start1.get("steps_per_epoch", -1))
    expected_ckpts = sorted({k for k in range(every, total, every) if k % spe} | {e * spe for e in range(1, epochs + 1)})
    ckpts = _checkpoints(s, job_id)
    with session_scope(s) as ss:
        metric_keys = sorted(ss.execute(select(Metric.name, Metric.step).where(Metric.job_id == job_id,
                                                                              Metric.step >= 0)).all())
    # per step the loss, per epoch end the epoch's loss and the held-out loss (the invert job has test pairs), and
    # once, at the first epoch end, the held-out loss of the identity map
    expected_metrics = sorted([("loss", k) for k in range(1, total + 1)]
                              + [("loss_epoch", e * spe) for e in range(1, epochs + 1)]
                              + [("val_loss_epoch", e * spe) for e in range(1, epochs + 1)]
                              + [("val_loss_identity", spe)])
    losses = [{e["step"]: e["loss"] for e in evs if e["event"] == "progress"} for evs in ev.values()]
    again = sorted(set(losses[0]) & set(losses[1])) if len(losses) == 2 else []
    start2 = starts[1] if len(starts) == 2 and starts[1] else {}
    config2 = run_dir / "config-attempt002.json"
    fp = fingerprint_training(s, job_id)
    checks = {
        "the invert job it trains on succeeded": inv_state == JobState.SUCCEEDED,
        "the killed node's training processes (torchrun, ranks) are gone": len(first) >= 3 and gone_at is not None,
        "...before the second attempt started": gone_at is not None and config2.exists()
        and config2.stat().st_mtime >= gone_at - 0.5,
        "two attempts": list(ev) == ["events-attempt001.jsonl", "events-attempt002.jsonl"],
        "the second attempt resumed from a recorded checkpoint": bool(start2.get("resumed_from"))
        and int(start2.get("step", -1)) >= before,
        "it ended at the last step": fp["steps"] == total and fp["attempts"] == 2,
        "checkpoints at the fault-free run's steps, each intact": [st for st, _ in ckpts] == expected_ckpts
        and not fp["integrity"],
        "one metric row per step, as without the fault": metric_keys == expected_metrics,
        "steps trained again reproduce the killed attempt's losses": bool(again)
        and all(losses[0][k] == losses[1][k] for k in again),
        "the other node is still up": survivor_alive,
    }
    equal = all(v for k, v in checks.items() if k != "the other node is still up") and job.state == "succeeded"
    out = Outcome("kill -9 whole node mid-training", bench.backend, 1, 1, 0 if job.state == "succeeded" else 1,
                  fp["duplicated"], job.state, equal, round(time.monotonic() - t0, 1), checks,
                  [f"killed {victim.name} after checkpoint step {before}; resumed at step {start2.get('step')} of "
                   f"{total}; {len(again)} steps trained twice, same losses; checkpoints {[st for st, _ in ckpts]}"])
    out.checks["job succeeded"] = job.state == JobState.SUCCEEDED
    out.checks["nothing recorded twice"] = fp["duplicated"] == 0
    return [out]


def _checkpoints(settings: Settings, job_id: str) -> list[tuple[int, str]]:
    from shared.models import Checkpoint

    with session_scope(settings) as s:
        return [tuple(r) for r in s.execute(select(Checkpoint.step, Checkpoint.reason)
                                            .where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))]


def _events(run_dir: Path) -> dict[str, list[dict]]:
    return {f.name: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for f in sorted(run_dir.glob("events-attempt*.jsonl"))}


def fingerprint_training(settings: Settings, job_id: str) -> dict:
    """Attempts, final step, intact checkpoint files, and rows recorded more than once (artifacts per URI, rows
    per checkpoint step, the job's done counter)."""
    from shared.models import Artifact, Checkpoint
    from shared.storage import Storage, sha256_file

    storage = Storage(settings.storage)
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        attempts = s.execute(select(Shard.attempts).where(Shard.job_id == job_id)).scalar_one()
        arts = s.execute(select(Artifact.uri, Artifact.sha256).join(Checkpoint, Checkpoint.artifact_id == Artifact.id)
                         .where(Checkpoint.job_id == job_id)).all()
        per_step = Counter(s.execute(select(Checkpoint.step).where(Checkpoint.job_id == job_id)).scalars())
        shards_done = job.shards_done
    from orchestrator import queries

    # after the session: a second transaction inside it would wait on this one's SQLite lock
    steps = int(queries.summary_metrics(settings, job_id).get("steps", -1))
    integrity = [uri for uri, sha in arts if not storage.resolve(uri).is_file()
                 or sha256_file(storage.resolve(uri)) != sha]
    duplicated = sum(n - 1 for n in per_step.values()) + max(0, shards_done - 1)
    return {"attempts": attempts, "steps": steps, "integrity": integrity, "duplicated": duplicated}


# -- SIGTERM --------------------------------------------------------------------------------------------------------


def warm_shutdown(bench: Bench, cold: bool = True) -> list[Outcome]:
    """SIGTERM to a node while it runs a shard: the shard finishes and is recorded by that node, the node exits 0,
    the other node does the rest; nothing runs twice. With `cold`, that node is the real `orchestrator worker`
    command (which execs Celery, so the signal reaches Celery itself); its first shard then includes importing
    torch and diffusers, so it lasts a while."""
    plan, s, t0 = SMALL, bench.fresh("sigterm"), time.monotonic()
    with bench.cluster(s, "sigterm") as cluster:
        (a,) = cluster.start(1, warm=not cold)
        cluster.start(1)
        job_id = submit(s, bench, plan)
        with cl.Watch(s, job_id) as watch:
            r = wait_running_on(s, job_id, cluster, a, timeout=180)
            a.warm_shutdown()
            try:
                rc = a.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                rc = None
            wait_job(s, job_id)
        log_a = a.text()
    attempts = attempts_of(s, job_id)
    checks = {
        "the node exited 0 after its shard": rc == 0,
        "the node logged a warm shutdown": "Warm shutdown" in log_a,
        "the interrupted shard was finished by the same owner": watch.owners.get(r.index) == [r.owner],
        "no shard ran twice": all(n == 1 for n in attempts.values()),
    }
    notes = [f"SIGTERM to {a.name} while shard {r.index} ran in pid {r.pid}; exit status {rc}"]
    return [conclude(bench, s, "SIGTERM warm shutdown mid-shard", plan, job_id, 1, t0, checks, notes)]


# -- broker and database outages -----------------------------------------------------------------------------------


def redis_restart(bench: Bench, down: float = 3.0, persistent: bool = True, timeout: float = JOB_TIMEOUT,
                  ) -> list[Outcome]:
    """A private Redis is stopped (SIGTERM) and started again mid-job. `persistent`: with AOF, as deploy/ runs it,
    so queued messages survive; without, they are lost with the restart and only the DB knows those shards."""
    plan, t0 = SMALL, time.monotonic()
    server = PrivateRedis(bench.folder("redis" if persistent else "redis-volatile"), appendonly=persistent)
    server.start()
    try:
        s = replace(bench.fresh("redis"), broker_url=server.url)
        with bench.cluster(s, "redis" if persistent else "redis-volatile") as cluster:
            cluster.start(2)
            job_id = submit(s, bench, plan)
            cl.wait_for(lambda: shards_in(s, job_id, "done") >= 2 and cl.running_shards(s, job_id), 120, 0.02,
                        "two shards done and one running")
            queued = shards_in(s, job_id, "queued")
            server.restart(down)
            wait_job(s, job_id, timeout)
    finally:
        server.stop()
    case = "Redis restarted mid-job" + ("" if persistent else " (no persistence)")
    return [conclude(bench, s, case, plan, job_id, 1, t0,
                     notes=[f"Redis down {down:.0f} s with {queued} shard(s) queued"])]


def postgres_outage(bench: Bench, down: float = 5.0) -> list[Outcome]:
    """The workers reach PostgreSQL through a proxy that is cut for `down` s mid-job (open connections dropped,
    new ones refused): heartbeats fail and leases age, DB errors in tasks retry with backoff."""
    plan, s, t0 = SMALL, bench.fresh("postgres"), time.monotonic()
    proxy = TcpProxy(_host_port(s.database_url))
    proxy.start()
    try:
        with bench.cluster(s, "pg", env={"ORCH_DATABASE_URL": proxy.url_for(s.database_url)}) \
                as cluster:
            cluster.start(2)
            job_id = submit(s, bench, plan)
            cl.wait_for(lambda: shards_in(s, job_id, "done") >= 2 and cl.running_shards(s, job_id), 120, 0.02,
                        "two shards done and one running")
            proxy.cut()
            time.sleep(down)
            proxy.restore()
            wait_job(s, job_id)
            logs = cluster.logs()
    finally:
        proxy.close()
    retried = logs.count("will retry") + logs.count(" retry: ")
    checks = {"the workers saw the outage (DB errors retried)": retried > 0 or "heartbeat failed" in logs}
    return [conclude(bench, s, f"PostgreSQL unavailable {down:.0f} s", plan, job_id, 1, t0, checks,
                     [f"{retried} retry log lines"])]


def reaper_after_db_down_at_start(bench: Bench, timeout: float = 30.0) -> list[Outcome]:
    """PostgreSQL is unreachable while a node starts (as when workers and the database start together), then
    comes back. The node works, but must also reap: a shard left `running` under a dead owner whose lease expired
    (forced in the DB here, as a node killed earlier leaves it) must be re-enqueued and finished."""
    from datetime import timedelta

    from workers import bookkeeping as bk
    from workers.dispatch import enqueue_shards

    plan, s, t0 = SMALL, bench.fresh("reaper-start"), time.monotonic()
    proxy = TcpProxy(_host_port(s.database_url))
    proxy.start()
    proxy.cut()
    try:
        with bench.cluster(s, "reaper-start", env={"ORCH_DATABASE_URL": proxy.url_for(s.database_url)}) as cluster:
            (node,) = cluster.start(1)
            proxy.restore()
            job_id = create_unpublished(s, bench.inputs, plan)
            with session_scope(s) as ss:  # shard 0: claimed by a node that died; its lease expired
                ss.execute(update(Shard).where(Shard.job_id == job_id, Shard.index == 0).values(
                    state=ShardState.RUNNING.value, attempts=1, lease_owner="gone:1:dead",
                    lease_expires_at=bk.utcnow() - timedelta(seconds=1)))
            enqueue_shards(s, job_id, list(range(1, plan.shards)))
            wait_job(s, job_id, timeout)
            handler_failed = "_on_worker_ready" in node.text() and "raised" in node.text()
    finally:
        proxy.close()
    notes = ["the node's worker_ready handler raised, so it runs no reaper thread"] if handler_failed else []
    return [conclude(bench, s, "reaper after DB down at node start", plan, job_id, 1, t0, notes=notes)]


def _host_port(url: str) -> tuple[str, int]:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return u.host or "127.0.0.1", int(u.port or 5432)


# -- duplicate deliveries ------------------------------------------------------------------------------------------


def _publish(settings: Settings, job_id: str, index: int, task_id: str) -> None:
    from workers.dispatch import get_app

    get_app(settings).send_task("invert.shard", kwargs={"job_id": job_id, "shard_index": index},
                                task_id=task_id)


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


# -- storage --------------------------------------------------------------------------------------------------------


def storage_faults(bench: Bench) -> list[Outcome]:
    """Artifact storage on a tiny tmpfs: first full (room for about one artifact), then read-only. Each time the job
    fails with a one-line error naming the path and the cause, nothing half-written is recorded or left behind;
    after the space is freed / the mount made writable, `orchestrator retry JOB --failed` completes the job."""
    reason = Tmpfs.available(bench.work)
    if reason:
        raise Skip(reason)
    s0 = bench.fresh("storage")
    art_bytes = max(bench.refs.get(SMALL).artifact_bytes)
    fs = Tmpfs(bench.work / "storage-mount")
    outcomes = []
    try:
        fs.mount(size=_pages(art_bytes) + 4096)  # one artifact fits, the next does not
        s = replace(s0, storage=str(fs.path))
        with bench.cluster(s, "storage") as cluster:
            cluster.start(2)
            for case, break_it, fix_it in (
                ("storage full", lambda: None, lambda: fs.remount(size=64 << 20)),
                ("storage not writable", lambda: fs.remount(ro=True), lambda: fs.remount(ro=False)),
            ):
                t0 = time.monotonic()
                break_it()
                job_id = submit(s, bench, SMALL)
                job = wait_job(s, job_id)
                cl.wait_for(lambda job_id=job_id: shards_in(s, job_id, "queued", "running", "pending") == 0, 120,
                            0.2, "every shard settled")
                failed_fp = fingerprint(s, job_id)
                error = job.error or ""
                checks = {
                    "the job failed": job.state == JobState.FAILED,
                    "its error is one line": error.strip() != "" and "\n" not in error.strip(),
                    "the error names the storage path": str(fs.path) in error,
                    "the error names the cause": any(w in error for w in ("No space", "Read-only", "not writable")),
                    "no half-written file left": not failed_fp.stray,
                    "every recorded artifact is complete": not failed_fp.integrity,
                    "an artifact row only for done shards": all(
                        failed_fp.shard_states[i] == "done" for i in failed_fp.artifacts),
                }
                fix_it()
                retry = _cli(s, "retry", job_id, "--failed")
                checks["`orchestrator retry --failed` succeeded"] = retry.returncode == 0
                wait_job(s, job_id)
                notes = [f"error: {error[:300]!r}", f"retry: {retry.stdout.strip()} {retry.stderr.strip()[-300:]}",
                         f"before retry: {failed_fp.shard_states}"]
                outcomes.append(conclude(bench, s, case, SMALL, job_id, 1, t0, checks, notes))
    finally:
        fs.umount()
    return outcomes


def _pages(n: int) -> int:
    return (n + 4095) // 4096 * 4096


def _cli(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=cl.worker_env(settings), cwd=cl.REPO,
                          capture_output=True, text=True, timeout=timeout)


# -- submitter crash ------------------------------------------------------------------------------------------------


def submitter_crash(bench: Bench) -> list[Outcome]:
    """The submitter dies after committing a job's rows and before publishing any shard: `orchestrator resume JOB`
    completes one such job, `orchestrator reap` (what every worker's reaper thread runs, here without waiting the
    30 s that mark a queued job as orphaned) the other. A crash inside the creating transaction leaves no row."""
    plan, s = SMALL, bench.fresh("submitter")
    outcomes = []
    with bench.cluster(s, "submitter") as cluster:
        cluster.start(2)
        for case, command in (("submitter crash -> resume", ("resume",)),
                              ("submitter crash -> reaper", ("reap", "--stale-after", "0"))):
            t0 = time.monotonic()
            before = job_ids(s)
            with crash_before_publish():
                try:
                    submit_invert(s, bench.inputs.args(plan))
                    crashed = False
                except SubmitterCrash:
                    crashed = True
            (job_id,) = job_ids(s) - before
            queued = jobs.get_job(s, job_id).state == JobState.QUEUED
            pending = shards_in(s, job_id, "pending") == plan.shards
            time.sleep(1.0)
            untouched = shards_in(s, job_id, "pending") == plan.shards  # nothing was published
            args = (command[0], job_id) if command[0] == "resume" else command
            run = _cli(s, *args)
            wait_job(s, job_id)
            leftovers = shards_in(s, job_id, "pending", "queued", "running")
            checks = {
                "the submitter crashed after creating the rows": crashed and queued and pending,
                "no shard ran before recovery (no message existed)": untouched,
                f"`orchestrator {command[0]}` exited 0": run.returncode == 0,
                "no orphan rows (no shard left pending, queued or running)": leftovers == 0,
            }
            notes = [f"orchestrator {' '.join(args)}: {run.stdout.strip()} {run.stderr.strip()[-300:]}"]
            outcomes.append(conclude(bench, s, case, plan, job_id, 1, t0, checks, notes))
    outcomes[-1].checks["a crash inside create_job leaves no row"] = _crash_inside_create_job(s)
    return outcomes


def _crash_inside_create_job(settings: Settings) -> bool:
    """Two items with the same pair id make the creating transaction fail half-way: no job, shard or item row."""
    from sqlalchemy.exc import IntegrityError

    def counts():
        with session_scope(settings) as s:
            return tuple(s.execute(select(func.count()).select_from(t)).scalar_one() for t in (Job, Shard))

    before = counts()
    item = {"pair_id": "p", "split": "train", "rgb_path": "a", "ir_path": "b", "shard_index": 0}
    try:
        jobs.create_job(settings, "invert", {}, 2, [item, item])
    except IntegrityError:
        pass
    return counts() == before


from tests.faults.cases_messages import poison_messages, submit_broker_down, wrong_task_messages  # noqa: E402

submit_invert = submitter("invert")


@dataclass(frozen=True)
class Case:
    """A registered case: its function, the backends it applies to, and its arguments per backend."""

    fn: Callable[..., list[Outcome]]
    backends: tuple[str, ...]
    kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(self, bench: Bench, **overrides: Any) -> list[Outcome]:
        return self.fn(bench, **{**self.kwargs.get(bench.backend, {}), **overrides})


BOTH = ("servers", "embedded")
#: Every case, by the name `python -m tests.faults.summary --cases` takes. The pytest modules run the same ones.
CASES: dict[str, Case] = {
    # 20 kills in one job on the deployed stack; the embedded default runs the same recovery path, fewer times
    "kill_children": Case(kill_pool_children, BOTH, {"servers": {"kills": 20}, "embedded": {"kills": 4}}),
    "kill_node": Case(kill_node_mid_shard, BOTH),
    "kill_training": Case(kill_node_mid_training, ("servers",)),
    # on servers the signalled node is the real `orchestrator worker` command, started cold
    "sigterm": Case(warm_shutdown, BOTH, {"servers": {"cold": True}, "embedded": {"cold": False}}),
    "redis_restart": Case(redis_restart, ("servers",)),
    "redis_volatile": Case(redis_restart, ("servers",), {"servers": {"persistent": False, "timeout": 15.0}}),
    "postgres_outage": Case(postgres_outage, ("servers",)),
    "reaper_start": Case(reaper_after_db_down_at_start, ("servers",), {"servers": {"timeout": 15.0}}),
    "duplicate": Case(duplicate_delivery, BOTH),
    "visibility": Case(visibility_timeout, ("servers",)),
    # storage does not depend on the broker or the database
    "storage": Case(storage_faults, ("embedded",)),
    "submitter": Case(submitter_crash, BOTH),
    "freeze_training": Case(frozen_training_worker, BOTH),
    "poison": Case(poison_messages, BOTH),
    "wrong_task": Case(wrong_task_messages, BOTH),
    "submit_broker_down": Case(submit_broker_down, BOTH),
}

#: Outcomes (by case title) that show a bug not fixed yet: the tests mark them xfail(strict=True) with this reason.
KNOWN_BUGS: dict[str, str] = {}
