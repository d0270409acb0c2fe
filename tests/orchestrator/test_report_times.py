"""The report's summary separates queue wait from run time, and its shard time agrees with shard_seconds_total."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from orchestrator import report as rp


def test_summary_times():
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    job = {"kind": "sample", "state": "succeeded", "shards_total": 2, "shards_done": 2, "shards_failed": 0,
           "spec": {}, "created_at": t0.isoformat(), "started_at": (t0 + timedelta(seconds=90)).isoformat(),
           "finished_at": (t0 + timedelta(seconds=100)).isoformat()}
    # each shard's span includes claiming, loading and recording; the workers measured 3 s of work each
    shards = [{"index": i, "worker": "w", "state": "done", "attempts": 1,
               "started_at": (t0 + timedelta(seconds=90)).isoformat(),
               "finished_at": (t0 + timedelta(seconds=95)).isoformat()} for i in range(2)]
    html = rp.section_summary(rp.ReportData(job, shards, {"shard_seconds_total": 6.0}, {}, {}, [], [], [], []))
    assert "queue wait" in html and "run time" in html and "wall time" not in html
    text = html.replace("</dt><dd>", "=")
    assert f"queue wait={rp.fmt_seconds(90.0)}" in text and f"run time={rp.fmt_seconds(10.0)}" in text
    assert f"shard time (sum)={rp.fmt_seconds(6.0)}" in text
