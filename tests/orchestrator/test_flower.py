"""Flower on loopback against Redis, with two real workers running a 4-shard invert job.

One module-scoped run serves every check: the REST API (/api/workers, /api/tasks, /api/task/info/<id>) lists each
shard task by its readable name with its job id, shard index, worker, runtime, result and last progress; the API is
closed without credentials; /metrics counts the custom `task-progress` events; headless Chromium loads the dashboard
(basic auth in the URL) and saves screenshots of the workers and tasks pages. Unit tests cover the PROGRESS state
machine and `ShardContext.progress` without servers.
"""

from __future__ import annotations

import argparse
import ast
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from orchestrator import flower as fl
from orchestrator import jobs
from orchestrator.demo import local_workers
from orchestrator.submit import submitter
from shared.db import session_scope
from shared.models import Shard
from shared.settings import Settings
from tests.conftest import REDIS_URL, require_servers
from tests.orchestrator.test_report import run_chromium, screenshot_is_not_blank

submit_invert = submitter("invert")

USER, PASSWORD = "ops", uuid.uuid4().hex[:16]


@dataclass
class FlowerRun:
    base: str
    job_id: str
    settings: Settings
    tmp: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, auth: tuple[str, str] | None = (USER, PASSWORD), timeout: float = 30.0):
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=timeout) as r:
        body = r.read().decode()
        return json.loads(body) if r.headers.get("Content-Type", "").startswith("application/json") else body


def _wait_for(pred, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last = e
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory, pg_database, tiny_sd, m3fd_small):
    require_servers()
    import redis
    from sqlalchemy import text

    from shared import db

    tmp = tmp_path_factory.mktemp("flower")
    index = 3 + uuid.uuid4().int % 12
    redis.Redis.from_url(f"{REDIS_URL}/{index}").flushdb()
    with db.get_engine(pg_database).begin() as c:
        c.execute(text("TRUNCATE jobs, shards, artifacts, items, metrics, checkpoints, lineage CASCADE"))
    env = {"ORCH_HOME": str(tmp / "orch"), "ORCH_BROKER_URL": f"{REDIS_URL}/{index}",
           "ORCH_DATABASE_URL": pg_database, "ORCH_STORAGE": str(tmp / "artifacts")}
    settings = Settings.from_env(env)
    settings.ensure_local_folders()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp / "flower.log"
    penv = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "flower", "--port", str(port), "--address", "127.0.0.1",
         "--basic-auth", f"{USER}:{PASSWORD}"],
        env={**penv, **env, "OMP_NUM_THREADS": "1"}, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        _wait_for(lambda: api(base, "/healthcheck", auth=None) == "OK", 90, "Flower to answer")
        with local_workers(settings, 2, "gpu,cpu", tmp / "logs"):
            args = argparse.Namespace(data=str(m3fd_small), model=str(tiny_sd), shards=4, t=None, steps=None,
                                      size=64, batch_size=4, preset="readme", split_seed=42, test_fraction=0.2,
                                      precision="auto", seed=0)
            job_id = submit_invert(settings, args)
            job = jobs.wait(settings, job_id, timeout=300)
            assert job.state == "succeeded", job.error

            def all_succeeded():
                tasks = api(base, "/api/tasks?taskname=invert.shard")
                return len(tasks) == 4 and all(t["state"] == "SUCCESS" for t in tasks.values())

            _wait_for(all_succeeded, 60, "Flower to see 4 succeeded shard tasks")
            yield FlowerRun(base, job_id, settings, tmp, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
@pytest.mark.server
def test_rest_api_lists_every_shard_task_with_job_shard_worker_runtime_and_result(flower_run):
    r = flower_run
    workers = api(r.base, "/api/workers?refresh=1")
    names = sorted(workers)
    assert len(names) == 2 and all(n.startswith(("local0@", "local1@")) for n in names), names
    tasks = api(r.base, "/api/tasks?taskname=invert.shard")
    seen = set()
    for task_id, t in tasks.items():
        assert t["name"] == "invert.shard" and t["state"] == "SUCCESS"
        kwargs = ast.literal_eval(t["kwargs"])
        assert kwargs["job_id"] == r.job_id
        seen.add(kwargs["shard_index"])
        assert t["worker"] in names and t["runtime"] > 0
        result = ast.literal_eval(t["result"])  # run_shard's return value, carried by task-succeeded
        assert result["shard"] == kwargs["shard_index"] and result["pairs"] == 5 and result["job_id"] == r.job_id
        info = api(r.base, f"/api/task/info/{task_id}")
        assert info["state"] == "SUCCESS" and info["name"] == "invert.shard" and info["worker"] == t["worker"]
        progress = info["progress"]  # the last task-progress event before the task ended
        assert progress["job_id"] == r.job_id and progress["shard"] == kwargs["shard_index"]
        # progress counts U-Net calls (20 per batch of up to 4 pairs: 2 batches here) and carries the pairs done
        assert progress["unit"] == "unet_calls" and progress["total"] == 40 and 20 <= progress["done"] <= 40
        assert progress["pairs"] == 5 and progress["pairs_done"] in (4, 5) and progress["pairs_per_s"] > 0
    assert seen == {0, 1, 2, 3}
    # one worker name everywhere: the DB's shard rows name the node Flower lists (then the pid)
    with session_scope(r.settings) as s:
        workers_of_shards = {w.rsplit(":", 1)[0] for w in s.scalars(select(Shard.worker).where(Shard.job_id == r.job_id))}
    assert workers_of_shards <= set(names), (workers_of_shards, names)


@pytest.mark.slow
@pytest.mark.server
def test_api_is_closed_without_credentials_and_metrics_count_progress_events(flower_run):
    r = flower_run
    for auth in (None, (USER, "wrong")):
        with pytest.raises(urllib.error.HTTPError) as e:
            api(r.base, "/api/workers", auth=auth)
        assert e.value.code == 401
    metrics = api(r.base, "/metrics", auth=None)  # Prometheus scrapes without credentials
    progress = [ln for ln in metrics.splitlines()
                if ln.startswith("flower_events_total{") and 'type="task-progress"' in ln
                and 'task="invert.shard"' in ln]
    assert progress and sum(float(ln.rsplit(" ", 1)[1]) for ln in progress) >= 4  # at least one per shard


@pytest.mark.slow
@pytest.mark.server
def test_dashboard_in_headless_chromium_shows_workers_and_tasks(flower_run):
    r = flower_run
    auth_base = r.base.replace("http://", f"http://{USER}:{PASSWORD}@")
    shots = {}
    for page, path in (("workers", "/workers"), ("tasks", "/tasks")):
        shot = r.tmp / f"flower-{page}.png"
        dom = run_chromium(auth_base + path, r.tmp, screenshot=shot, dump_dom=True)
        screenshot_is_not_blank(shot)
        shots[page] = shot
        if page == "workers":
            assert "local0@" in dom and "local1@" in dom and "Online" in dom
        else:
            assert dom.count(">invert.shard<") == 4 and "SUCCESS" in dom
            assert all(f"shard {i} of {r.job_id}" in dom for i in range(4))  # kwargs as Flower displays them
    task_id = next(iter(api(r.base, "/api/tasks?taskname=invert.shard")))  # the API keeps raw kwargs
    dom = run_chromium(f"{auth_base}/task/{task_id}", r.tmp, dump_dom=True)
    assert "Progress" in dom and "pairs_per_s" in dom  # the task page lists the progress field
    print(f"Flower screenshots: {shots['workers']} {shots['tasks']}")


# -- without servers --------------------------------------------------------------------------------------------------


def _event(kind: str, uuid_: str, clock: int, **fields) -> dict:
    return {"type": f"task-{kind}", "uuid": uuid_, "hostname": "gpu0@node", "timestamp": time.time(),
            "local_received": time.time(), "clock": clock, **fields}


def test_progress_events_give_a_progress_state_that_never_overwrites_the_result():
    from flower.events import EventsState

    fl.install_progress_state()
    fl.install_progress_state()  # idempotent
    state = EventsState(max_tasks_in_memory=100)
    tid = "t-1"
    state.event(_event("received", tid, 1, name="invert.shard", args="()",
                       kwargs="{'job_id': 'invert-1', 'shard_index': 3}"))
    state.event(_event("started", tid, 2))
    state.event(_event("progress", tid, 3, result="2/5 (40%) pairs_per_s=3.1",
                       progress={"job_id": "invert-1", "shard": 3, "done": 2, "total": 5}))
    task = state.tasks[tid]
    assert task.state == fl.PROGRESS_STATE and task.result == "2/5 (40%) pairs_per_s=3.1"
    d = task.as_dict()
    assert d["progress"]["done"] == 2 and d["name"] == "invert.shard"
    state.event(_event("succeeded", tid, 4, result="{'pairs': 5}", runtime=1.5))
    state.event(_event("progress", tid, 5, result="5/5 (100%)", progress={"done": 5, "total": 5}))  # late
    task = state.tasks[tid]
    assert task.state == "SUCCESS" and task.result == "{'pairs': 5}" and task.runtime == 1.5
    assert task.as_dict()["progress"]["done"] == 2


def test_shard_context_progress_sends_throttled_events_and_survives_a_broker_error():
    from workers.runner import ShardContext

    sent, beats = [], []

    class Task:
        name = "invert.shard"
        request = SimpleNamespace(id="abc", hostname="gpu0@node")

        def send_event(self, type_, **fields):
            sent.append((type_, fields))

    hb = SimpleNamespace(progress=lambda **kw: beats.append(kw))
    ctx = ShardContext(None, None, "invert-1", 3, "invert", {}, 1, "o", hb, Task())
    ctx.progress(1, 10, pairs_per_s=2.5)
    ctx.progress(2, 10, pairs_per_s=2.5)  # within a second of the last event: the DB gets it, Flower does not
    ctx.progress(10, 10, pairs_per_s=2.75, loss=None)  # the last one always goes out
    assert [b["done"] for b in beats] == [1, 2, 10]
    assert [f["progress"]["done"] for _, f in sent] == [1, 10]
    assert sent[0][0] == "task-progress" and sent[0][1]["retry"] is False
    assert sent[0][1]["result"] == "1/10 (10%) pairs_per_s=2.5" and sent[1][1]["result"] == "10/10 (100%) pairs_per_s=2.75"
    assert sent[0][1]["progress"] == {"job_id": "invert-1", "shard": 3, "done": 1, "total": 10, "pairs_per_s": 2.5}
    # name and arguments ride along, so a Flower started mid-task still lists it by name
    assert sent[0][1]["name"] == "invert.shard" and sent[0][1]["kwargs"] == "{'job_id': 'invert-1', 'shard_index': 3}"

    class Broken(Task):
        def send_event(self, type_, **fields):
            raise ConnectionError("broker down")

    ShardContext(None, None, "j", 0, "invert", {}, 1, "o", hb, Broken()).progress(1, 2)  # no exception
    ShardContext(None, None, "j", 0, "invert", {}, 1, "o", hb, None).progress(1, 2)  # no task: DB only


def test_flower_command_line_and_the_unauthenticated_api_switch(monkeypatch, tmp_path):
    from celery import Celery

    from orchestrator.cli import build_parser
    from shared.errors import UserError

    args = build_parser().parse_args(["flower", "--port", "5555", "--basic-auth", "admin:s3cret"])
    assert (args.port, args.basic_auth, args.unauthenticated_api) == (5555, "admin:s3cret", False)
    argv = fl.flower_argv(5555, "127.0.0.1", "admin:s3cret")
    assert argv[:2] == ["flower", "--port=5555"] and "--basic_auth=admin:s3cret" in argv
    assert "--address=127.0.0.1" in argv and f"--tasks_columns={fl.TASK_COLUMNS}" in argv
    for bad in ("admin", ":pw", "admin:", "a:b,c"):
        with pytest.raises(UserError):
            fl.check_basic_auth(bad)
    task = SimpleNamespace(kwargs="{'job_id': 'invert-1', 'shard_index': 12}", state="SUCCESS",
                           result="{'job_id': 'invert-1', 'shard': 12, 'pairs': 5, 'device': 'cuda'}")
    task = fl.format_task(task)
    assert task.kwargs == "shard 12 of invert-1" and task.result == "pairs=5 device=cuda"
    running = SimpleNamespace(kwargs="{'job_id': 'j', 'shard_index': 0}", state="PROGRESS", result="2/5 (40%)")
    assert fl.format_task(running).result == "2/5 (40%)"
    for raw in ("{'x': 1}", "<object at 0x1>"):
        assert fl.format_task(SimpleNamespace(kwargs=raw, state="SUCCESS", result=None)).kwargs == raw

    seen = {}

    def fake_start(self, argv=None):
        seen["argv"], seen["env"] = argv, os.environ.get(fl.UNAUTHENTICATED_API_ENV)
        return 0

    monkeypatch.setattr(Celery, "start", fake_start)
    settings = Settings.from_env({"ORCH_HOME": str(tmp_path / "orch")})
    monkeypatch.setenv(fl.UNAUTHENTICATED_API_ENV, "true")
    assert fl.run_flower(settings, port=5599, basic_auth="a:b") == 0
    assert seen["env"] is None  # an inherited "true" is not honoured without the flag
    assert fl.run_flower(settings, port=5599, unauthenticated_api=True) == 0
    assert seen["env"] == "true" and seen["argv"][1] == "--port=5599"


def test_stopped_flower_leaves_no_event_queue_on_the_filesystem_broker(embedded):
    """kombu's filesystem transport never auto-deletes a queue: a dead Flower's binding would collect every event."""
    table = embedded.broker_folder / "control" / "celeryev.exchange"
    table.write_text(json.dumps([["#", "^.*?$", "celeryev.old"], ["#", "^.*?$", "celeryev.mine"]]))
    folder = embedded.broker_folder / "in"
    for name in ("1_a.celeryev.mine.msg", "2_b.celeryev.mine.msg", "3_c.celeryev.old.msg", "4_d.gpu.msg"):
        (folder / name).write_text("{}")
    assert fl.event_queues(embedded) == {"celeryev.old", "celeryev.mine"}
    fl.unbind_event_queues(embedded, {"celeryev.mine"})
    assert json.loads(table.read_text()) == [["#", "^.*?$", "celeryev.old"]]
    assert sorted(p.name for p in folder.iterdir()) == ["3_c.celeryev.old.msg", "4_d.gpu.msg"]


def test_flower_without_auth_listens_on_loopback_and_public_needs_auth_or_a_flag(monkeypatch, tmp_path, capsys):
    from celery import Celery

    from orchestrator.cli import main

    seen = []
    monkeypatch.setattr(Celery, "start", lambda self, argv=None: seen.append(argv) or 0)
    for var in ("FLOWER_BASIC_AUTH", "FLOWER_AUTH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "orch"))

    assert main(["flower", "--port", "5599"]) == 0  # no auth: loopback, and it says so
    assert "--address=127.0.0.1" in seen[-1]
    err = capsys.readouterr().err
    assert "127.0.0.1 only" in err and "--basic-auth" in err
    for public in ("0.0.0.0", "::", "10.1.2.3", "flower.example.org"):
        n = len(seen)
        assert main(["flower", "--address", public]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "--insecure-public" in err[0], err
        assert len(seen) == n  # refused before Flower started
    assert main(["flower", "--address", "::1"]) == 0 and "--address=::1" in seen[-1]
    assert main(["flower", "--address", "0.0.0.0", "--insecure-public"]) == 0
    assert "--address=0.0.0.0" in seen[-1] and "OPENLY" in capsys.readouterr().err
    assert main(["flower", "--basic-auth", "a:b"]) == 0  # with auth: all interfaces, as before
    assert not any(a.startswith("--address") for a in seen[-1])
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "a:b")
    assert main(["flower", "--address", "0.0.0.0"]) == 0 and "--address=0.0.0.0" in seen[-1]
