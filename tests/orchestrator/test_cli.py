"""The CLI as a user types it: submit --wait --json, status, jobs, results, metrics, fixtures, retry --failed."""

from __future__ import annotations

import csv
import io
import json

import pytest

from orchestrator.cli import main
from orchestrator.demo import local_workers
from orchestrator.worker import plan_workers
from shared.errors import UserError
from tests.conftest import embedded_settings


def run(capsys, argv) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().out


@pytest.mark.slow
def test_cli_round_trip(home, capsys, tmp_path):
    rc, _ = run(capsys, ["fixtures", "m3fd", "--out", str(tmp_path / "m3fd"), "--pairs", "8"])
    assert rc == 0
    rc, _ = run(capsys, ["fixtures", "tiny-sd", "--out", str(tmp_path / "sd")])
    assert rc == 0
    settings = embedded_settings(home)
    with local_workers(settings, 1, "gpu,cpu", tmp_path / "logs"):
        rc, out = run(capsys, ["submit", "invert", "--data", str(tmp_path / "m3fd"), "--model", str(tmp_path / "sd"),
                               "--shards", "2", "--size", "64", "--wait", "--json"])
    final = json.loads(out)
    assert rc == 0 and final["state"] == "succeeded" and final["shards_done"] == 2
    job = final["job_id"]
    rc, out = run(capsys, ["status", job, "--json"])
    st = json.loads(out)
    assert {"job_id", "kind", "state", "shards_total", "shards_done"} <= set(st) and st["kind"] == "invert"
    rc, out = run(capsys, ["results", job, "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 8 and {"pair_id", "split", "artifact"} <= set(rows[0])
    rc, out = run(capsys, ["results", job, "--format", "json"])
    assert len(json.loads(out)) == 8
    rc, out = run(capsys, ["results", job])
    assert all(r["artifact"] in out for r in rows)  # URIs are printed whole, whatever the width
    rc, out = run(capsys, ["metrics", job, "--json"])
    assert json.loads(out)["pairs"] == 8
    rc, out = run(capsys, ["jobs", "--json"])
    assert [j["job_id"] for j in json.loads(out)] == [job]
    rc, out = run(capsys, ["jobs"])
    assert job in out and all(len(line) <= 80 for line in out.splitlines())


def test_retry_failed_reruns_only_failed_shards(home, capsys, tmp_path, tiny_sd):
    import shutil

    from sqlalchemy import select

    from orchestrator import jobs
    from orchestrator.submit import submitter
    submit_invert = submitter("invert")
    from shared.db import session_scope
    from shared.models import Shard
    from tests.orchestrator.conftest import create_only, invert_args
    from workers.fixtures.m3fd import write_synthetic
    from workers.runner import run_shard
    from workers.tasks.invert import invert_work

    data = tmp_path / "m3fd"
    write_synthetic(data, 8)
    s = embedded_settings(home)
    job = create_only(submit_invert, s, invert_args(data, tiny_sd, shards=2))
    good = data / "Ir" / "00006.png"
    shutil.copy(good, tmp_path / "keep.png")
    good.write_bytes(b"broken after submission")
    run_shard(s, job, 0, invert_work)
    with pytest.raises(UserError):
        run_shard(s, job, 1, invert_work)
    assert jobs.get_job(s, job).state == "failed"
    assert "00006.png" in jobs.get_job(s, job).error
    shutil.copy(tmp_path / "keep.png", good)  # the user fixes the file
    rc, out = run(capsys, ["retry", job, "--failed"])
    assert rc == 0 and "1 failed shard" in out
    run_shard(s, job, 1, invert_work)
    final = jobs.get_job(s, job)
    assert final.state == "succeeded" and final.shards_done == 2 and final.shards_failed == 0
    with session_scope(s) as ss:
        attempts = dict(ss.execute(select(Shard.index, Shard.attempts).where(Shard.job_id == job)).all())
    assert attempts == {0: 1, 1: 2}


def test_worker_plan_pins_one_process_per_gpu():
    plan = plan_workers("gpu,cpu", gpus="0,1", hostname="w@host")
    assert plan == [("w-gpu0@host", {"CUDA_VISIBLE_DEVICES": "0"}), ("w-gpu1@host", {"CUDA_VISIBLE_DEVICES": "1"})]
    train = plan_workers("train", gpus="0,1,2,3", hostname="t@host")
    assert train == [("t@host", {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "ORCH_TRAIN_GPUS": "4"})]
    assert len(plan_workers("gpu", processes=3, hostname="c@h")) == 3
    with pytest.raises(UserError, match="unknown queue"):
        plan_workers("gpu,nope")
    with pytest.raises(UserError, match="--gpus"):
        plan_workers("gpu", gpus="zero")


def test_gpus_all_respects_an_inherited_allocation(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [e["CUDA_VISIBLE_DEVICES"] for _, e in plan_workers("gpu", gpus="all", hostname="w@h")] == ["2", "3"]
