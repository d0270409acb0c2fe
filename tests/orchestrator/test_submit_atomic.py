"""Submission is all or nothing: a broker that cannot take the shards is one line and exit 2 before any row exists,
and a job whose publishing failed after its rows exist is cancelled, so no reaper ever runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from orchestrator import jobs
from shared import constants as C
from shared.db import ensure_schema, session_scope
from shared.errors import UserError
from shared.models import Job, Shard
from tests.faults.infra import PrivateRedis
from workers.reaper import reap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _submit_cli(settings, broker_url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ORCH_HOME": str(settings.home), "ORCH_DATABASE_URL": settings.database_url,
           "ORCH_BROKER_URL": broker_url, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "orchestrator", "submit", "train-classifier", "--data",
                           "mnist:embedded"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def _count(settings, table) -> int:
    with session_scope(settings) as s:
        return s.execute(select(func.count()).select_from(table)).scalar_one()


def _messages(settings) -> int:
    return len(list((settings.broker_folder / "in").glob("*.msg")))


@pytest.mark.slow
def test_unusable_broker_is_one_line_and_no_row(embedded, tmp_path):
    ensure_schema(embedded)
    cases = {"broker down": "redis://127.0.0.1:1/0", "unknown scheme": "nosuch://127.0.0.1:1/0"}
    redis_server = None
    if PrivateRedis.available():
        redis_server = PrivateRedis(tmp_path / "redis", appendonly=False, password="sesame")
        redis_server.start()
        cases["password refused"] = f"redis://:wrong@127.0.0.1:{redis_server.port}/0"
    try:
        runs = {name: _submit_cli(embedded, url) for name, url in cases.items()}
    finally:
        if redis_server is not None:
            redis_server.stop()
    for name, run in runs.items():
        lines = run.stderr.strip().splitlines()
        assert run.returncode == C.EXIT_USAGE, (name, run.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, lines)
        assert "nothing was submitted" in lines[0]
        assert "Traceback" not in run.stderr and run.stdout == "", (name, run.stdout)
    assert "No such transport: nosuch" in runs["unknown scheme"].stderr
    if "password refused" in runs:
        assert "wrong" not in runs["password refused"].stderr  # the password is masked
    assert _count(embedded, Job) == 0 and _count(embedded, Shard) == 0  # checked before any row
    assert reap(embedded, stale_queued_seconds=0) == [] and _messages(embedded) == 0


def test_publish_failure_after_rows_cancels_the_job(embedded, monkeypatch):
    """The broker answers the check but publishing fails: the job exists, is cancelled, is named with the
    `resume` command, and a reaper pass publishes nothing; `resume` then runs it as usual."""

    def broken(*_a, **_kw):
        raise ConnectionError("Connection reset by peer")

    monkeypatch.setattr(jobs, "enqueue_shards", broken)
    with pytest.raises(UserError) as err:
        jobs.submit(embedded, "bench", {}, 3)
    message = str(err.value)
    (job_id,) = [w for w in message.split() if w.startswith("bench-")][:1]
    assert "\n" not in message and f"`orchestrator resume {job_id}`" in message and "will not run" in message
    job = jobs.get_job(embedded, job_id)
    assert job.state == "cancelled" and "publishing" in job.error
    assert reap(embedded, stale_queued_seconds=0, requeue_after=0) == []
    assert _messages(embedded) == 0  # nothing will run it
    monkeypatch.undo()
    assert jobs.resume(embedded, job_id) == 3 and _messages(embedded) == 3
    # resumed, it waits as `queued` (none of its shards ever started): a shard's claim makes it `running`
    assert jobs.get_job(embedded, job_id).state == "queued"


def test_resume_is_checked_first_and_a_failed_publish_leaves_the_job_cancelled(embedded, monkeypatch):
    """`resume` behaves like `submit`: a broker that is down is one line before anything changes, and a publish
    that fails midway cancels the job again (with the command to rerun) instead of leaving it for the reaper."""
    from dataclasses import replace

    job_id = jobs.create_job(embedded, "bench", {}, 2)
    jobs.cancel(embedded, job_id)
    with pytest.raises(UserError) as err:
        jobs.resume(replace(embedded, broker_url="redis://127.0.0.1:1/0"), job_id)
    assert "was not resumed" in str(err.value) and "\n" not in str(err.value)
    assert jobs.get_job(embedded, job_id).state == "cancelled"

    def broken(*_a, **_kw):
        raise ConnectionError("Connection reset by peer")

    monkeypatch.setattr(jobs, "enqueue_shards", broken)
    with pytest.raises(UserError) as err:
        jobs.resume(embedded, job_id)
    assert f"`orchestrator resume {job_id}`" in str(err.value)
    assert jobs.get_job(embedded, job_id).state == "cancelled"
    assert reap(embedded, stale_queued_seconds=0, requeue_after=0) == [] and _messages(embedded) == 0
