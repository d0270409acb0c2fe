"""The exactly-once protocol on its own: claims, leases, idempotent completion, job completion by the last shard."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, update

from orchestrator.jobs import cancel, create_job
from shared.db import ensure_schema, session_scope
from shared.models import Artifact, Job, Metric, Shard
from shared.status import JobState, ShardState
from workers import bookkeeping as bk
from workers.recording import record_artifact, record_metrics
from workers.runner import ShardOutput, run_shard


def _job(settings, n=3):
    ensure_schema(settings)
    # a kind with no finaliser: the counts below are the shards' own rows, whatever task modules are imported
    return create_job(settings, "protocol-test", {"test": True}, n)


def _work(tag: str):
    """A real (tiny) shard: writes an artifact whose bytes depend only on the shard, and one metric."""

    def work(ctx):
        stored = ctx.storage.write_bytes(f"jobs/{ctx.job_id}/s{ctx.index}.bin", f"{ctx.job_id}/{ctx.index}".encode())

        def record(s):
            record_artifact(s, ctx.job_id, ctx.index, "latents", stored)
            record_metrics(s, ctx.job_id, [("value", ctx.index, 0, f"item{ctx.index}")], ctx.index)

        return ShardOutput(record, {"tag": tag})

    return work


def test_claim_respects_live_lease_and_takes_over_expired(backend):
    job = _job(backend)
    a = bk.claim_shard(backend, job, 0, "host:1:a")
    assert a.ok and a.attempt == 1
    b = bk.claim_shard(backend, job, 0, "host:2:b")
    assert not b.ok and "leased by host:1:a" in b.reason
    with session_scope(backend) as s:
        s.execute(update(Shard).where(Shard.job_id == job, Shard.index == 0)
                  .values(lease_expires_at=bk.utcnow() - timedelta(seconds=1)))
    c = bk.claim_shard(backend, job, 0, "host:2:b")
    assert c.ok and c.attempt == 2
    # the first owner lost its lease: its completion must not be recorded
    assert bk.complete_shard(backend, job, 0, "host:1:a", lambda s: None) is False
    assert bk.complete_shard(backend, job, 0, "host:2:b", lambda s: None) is True


def test_duplicate_delivery_and_rerun_record_once(backend):
    job = _job(backend, n=2)
    r1 = run_shard(backend, job, 0, _work("first"))
    r2 = run_shard(backend, job, 0, _work("dup"))  # same message delivered again
    assert r1["tag"] == "first" and r2["skipped"] == "already done"
    # shard 1: a worker crashed mid-shard (claimed, never completed); its lease expires; a re-run takes over
    assert bk.claim_shard(backend, job, 1, "dead:9:x").ok
    with session_scope(backend) as s:
        s.execute(update(Shard).where(Shard.job_id == job, Shard.index == 1)
                  .values(lease_expires_at=bk.utcnow() - timedelta(seconds=1)))
    assert run_shard(backend, job, 1, _work("rerun"))["tag"] == "rerun"
    assert run_shard(backend, job, 1, _work("again"))["skipped"] == "already done"
    with session_scope(backend) as s:
        j = s.get(Job, job)
        assert (j.state, j.shards_done, j.shards_failed) == (JobState.SUCCEEDED, 2, 0)
        assert s.execute(select(func.count()).select_from(Artifact).where(Artifact.job_id == job)).scalar_one() == 2
        assert s.execute(select(func.count()).select_from(Metric).where(Metric.job_id == job)).scalar_one() == 2
        attempts = dict(s.execute(select(Shard.index, Shard.attempts).where(Shard.job_id == job)).all())
    assert attempts == {0: 1, 1: 2}


def test_last_shard_runs_finalizer_once(backend, monkeypatch):
    """The kind's finaliser runs in the last completing transaction, once, not again on a repeated delivery."""
    from tests.workers import finalizer_kind

    monkeypatch.setenv("ORCH_EXTRA_KINDS", "tests.workers.finalizer_kind")
    finalizer_kind.CALLS.clear()
    ensure_schema(backend)
    job = create_job(backend, "test-finalizer", {}, 3)
    for i in range(3):
        run_shard(backend, job, i, _work("x"))
    run_shard(backend, job, 2, _work("x"))
    assert finalizer_kind.CALLS == [job]


def test_cancelled_job_is_not_claimed_and_failure_fails_job(backend):
    job = _job(backend, n=2)
    assert cancel(backend, job) == "cancelled"
    assert run_shard(backend, job, 0, _work("x"))["skipped"] == "cancelled"

    job2 = _job(backend, n=2)

    def boom(ctx):
        raise ValueError("bad pixels in 00001.png")

    try:
        run_shard(backend, job2, 1, boom)
    except ValueError:
        pass
    with session_scope(backend) as s:
        j = s.get(Job, job2)
        assert j.state == JobState.FAILED and "bad pixels" in j.error and j.shards_failed == 1
        sh = s.execute(select(Shard).where(Shard.job_id == job2, Shard.index == 1)).scalar_one()
        assert sh.state == ShardState.FAILED
