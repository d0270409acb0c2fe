"""SIGSTOP past the lease of a training worker: its supervisor alone, and the whole worker with its torchrun group
(both backends). The node runs a DDP training run (2 gloo ranks under torchrun); the lease is the run's fencing token
(docs/training.md): the other node takes the run over, the stale attempt's torchrun stops on its own, and nothing it
does after losing the lease is recorded."""

from __future__ import annotations

import os
import signal
import time
from datetime import timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator import jobs
from shared.db import session_scope
from shared.models import Artifact, Checkpoint, Shard
from shared.status import JobState
from tests.faults import cluster as cl
from tests.faults.bench import LEASE_SECONDS, Bench, Outcome, fault_case, submit, wait_job
from tests.faults.conftest import assert_kept, run_case
from tests.faults.state import SMALL
from tests.faults.training import events, fingerprint_training, train_translator_args

pytestmark = [pytest.mark.slow, pytest.mark.faults]

#: Seconds the stale torchrun may take to stop once it can tell it lost the lease: the fence reads the lease every
#: lease / 4, trips one lease past an unrenewed expiry, and the ranks stop at the next step boundary; the rest is
#: slack for a loaded machine.
STOP_BOUND = 2 * LEASE_SECONDS + 30.0


@fault_case("freeze_training")
def frozen_training_worker(bench: Bench, epochs: int = 100, every: int = 20) -> list[Outcome]:
    """400 steps of a tiny model (4 a epoch): on a quiet 2-core machine about 30 s, so that the stale attempt is
    still training when its lease lapses (12 epochs took 4 s here: the run ended before the lease did, and nothing
    was left to fence)."""
    return [_frozen(bench, "supervisor", epochs, every), _frozen(bench, "node", epochs, every)]


def _gone(pids: list[int]) -> bool:
    return not any(cl.pid_alive(p) for p in pids)


def _signal(groups: list[int], pids: list[int], sig: int) -> None:
    for g in groups:
        try:
            os.killpg(g, sig)
        except ProcessLookupError:
            pass
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], timeout: float) -> bool:
    try:
        cl.wait_for(lambda: _gone(pids), timeout, 0.1, "the stale torchrun to stop")
        return True
    except TimeoutError:
        return False


def _frozen(bench: Bench, mode: str, epochs: int, every: int) -> Outcome:
    """`mode` "supervisor": SIGSTOP of the pool child alone; its torchrun group runs on and must stop itself.
    "node": SIGSTOP of every process of the node and of its torchrun group until the other node has finished the
    run; woken up, the stale group must stop by itself and its supervisor record nothing."""
    from orchestrator.submit import submitter
    submit_train_translator = submitter("train-translator")

    title = f"frozen training worker ({'supervisor' if mode == 'supervisor' else 'whole worker'} SIGSTOP)"
    s, t0 = bench.fresh(f"freeze-{mode}"), time.monotonic()
    notes: list[str] = []
    with bench.cluster(s, f"freeze-{mode}", queues="gpu,train,cpu") as cluster:
        a, b = cluster.start(2)
        inv = submit(s, bench, SMALL)
        inv_state = wait_job(s, inv).state
        job_id = submit_train_translator(s, train_translator_args(inv, epochs, every))
        run_dir = Path(s.storage) / "jobs" / job_id / "run"

        def recorded_on_a_node():
            with session_scope(s) as ss:
                n = ss.execute(select(Checkpoint.id).where(Checkpoint.job_id == job_id)).first()
            running = cl.running_shards(s, job_id)
            return n is not None and running and running[0].attempts == 1 and cluster.node_holding(running[0].pid)

        victim = cl.wait_for(recorded_on_a_node, 240, 0.1, "a recorded checkpoint")
        supervisor = cl.running_shards(s, job_id)[0].pid
        stale = cl.processes_mentioning(str(run_dir / "config-attempt001.json"))  # torchrun and its ranks
        # torchrun and each rank run in sessions of their own: a whole worker is the node's group and those
        groups, pids = ([], [supervisor]) if mode == "supervisor" else ([victim.pid], stale)
        _signal(groups, pids, signal.SIGSTOP)
        with session_scope(s) as ss:
            expires = ss.execute(select(Shard.lease_expires_at).where(Shard.job_id == job_id)).scalar_one()
        expires_at = expires.replace(tzinfo=timezone.utc).timestamp() if expires.tzinfo is None else \
            expires.timestamp()
        stopped_after: float | None = None
        if mode == "supervisor" and _wait_gone(stale, max(expires_at - time.time(), 0) + STOP_BOUND):
            stopped_after = time.time() - expires_at  # it ran on unwatched: it stopped by itself
        job = wait_job(s, job_id, 900)  # the resumed run retrains from its checkpoint: minutes under a full suite
        config2 = run_dir / "config-attempt002.json"
        takeover = config2.stat().st_mtime if config2.exists() else time.time()
        _signal(groups, pids, signal.SIGCONT)
        woke = time.time()
        if mode == "node" and _wait_gone(stale, STOP_BOUND):
            stopped_after = time.time() - woke

        def gave_up() -> bool:  # the woken supervisor gives the run up: LeaseLost, the task returns "skipped"
            return any(job_id in line and "skipped" in line for line in victim.text().splitlines())

        try:
            cl.wait_for(gave_up, 120, 0.5, "the stale supervisor to give up")
        except TimeoutError:
            pass
        time.sleep(2 * LEASE_SECONDS)  # anything the woken attempt would still record, it records by now
        alive = [n.alive() for n in (a, b)]
        if not JobState(job.state).finished:
            jobs.cancel(s, job_id)
        if not _gone(stale):
            _signal([], stale, signal.SIGKILL)
    ev = events(run_dir)
    first = ev.get("events-attempt001.jsonl", [])
    last1 = first[-1] if first else {}
    late_ckpt_events = [e["step"] for e in first if e["event"] == "checkpoint" and e["time"] > takeover]
    with session_scope(s) as ss:
        arts = ss.execute(select(Artifact.uri, Artifact.created_at).join(Checkpoint, Checkpoint.artifact_id ==
                                                                        Artifact.id)
                          .where(Checkpoint.job_id == job_id)).all()
    late_rows = [uri for uri, at in arts if "/attempt-001/" in uri
                 and at.replace(tzinfo=at.tzinfo or timezone.utc).timestamp() > takeover]
    steps1 = sorted(int(uri.rsplit("step-", 1)[1][:8]) for uri, _ in arts if "/attempt-001/" in uri)
    steps2 = sorted(int(uri.rsplit("step-", 1)[1][:8]) for uri, _ in arts if "/attempt-002/" in uri)
    fp = fingerprint_training(s, job_id)
    start1 = next((e for e in first if e["event"] == "start"), {})
    checks = {
        "the invert job it trains on succeeded": inv_state == JobState.SUCCEEDED,
        "the job succeeded once, in two attempts": job.state == JobState.SUCCEEDED and fp["attempts"] == 2,
        "it ended at the last step": fp["steps"] == int(start1.get("total_steps", -2)),
        f"the stale torchrun (torchrun and ranks) stopped by itself within {STOP_BOUND:.0f} s":
            len(stale) >= 3 and stopped_after is not None,
        "the stale ranks stopped as fenced, without a checkpoint": last1.get("event") == "stopped"
            and last1.get("reason") == "fenced" and last1.get("checkpoint") is None,
        "no checkpoint row of the stale attempt after the takeover": not late_rows,
        "checkpoint hashes match the bytes": not fp["integrity"],
        "nothing recorded twice": fp["duplicated"] == 0,
        "the woken supervisor gave the run up": gave_up(),
        "both nodes still up (worker count unchanged)": all(alive),
    }
    notes.append(f"froze {victim.name} ({mode}); stale torchrun gone {stopped_after and round(stopped_after, 1)} s "
                 f"after {'the lease expired' if mode == 'supervisor' else 'it was woken'}; checkpoints of attempt "
                 f"1 {steps1}, of attempt 2 {steps2}; stale checkpoint events after the takeover (own folder, "
                 f"never recorded): {late_ckpt_events}; stale stop: {last1.get('message')}")
    ok = all(checks.values())
    return Outcome(title, bench.backend, 1, 1, 0 if job.state == JobState.SUCCEEDED else 1, fp["duplicated"],
                   job.state, ok, round(time.monotonic() - t0, 1), checks, notes)


def test_frozen_training_worker(bench):
    outcomes = run_case(frozen_training_worker, bench)
    assert [o.case for o in outcomes] == ["frozen training worker (supervisor SIGSTOP)",
                                          "frozen training worker (whole worker SIGSTOP)"]
    for out in outcomes:
        assert_kept(out)
