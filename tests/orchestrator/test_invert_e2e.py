"""The invert job end to end through real worker processes, on both backends; plus cancel/resume and re-runs."""

from __future__ import annotations

import argparse
import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from orchestrator import jobs, queries
from orchestrator.demo import local_workers
from orchestrator.submit import submitter
from shared.db import session_scope
from shared.models import Artifact, Item, Job, Shard
from shared.status import JobState, ShardState
from shared.storage import Storage
from workers import bookkeeping as bk

submit_invert = submitter("invert")

pytestmark = pytest.mark.slow


def invert_args(data: Path, model: Path, shards: int = 16, **kw) -> argparse.Namespace:
    from tests.orchestrator.conftest import invert_args as base

    return base(data, model, shards, **{"batch_size": 4, **kw})


def _snapshot(settings, job_id):
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        arts = s.execute(select(Artifact.uri, Artifact.sha256, Artifact.bytes).where(Artifact.job_id == job_id)
                         .order_by(Artifact.uri)).all()
        items = s.execute(select(Item.pair_id, Item.artifact_id, Item.position).where(Item.job_id == job_id)
                          .order_by(Item.pair_id)).all()
        return (job.state, job.shards_done, job.shards_failed), [tuple(a) for a in arts], [tuple(i) for i in items]


def test_invert_16_shards_end_to_end(backend, tiny_sd, m3fd_small, tmp_path):
    with local_workers(backend, 2, "gpu,cpu", tmp_path / "logs"):
        job_id = submit_invert(backend, invert_args(m3fd_small, tiny_sd, shards=16))
        job = jobs.wait(backend, job_id, timeout=300)
    assert job.state == JobState.SUCCEEDED, job.error
    (state, done, failed), arts, items = _snapshot(backend, job_id)
    latents = [a for a in arts if a[0].endswith(".safetensors")]
    previews = [a for a in arts if "/previews/" in a[0]]
    # one latents file per shard, and the VAE decodes of the first 4 pairs (z_rgb_0, z_rgb_t, z_ir_0, z_ir_t)
    assert (done, failed) == (16, 0) and len(latents) == 16 and len(previews) == 16 and len(items) == 20
    assert all(a is not None and p is not None for _, a, p in items)
    storage = Storage(backend.storage)
    for uri, sha, size in arts:  # recorded hashes are the bytes on disk
        data = storage.resolve(uri).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha and len(data) == size
    rows = queries.results(backend, job_id)
    assert {r["split"] for r in rows} == {"train", "test"} and all(r["artifact"] for r in rows)
    m = queries.summary_metrics(backend, job_id)
    assert m["pairs"] == 20 and m["pairs_train"] == 16 and m["pairs_test"] == 4
    # models are loaded once per worker process: per pid, exactly one shard missed the cache
    with session_scope(backend) as s:
        results = [r for r in s.execute(select(Shard.result).where(Shard.job_id == job_id)).scalars()]
    by_pid: dict[int, list[bool]] = {}
    for r in results:
        by_pid.setdefault(r["pid"], []).append(r["model_cache_hit"])
    assert all(hits.count(False) == 1 for hits in by_pid.values()), by_pid
    assert sum(len(h) for h in by_pid.values()) == 16


def test_duplicate_and_rerun_shard_change_nothing(embedded, tiny_sd, m3fd_small):
    from tests.orchestrator.conftest import create_only
    from workers.runner import run_shard
    from workers.tasks.invert import invert_work

    job_id = create_only(submit_invert, embedded, invert_args(m3fd_small, tiny_sd, shards=4))
    for i in range(4):
        run_shard(embedded, job_id, i, invert_work)
    first = _snapshot(embedded, job_id)
    assert first[0] == ("succeeded", 4, 0)
    # the same message delivered again: skipped
    assert run_shard(embedded, job_id, 2, invert_work)["skipped"] == "already done"
    # a re-run after a crash: shard 1 is forced back to 'running' under a dead owner whose lease expired
    with session_scope(embedded) as s:
        s.execute(update(Shard).where(Shard.job_id == job_id, Shard.index == 1).values(
            state=ShardState.RUNNING.value, lease_owner="dead:1:x",
            lease_expires_at=bk.utcnow() - timedelta(seconds=5)))
        s.execute(update(Job).where(Job.id == job_id).values(state="running", shards_done=Job.shards_done - 1))
    out = run_shard(embedded, job_id, 1, invert_work)
    assert out["pairs"] == 5
    again = _snapshot(embedded, job_id)
    assert again[0] == first[0] and again[2] == first[2]
    for x, y in zip(again[1], first[1], strict=False):
        assert x == y, (x, y)  # same rows, same bytes (sha256), same counters


def test_cancel_then_resume_runs_only_unfinished(embedded, tiny_sd, m3fd_small, tmp_path):
    from workers.runner import run_shard
    from workers.tasks.invert import invert_work

    job_id = submit_invert(embedded, invert_args(m3fd_small, tiny_sd, shards=8))  # no workers yet
    for i in (0, 1):
        run_shard(embedded, job_id, i, invert_work)
    assert jobs.cancel(embedded, job_id) == "cancelled"
    st = queries.job_status(embedded, job_id)
    assert st["state"] == "cancelled" and st["shards_by_state"] == {"done": 2, "cancelled": 6}
    assert jobs.resume(embedded, job_id) == 6
    with local_workers(embedded, 1, "gpu,cpu", tmp_path / "logs"):
        job = jobs.wait(embedded, job_id, timeout=300)
    assert job.state == "succeeded" and job.shards_done == 8
    with session_scope(embedded) as s:
        attempts = dict(s.execute(select(Shard.index, Shard.attempts).where(Shard.job_id == job_id)).all())
        n_art = s.execute(select(func.count()).select_from(Artifact)
                          .where(Artifact.job_id == job_id, Artifact.kind == "latents")).scalar_one()
    assert attempts[0] == attempts[1] == 1 and n_art == 8
