"""`orchestrator watch`: live progress from the DB while real shards run (this process is the worker).

Shards run through the real `run_shard` protocol (claim, heartbeat, progress, complete) with a work function that
reports progress and sleeps, so the watcher sees exactly what a worker's heartbeat writes. A 2 s lease makes the
heartbeat (and so the progress) land every 0.5 s.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from rich.console import Console

from orchestrator import jobs
from orchestrator import watch as w
from orchestrator.watch_screen import rich_frame
from shared import constants as C
from tests.conftest import embedded_settings
from workers import bookkeeping as bk
from workers.runner import ShardOutput, run_shard

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _slow_work(steps: int, pause: float, training: bool = False):
    def work(ctx):
        for k in range(1, steps + 1):
            time.sleep(pause)
            if training:
                ctx.progress(k, steps, epoch=(k - 1) // 2, loss=round(1.0 / k, 4), samples_per_s=64.0)
            else:
                ctx.progress(k, steps, pairs_per_s=round(1.0 / pause, 3))
        return ShardOutput(lambda s: None, {"pairs": steps})

    return work


@pytest.fixture
def quick(tmp_path):
    s = embedded_settings(tmp_path / "orch", lease_seconds=2.0)
    s.ensure_local_folders()
    return s


def _run_in_background(settings, job_id: str, n: int, work) -> threading.Thread:
    def go():
        for i in range(n):
            run_shard(settings, job_id, i, work)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_watch_follows_shards_and_a_training_run_to_the_end(quick):
    s = quick
    shards_job = jobs.create_job(s, "eval-translator", {}, 3)
    train_job = jobs.create_job(s, "train-translator", {}, 1)
    outs = {"plain": io.StringIO(), "json": io.StringIO(), "tty": FakeTerminal(), "train": FakeTerminal()}
    codes: dict[str, int] = {}

    def watcher(name, job_id, **kw):
        codes[name] = w.watch(s, job_id, out=outs[name], interval=0.1, timeout=90, **kw)

    threads = [threading.Thread(target=watcher, args=("plain", shards_job)),
               threading.Thread(target=watcher, args=("json", shards_job), kwargs={"as_json": True}),
               threading.Thread(target=watcher, args=("tty", shards_job), kwargs={"width": 80}),
               threading.Thread(target=watcher, args=("train", train_job), kwargs={"width": 80})]
    for t in threads:
        t.start()
    workers = [_run_in_background(s, shards_job, 3, _slow_work(4, 0.45)),
               _run_in_background(s, train_job, 1, _slow_work(6, 0.45, training=True))]
    for t in workers + threads:
        t.join(timeout=120)
    assert codes == {"plain": 0, "json": 0, "tty": 0, "train": 0}

    # plain lines (not a terminal): no escape codes, running shards' progress, then the end
    plain = outs["plain"].getvalue().splitlines()
    assert not ANSI.search(outs["plain"].getvalue())
    partial = {m for ln in plain for m in re.findall(r"s\d (\d)/4", ln)}
    assert partial & {"1", "2", "3"}, plain  # seen mid-shard, not only at shard boundaries
    done = [int(m.group(1)) for ln in plain if (m := re.search(r" (\d)/3 shards", ln))]
    assert done == sorted(done) and done[-1] == 3
    assert plain[-1].startswith(f"{shards_job}: succeeded (3/3 shards) in ")

    # JSON lines: every record parses; progress of a running shard appears; the last says it succeeded
    recs = [json.loads(ln) for ln in outs["json"].getvalue().splitlines()]
    assert any(r["running"] and 0 < (r["running"][0]["done"] or 0) < 4 for r in recs)
    assert recs[-1]["state"] == "succeeded" and recs[-1]["fraction"] == 1.0 and recs[-1]["shards_done"] == 3
    fractions = [r["fraction"] for r in recs]
    assert fractions == sorted(fractions)

    # the terminal: frames redrawn in place, every line within 80 columns, bars, a final frame
    tty = outs["tty"].getvalue()
    assert "\x1b[" in tty and re.search(r"\x1b\[\d+A", tty)  # cursor moved up to redraw
    lines = [ANSI.sub("", ln) for ln in re.split(r"[\r\n]", tty)]
    assert all(len(ln) <= 80 for ln in lines)
    assert any(re.search(r"shard \d .*[━╸╺]+ [1-3]/4 pairs", ln) for ln in lines), lines  # rich's bars
    assert any("ETA" in ln for ln in lines) and tty.rstrip().endswith("\x1b[?25h")  # cursor shown again
    assert f"{shards_job}: succeeded (3/3 shards)" in tty

    # training: step, epoch, loss and samples/s of the run
    train = [ANSI.sub("", ln) for ln in re.split(r"[\r\n]", outs["train"].getvalue())]
    steps = {int(m.group(1)) for ln in train if (m := re.search(r"step (\d)/6", ln))}
    assert steps & {2, 3, 4, 5}, train
    assert any(re.search(r"run .*step \d/6  ETA \d+s  loss 0\.\d+  epoch \d  64 samples/s", ln) for ln in train), train


def test_watch_of_a_failed_job_exits_1_with_its_error(quick):
    job = jobs.create_job(quick, "sample", {}, 2)
    owner = bk.make_owner()
    assert bk.claim_shard(quick, job, 0, owner).ok
    bk.fail_shard(quick, job, 0, owner, "RuntimeError: CUDA out of memory\ntraceback...")
    out = io.StringIO()
    assert w.watch(quick, job, out=out, interval=0.05, timeout=10) == C.EXIT_JOB_FAILED
    last = out.getvalue().splitlines()[-1]
    assert last.startswith(f"{job}: failed") and "error: shard 0: RuntimeError: CUDA out of memory" in last


def test_watch_cli_json_timeout_and_unknown_job(quick, monkeypatch, capsys):
    from orchestrator.cli import main

    monkeypatch.setenv("ORCH_HOME", str(quick.home))
    for var in ("ORCH_BROKER_URL", "ORCH_DATABASE_URL", "ORCH_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    job = jobs.create_job(quick, "sample", {}, 2)  # nobody runs it
    assert main(["watch", job, "--json", "--interval", "0.05", "--timeout", "0.3"]) == C.EXIT_JOB_FAILED
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    assert rec["state"] == "queued" and rec["shards_total"] == 2 and rec["running"] == []
    assert main(["watch", "nope-1"]) == C.EXIT_USAGE
    assert capsys.readouterr().err.strip() == "error: no job 'nope-1': list jobs with `orchestrator jobs`"


def _view(**kw) -> w.JobView:
    base = dict(job_id="invert-0123456789ab", kind="invert", state="running", shards_total=16, shards_done=6,
                shards_failed=1, by_state={"running": 2, "done": 6, "queued": 7, "failed": 1}, running=[],
                created_at=None, started_at=datetime.now(timezone.utc) - timedelta(seconds=120),
                finished_at=None, error=None)
    base.update(kw)
    return w.JobView(**base)


def test_frames_fit_the_terminal_width():
    shards = [w.ShardView(i, "a-very-long-worker-host-name.cluster.example.org:123456",
                          {"done": 3 + i, "total": 10, "pairs_per_s": 1.25, "stage": "decode-and-invert"},
                          None, 1) for i in range(14)]
    view = _view(running=shards, shards_total=40)
    for width in (80, 60, 40):
        lines = w.render_frame(view, {i: 1.25 for i in range(14)}, width)
        assert all(len(ln) <= width for ln in lines), [len(ln) for ln in lines]
        # the terminal's frame (rich) says the same in the same columns
        console = Console(file=io.StringIO(), width=width, color_system=None, soft_wrap=False)
        console.print(rich_frame(view, {i: 1.25 for i in range(14)}, width))
        drawn = console.file.getvalue().splitlines()
        assert len(drawn) == len(lines) and all(len(ln) <= width for ln in drawn), drawn
        for plain, fancy in zip(lines, drawn, strict=True):  # the same words; only the bar's glyphs differ
            assert re.sub(r"\[[#.]+\]|[━╸╺]+", "", plain).split() == re.sub(r"[━╸╺]+", "", fancy).split()
    lines = w.render_frame(view, {0: 1.25}, 80, max_shards=12)
    assert lines[-1] == "  ... and 2 more running"
    assert "6/40 shards" in lines[1] and "1 failed" in lines[1]
    # the job's fraction counts the running shards' parts too
    assert view.fraction == pytest.approx((6 + sum(min(1.0, (3 + i) / 10) for i in range(14))) / 40)
    assert f"{100 * view.fraction:3.0f}%" in lines[1]


def test_rate_tracker_ignores_the_steps_of_a_resumed_run():
    tr = w.RateTracker()
    sh = w.ShardView(0, "h:1", {"done": 5000, "total": 6000, "resumed_from": "ckpt", "samples_per_s": 900.0},
                     None, 2)
    assert tr.rate(sh, 100.0, training=True) is None  # 5000 steps were done before this attempt started
    sh2 = w.ShardView(0, "h:1", {"done": 5040, "total": 6000}, None, 2)
    assert tr.rate(sh2, 110.0, training=True) == pytest.approx(4.0)


def test_formatting_helpers():
    assert [w.fmt_duration(x) for x in (None, 5, 65, 3725)] == ["-", "5s", "1m05s", "1h02m"]
    assert w.bar(0.5, 10) == "[#####.....]" and w.bar(2.0, 4) == "[####]"
