"""The lease as a fencing token: rank 0's LeaseFence, the harness's fenced stop, and lease-checked checkpoint rows
(both backends)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
from sqlalchemy import func, select, update
from torch import nn

from orchestrator import jobs
from shared.db import session_scope
from shared.models import Checkpoint, Shard
from shared.storage import Storage
from workers import bookkeeping as bk
from workers.tasks.train import record_checkpoint, resume_checkpoint
from workers.train import common
from workers.train.common import LeaseFence, StopFlag, Trainer, save_checkpoint, setup_distributed


def claimed(settings, owner: str = "host:1:a") -> tuple[str, bk.Claim]:
    job_id = jobs.create_job(settings, "train-translator", {"epochs": 1}, 1)
    claim = bk.claim_shard(settings, job_id, 0, owner)
    assert claim.ok, claim.reason
    return job_id, claim


def take_over(settings, job_id: str, owner: str = "host:2:b") -> bk.Claim:
    """Let the lease expire and claim the shard as a newer attempt."""
    with session_scope(settings) as s:
        s.execute(update(Shard).where(Shard.job_id == job_id).values(lease_expires_at=bk.utcnow() - timedelta(1)))
    claim = bk.claim_shard(settings, job_id, 0, owner)
    assert claim.ok, claim.reason
    return claim


def test_fence_holds_then_trips_on_a_newer_attempt(backend) -> None:
    job_id, claim = claimed(backend)
    fence = LeaseFence(backend.database_url, claim.shard_id, "host:1:a", claim.attempt, 4.0, start=False)
    fence.poll()
    assert fence.tripped() is None and fence.last_error is None
    assert fence.valid_until > time.time() + 4.0  # the lease's expiry plus one lease of grace
    take_over(backend, job_id)
    fence.poll()
    assert "no longer holds the lease" in fence.tripped() and "attempt 2" in fence.tripped()


def test_fence_trips_a_lease_past_an_expiry_nobody_renewed(backend) -> None:
    job_id, claim = claimed(backend)
    with session_scope(backend) as s:  # the supervisor froze: the lease is ours still, but stale
        s.execute(update(Shard).where(Shard.job_id == job_id)
                  .values(lease_expires_at=bk.utcnow() - timedelta(seconds=5)))
    fence = LeaseFence(backend.database_url, claim.shard_id, "host:1:a", claim.attempt, 4.0, start=False)
    fence.poll()
    assert "not renewed" in fence.tripped()


def test_fence_trips_when_the_database_stays_out_of_reach(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/no/such/folder/orch.db"
    fence = LeaseFence(url, 1, "host:1:a", 1, 0.3, start=False)
    fence.poll()
    assert fence.last_error and fence.tripped() is None  # within the first lease: not yet
    time.sleep(0.4)
    assert "not renewed" in fence.tripped() and "last error" in fence.tripped()


def test_fenced_run_stops_every_rank_without_a_checkpoint(tmp_path, embedded, monkeypatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    job_id, claim = claimed(embedded)
    cfg = {**common.DEFAULT_CONFIG, "run_dir": str(tmp_path / "run"), "events": str(tmp_path / "ev.jsonl"),
           "epochs": 4, "batch_size": 4, "log_every": 1, "checkpoint_every": 2}
    model = nn.Linear(2, 1)
    stop = StopFlag()
    stop.fence = LeaseFence(embedded.database_url, claim.shard_id, "host:1:a", claim.attempt, 60.0, start=False)
    trainer = Trainer(cfg, setup_distributed("cpu"), model, torch.optim.SGD(model.parameters(), lr=0.1), stop=stop)
    x = torch.randn(16, 2)

    def step_fn(m, idx):
        if trainer.step == 5:  # a newer attempt takes the run over; rank 0's fence reads the row
            take_over(embedded, job_id)
            stop.fence.poll()
        return nn.functional.mse_loss(m(x[idx]), x[idx, :1]), {}

    out = trainer.fit(16, step_fn)
    events = common_events(cfg["events"])
    assert out["stopped"] and out["step"] == 6
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4]  # none after the takeover
    assert events[-1]["event"] == "stopped" and events[-1]["reason"] == "fenced"
    assert events[-1]["checkpoint"] is None and "attempt 2" in events[-1]["message"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-00000002.pt", "step-00000004.pt"]


def common_events(path) -> list[dict]:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f]


def checkpoint_event(storage: Storage, job_id: str, attempt: int, step: int) -> dict:
    run = storage.path(f"jobs/{job_id}/run/attempt-{attempt:03d}")
    ck = save_checkpoint({"format": 1, "step": step}, str(run), step)
    return {"path": ck.path, "sha256": ck.sha256, "step": step, "epoch": 0, "reason": "interval"}


def test_only_the_lease_holder_records_checkpoints_and_resume_reads_them(backend) -> None:
    storage = Storage(backend.storage)
    job_id, first = claimed(backend)
    record_checkpoint(backend, storage, job_id, "host:1:a", checkpoint_event(storage, job_id, 1, 4), first.shard_id)
    take_over(backend, job_id)
    stale = checkpoint_event(storage, job_id, 1, 8)  # the frozen attempt wakes and reports a newer checkpoint
    with pytest.raises(bk.LeaseLost):
        record_checkpoint(backend, storage, job_id, "host:1:a", stale, first.shard_id)
    with session_scope(backend) as s:
        assert s.execute(select(func.count()).select_from(Checkpoint)).scalar_one() == 1
    assert resume_checkpoint(backend, storage, job_id).endswith("attempt-001/checkpoints/step-00000004.pt")
    newer = checkpoint_event(storage, job_id, 2, 6)
    record_checkpoint(backend, storage, job_id, "host:2:b", newer, first.shard_id)
    assert resume_checkpoint(backend, storage, job_id) == newer["path"]
    with open(newer["path"], "ab") as f:  # damaged after it was recorded: resume falls back to the older one
        f.write(b"x")
    assert resume_checkpoint(backend, storage, job_id).endswith("attempt-001/checkpoints/step-00000004.pt")
