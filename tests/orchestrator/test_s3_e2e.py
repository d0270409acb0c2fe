"""The invert job end to end on Redis + PostgreSQL with ORCH_STORAGE=s3://... and --data s3://... (SeaweedFS).

Real worker processes read the M3FD pairs from the bucket and write their latents there; Flower watches. Checks:
one content-addressed object per shard whose bytes hash to the recorded sha256, the same latents as a run on a local
path, nothing lost or doubled when a shard is re-run late, and the S3 secret in no DB row, Redis key, worker log,
CLI output or Flower answer.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select, text, update

from orchestrator import jobs
from orchestrator.demo import local_workers
from orchestrator.submit import submitter
from shared import constants as C
from shared.db import get_engine, session_scope
from shared.models import Artifact, Item, Job, Shard
from shared.status import ShardState
from shared.storage import Storage
from tests.orchestrator.test_flower import PASSWORD, USER, _free_port, _wait_for, api
from workers import bookkeeping as bk

submit_invert = submitter("invert")

pytestmark = [pytest.mark.slow, pytest.mark.server]

TABLES = ("jobs", "shards", "artifacts", "items", "metrics", "checkpoints", "lineage", "rejections")


def invert_args(data: str, model, shards: int) -> argparse.Namespace:
    return argparse.Namespace(data=data, model=str(model), shards=shards, t=None, steps=None, size=64, batch_size=4,
                              preset="readme", split_seed=42, test_fraction=0.2, precision="auto", seed=0)


def _db_text(settings) -> str:
    with get_engine(settings.database_url).connect() as c:
        return "\n".join(str(tuple(r)) for t in TABLES for r in c.execute(text(f"SELECT * FROM {t}")))


def _redis_text(settings) -> str:
    import redis

    r = redis.Redis.from_url(settings.broker_url)
    out = []
    for k in r.scan_iter():
        kind = r.type(k)
        if kind == b"string":
            out.append(repr(r.get(k)))
        elif kind == b"list":
            out.extend(repr(v) for v in r.lrange(k, 0, -1))
        elif kind == b"hash":
            out.extend(repr(v) for v in r.hgetall(k).items())
        elif kind == b"set":
            out.extend(repr(v) for v in r.smembers(k))
        elif kind == b"zset":
            out.extend(repr(v) for v in r.zrange(k, 0, -1))
    return "\n".join(out)


def _latents(settings, job_id) -> dict[int, tuple[str, str, int]]:
    with session_scope(settings) as s:
        rows = s.execute(select(Artifact.shard_index, Artifact.uri, Artifact.sha256, Artifact.bytes)
                         .where(Artifact.job_id == job_id, Artifact.kind == C.ARTIFACT_LATENTS)).all()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_invert_on_object_storage_with_workers_flower_and_no_secret_anywhere(
        servers, s3_server, s3_root, tiny_sd, m3fd_small, tmp_path, capsys, monkeypatch):
    settings = replace(servers, storage=s3_root)
    data = f"{s3_root}/inputs/m3fd"
    s3_server.client().put(str(m3fd_small) + "/", data.split("://", 1)[1], recursive=True)
    secret = s3_server.secret_key

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ORCH_HOME": str(settings.home), "ORCH_BROKER_URL": settings.broker_url,
           "ORCH_DATABASE_URL": settings.database_url, "ORCH_STORAGE": settings.storage, "OMP_NUM_THREADS": "1"}
    flower_log = tmp_path / "flower.log"
    flower = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "flower", "--port", str(port), "--address", "127.0.0.1",
         "--basic-auth", f"{USER}:{PASSWORD}"],
        env={k: v for k, v in env.items() if not k.startswith("FLOWER_")}, stdout=open(flower_log, "wb"),
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: api(base, "/healthcheck", auth=None) == "OK", 90, "Flower to answer")
        with local_workers(settings, 2, "gpu,cpu", tmp_path / "logs"):
            job_id = submit_invert(settings, invert_args(data, tiny_sd, shards=4))
            job = jobs.wait(settings, job_id, timeout=300)
            assert job.state == "succeeded", job.error

            def all_succeeded():
                tasks = api(base, "/api/tasks?taskname=invert.shard")
                return len(tasks) == 4 and all(t["state"] == "SUCCESS" for t in tasks.values()) and tasks

            flower_tasks = _wait_for(all_succeeded, 60, "Flower to see 4 succeeded shard tasks")
            flower_text = str(flower_tasks) + str(api(base, "/api/workers")) + str(api(base, "/metrics"))
    finally:
        if flower.poll() is None:
            flower.send_signal(signal.SIGTERM)
            try:
                flower.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(flower.pid, signal.SIGKILL)
                flower.wait()

    # one object per shard under the root, its bytes hashing to the recorded sha256; inputs read from the bucket
    arts = _latents(settings, job_id)
    assert sorted(arts) == [0, 1, 2, 3]
    fs = s3_server.client()
    for uri, sha, size in arts.values():
        assert uri.startswith(s3_root + f"/jobs/{job_id}/latents/") and sha[:16] in uri
        body = fs.cat_file(uri)
        assert hashlib.sha256(body).hexdigest() == sha and len(body) == size
    assert len(fs.find(f"{s3_root}/jobs/{job_id}/latents")) == 4
    with session_scope(settings) as s:
        paths = s.execute(select(Item.rgb_path, Item.ir_path).where(Item.job_id == job_id)).all()
    assert paths and all(a.startswith(data + "/Vis/") and b.startswith(data + "/Ir/") for a, b in paths)

    # the same latents as the embedded default computes from the local copy of the data
    from tests.orchestrator.conftest import run_invert_inline

    local = replace(settings, storage=str(tmp_path / "artifacts"))
    local_job = run_invert_inline(local, m3fd_small, tiny_sd, shards=4, batch_size=4)
    from safetensors.torch import load

    local_arts = _latents(local, local_job)
    for i, (uri, _, _) in arts.items():  # the file's metadata names its job, so the tensors are compared
        ours, theirs = load(fs.cat_file(uri)), load(Storage(local.storage).resolve(local_arts[i][0]).read_bytes())
        assert sorted(ours) == sorted(theirs) and all(bool((ours[k] == theirs[k]).all()) for k in ours)

    # a late duplicate: shard 2 re-runs after its "lost" lease; same object, same rows, nothing added
    from workers.runner import run_shard
    from workers.tasks.invert import invert_work

    with session_scope(settings) as s:
        s.execute(update(Shard).where(Shard.job_id == job_id, Shard.index == 2).values(
            state=ShardState.RUNNING.value, lease_owner="dead:1:x",
            lease_expires_at=bk.utcnow() - timedelta(seconds=5)))
        s.execute(update(Job).where(Job.id == job_id).values(state="running", shards_done=Job.shards_done - 1))
    assert run_shard(settings, job_id, 2, invert_work)["sha256"] == arts[2][1]
    assert _latents(settings, job_id) == arts and len(fs.find(f"{s3_root}/jobs/{job_id}/latents")) == 4
    assert Storage(settings.storage, tmp_path / "c2").resolve(arts[2][0]).read_bytes() == fs.cat_file(arts[2][0])

    # the secret is nowhere a person or another service can read it
    from orchestrator.cli import main

    for k, v in {"ORCH_HOME": str(settings.home), "ORCH_BROKER_URL": settings.broker_url,
                 "ORCH_DATABASE_URL": settings.database_url, "ORCH_STORAGE": settings.storage}.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    for argv in (["status", job_id], ["results", job_id], ["jobs"], ["metrics", job_id]):
        assert main(argv) == 0, argv
    cli_text = capsys.readouterr()
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
    logs += flower_log.read_text(errors="replace")
    for where, blob in [("DB rows", _db_text(settings)), ("Redis", _redis_text(settings)),
                        ("CLI output", cli_text.out + cli_text.err), ("logs", logs), ("Flower", flower_text)]:
        assert secret not in blob, f"the S3 secret appears in the {where}"
    assert s3_root in cli_text.out or job_id in cli_text.out
