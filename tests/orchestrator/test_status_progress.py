"""`status` says what a running shard is doing: progress inside a batch with rate and ETA as `watch` computes them,
or that it has not reported any yet -- never a bare `shard 1 on host:pid:`."""

from __future__ import annotations

import os

from sqlalchemy import update

from orchestrator import cli, jobs
from shared.db import session_scope
from shared.models import Shard
from shared.settings import Settings
from workers import bookkeeping as bk


def test_status_describes_running_shards(home, capsys):
    s = Settings.from_env()
    job_id = jobs.create_job(s, "invert", {}, 2)
    assert bk.claim_shard(s, job_id, 0, bk.make_owner("t0")).ok
    assert bk.claim_shard(s, job_id, 1, bk.make_owner("t1", "gpu0@node7")).ok  # as a Celery task claims it
    with session_scope(s) as ss:
        ss.execute(update(Shard).where(Shard.job_id == job_id, Shard.index == 1)
                   .values(progress={"done": 30, "total": 40, "unit": "unet_calls", "pairs_done": 0, "pairs": 4}))
    assert cli.main(["status", job_id]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  shard")]
    assert len(lines) == 2 and not any(ln.rstrip().endswith(":") for ln in lines), lines
    assert "no progress reported yet" in lines[0]
    assert "30/40 unet calls (75%)" in lines[1] and "ETA" in lines[1], lines[1]
    # the worker is named as Flower names it (Celery's name@host), then the process id
    assert lines[1].startswith(f"  shard    1 on gpu0@node7:{os.getpid()}:"), lines[1]
