"""Long-running DDP training as a task: real workers, torchrun with 2 gloo processes, kill -9, cancel, duplicates."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from dataclasses import replace

import pytest
from sqlalchemy import select

from orchestrator import jobs, queries
from orchestrator.demo import local_workers
from orchestrator.submit import submitter
from shared.db import session_scope
from shared.models import Artifact, Checkpoint, Shard
from shared.storage import Storage
from tests.orchestrator.conftest import run_invert_inline
from workers.dispatch import get_app

submit_train_translator = submitter("train-translator")

pytestmark = pytest.mark.slow


def train_args(latents: str, **kw) -> argparse.Namespace:
    base = dict(latents=latents, preset="readme", epochs=30, lr=1e-3, weight_decay=None, batch_size=2, gpus=2,
                base_channels=8, depth=2, amp=False, checkpoint_every=8, max_steps=None, log_every=2, seed=0)
    base.update(kw)
    return argparse.Namespace(**base)


def wait_for(pred, timeout=180.0, poll=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError("timed out waiting")


def checkpoints(settings, job_id):
    with session_scope(settings) as s:
        return s.execute(select(Checkpoint.step, Checkpoint.reason).where(Checkpoint.job_id == job_id)
                         .order_by(Checkpoint.step)).all()


def events(settings, job_id, caches=()):
    """Event files of every attempt: in the run folder of a local root, else in each node's scratch (`caches`)."""
    key = f"jobs/{job_id}/run"
    runs = [c / "scratch" / key for c in caches] if caches else [Storage(settings.storage).path(key)]
    out = {}
    for f in sorted((f for run in runs for f in run.glob("events-attempt*.jsonl")), key=lambda f: f.name):
        out[f.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_kill9_worker_node_resumes_from_last_checkpoint(fast_lease, tiny_sd, m3fd_small, tmp_path, storage,
                                                        request):
    """With s3:// storage the two workers are two "nodes": each its own cache and scratch (ORCH_CACHE), so the
    second one can only resume from the checkpoint the first one uploaded."""
    s = fast_lease
    nodes: list = []
    if storage == "s3":
        s = replace(s, storage=request.getfixturevalue("s3_root"))
        nodes = [tmp_path / "node1", tmp_path / "node2"]
    inv = run_invert_inline(s, m3fd_small, tiny_sd)
    job_id = submit_train_translator(s, train_args(inv))
    env1 = {"ORCH_CACHE": str(nodes[0])} if nodes else None
    with local_workers(s, 1, "train,cpu", tmp_path / "logs1", env=env1) as procs:
        wait_for(lambda: any(step >= 16 for step, _ in checkpoints(s, job_id)))
        os.killpg(procs[0].pid, signal.SIGKILL)  # the whole node: celery main, pool child, torchrun, ranks
        procs[0].wait()
    before = max(step for step, _ in checkpoints(s, job_id))
    env2 = {"ORCH_CACHE": str(nodes[1])} if nodes else None
    with local_workers(s, 1, "train,cpu", tmp_path / "logs2", env=env2):
        job = jobs.wait(s, job_id, timeout=300)
    assert job.state == "succeeded", job.error
    ev = events(s, job_id, nodes)
    assert len(ev) == 2, list(ev)  # two attempts, never concurrent
    first, second = ev.values()
    start2 = next(e for e in second if e["event"] == "start")
    assert start2["resumed_from"] and start2["step"] >= before  # resumed from a recorded checkpoint, not step 0
    total = next(e for e in first if e["event"] == "start")["total_steps"]
    done = next(e for e in second if e["event"] == "done")
    assert done["step"] == total  # no step trained twice beyond the checkpoint: same end as an uninterrupted run
    steps2 = [e["step"] for e in second if e["event"] == "progress"]
    assert steps2 == sorted(set(steps2)) and min(steps2) > start2["step"]
    m = queries.summary_metrics(s, job_id)
    assert m["steps"] == total and m["world_size"] == 2
    rows = queries.results(s, job_id)
    assert rows and all(r["sha256"] for r in rows)
    if nodes:  # every checkpoint row names an object whose bytes hash to the recorded sha256
        assert start2["resumed_from"].startswith(str(nodes[1]))
        import hashlib

        fs = request.getfixturevalue("s3_server").client()
        with session_scope(s) as ss:
            arts = ss.execute(select(Artifact.uri, Artifact.sha256).join(Checkpoint, Checkpoint.artifact_id
                                                                         == Artifact.id)
                              .where(Checkpoint.job_id == job_id)).all()
        assert arts and all(u.startswith(s.storage) and hashlib.sha256(fs.cat_file(u)).hexdigest() == h
                            for u, h in arts)


def test_cancel_then_resume_and_duplicate_delivery(fast_lease, tiny_sd, m3fd_small, tmp_path):
    s = fast_lease
    inv = run_invert_inline(s, m3fd_small, tiny_sd)
    job_id = submit_train_translator(s, train_args(inv, epochs=80))  # long enough to be cancelled mid-run
    with local_workers(s, 2, "train,cpu", tmp_path / "logs"):
        wait_for(lambda: checkpoints(s, job_id))
        # a duplicate of the running task's message reaches the other worker: it must not start a second run
        get_app(s).send_task("train.run", kwargs={"job_id": job_id, "shard_index": 0})
        time.sleep(3)
        assert len(events(s, job_id)) == 1
        jobs.cancel(s, job_id)
        wait_for(lambda: queries.job_status(s, job_id)["shards_by_state"].get("cancelled") == 1, timeout=120)
        stopped = [e for e in events(s, job_id)["events-attempt001.jsonl"] if e["event"] == "stopped"]
        assert len(stopped) == 1  # the ranks agreed on a step, saved (or reused that step's checkpoint) and left
        stopped_at = max(step for step, _ in checkpoints(s, job_id))
        assert stopped_at == stopped[0]["step"]  # that checkpoint is recorded: a resume continues from it
        assert jobs.resume(s, job_id) == 1
        job = jobs.wait(s, job_id, timeout=300)
    assert job.state == "succeeded", job.error
    ev = events(s, job_id)
    assert len(ev) == 2
    start2 = next(e for e in list(ev.values())[1] if e["event"] == "start")
    assert start2["step"] == stopped_at and start2["resumed_from"]
    with session_scope(s) as ss:
        attempts = ss.execute(select(Shard.attempts).where(Shard.job_id == job_id)).scalar_one()
    assert attempts == 2


def test_crash_in_a_rank_fails_the_run_with_its_error(fast_lease, tiny_sd, m3fd_small, tmp_path):
    s = fast_lease
    inv = run_invert_inline(s, m3fd_small, tiny_sd)
    args = train_args(inv, epochs=2)
    job_id = submit_train_translator(s, args)
    with session_scope(s) as ss:  # inject a fault through the spec (the harness's testing hook)
        from shared.models import Job

        job = ss.get(Job, job_id)
        job.spec = {**job.spec, "fault": {"rank": 1, "step": 2}}
    with local_workers(s, 1, "train,cpu", tmp_path / "logs"):
        job = jobs.wait(s, job_id, timeout=300)
    assert job.state == "failed"
    assert "torchrun exited" in job.error
