"""kill -9 of a pool child (20 times in one job on Redis + PostgreSQL), of a whole node mid-shard, and of a whole
node mid-training (Redis + PostgreSQL; tests/orchestrator/test_train_e2e.py kills one on the embedded default)."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator import jobs
from shared.db import session_scope
from shared.models import Shard
from shared.settings import Settings
from shared.status import JobState, ShardState
from tests.faults import cluster as cl
from tests.faults.bench import (
    JOB_TIMEOUT,
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
from tests.faults.state import MANY, SMALL
from tests.faults.training import events, fingerprint_training, train_translator_args

pytestmark = [pytest.mark.slow, pytest.mark.faults]


# 20 kills in one job on the deployed stack; the embedded default runs the same recovery path, fewer times
@fault_case("kill_children", servers={"kills": 20}, embedded={"kills": 4})
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


def test_kill9_pool_children_mid_shard(bench):
    (out,) = run_case(kill_pool_children, bench)
    assert_kept(out)


@fault_case("kill_node")
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


def test_kill9_whole_node_mid_shard(bench):
    (out,) = run_case(kill_node_mid_shard, bench)
    assert_kept(out)


@fault_case("kill_training", backends=("servers",))
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
        job_id = submit_train_translator(s, train_translator_args(inv, epochs, every))

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
    ev = events(run_dir)
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


def test_kill9_whole_node_mid_training(servers_bench):
    (out,) = run_case(kill_node_mid_training, servers_bench)
    assert_kept(out)
