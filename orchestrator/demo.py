"""`orchestrator demo`: the main job end to end on the embedded default, with real worker processes and no servers.

Makes fixtures (synthetic M3FD pairs, a tiny SD model of the real classes), starts local worker processes, submits
`invert --shards 16`, waits, prints the summary and how to query it, and stops its workers (SIGTERM: warm shutdown).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from shared import constants as C
from shared.db import ensure_schema
from shared.settings import Settings


@contextmanager
def local_workers(settings: Settings, n: int, queues: str, log_dir: Path, env: dict[str, str] | None = None):
    """Start `n` worker processes (each `orchestrator worker`, i.e. one Celery node) and stop them on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ORCH_HOME": str(settings.home), "ORCH_BROKER_URL": settings.broker_url,
           "ORCH_DATABASE_URL": settings.database_url, "ORCH_STORAGE": settings.storage,
           "ORCH_LEASE_SECONDS": str(settings.lease_seconds), "OMP_NUM_THREADS": "1", **(env or {})}
    procs = []
    for i in range(n):
        log = open(log_dir / f"worker-{i}.log", "ab")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "worker", "--queues", queues, "--hostname", f"local{i}@%h",
             "--loglevel", "WARNING"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
    try:
        yield procs
    finally:
        stop_workers(procs)


def stop_workers(procs, grace: float = 30.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _progress_line(job) -> None:
    print(f"\r  {job.id}: {job.state:<9} {job.shards_done:>3}/{job.shards_total} shards", end="", flush=True)


def run_demo(settings: Settings, workers: int = 2, pairs: int = 32, shards: int = 16) -> int:
    from orchestrator import jobs, queries
    from orchestrator.output import fmt, table
    from orchestrator.submit import submit_invert
    from workers.ml.m3fd import write_synthetic
    from workers.ml.sd import write_tiny_sd

    settings.ensure_local_folders()
    ensure_schema(settings)
    demo = settings.home / "demo"
    data, model = demo / "m3fd", demo / "tiny-sd"
    if not (data / "Vis").is_dir():
        write_synthetic(data, pairs)
    if not (model / "unet").is_dir():
        write_tiny_sd(model)
    print(f"fixtures: {pairs} synthetic M3FD pairs in {data}, tiny SD model in {model}")
    print(f"embedded default: broker {settings.broker_url} under {settings.broker_folder}, DB {settings.database_url}")
    args = argparse.Namespace(
        data=str(data), model=str(model), shards=shards, t=None, steps=None, size=64, batch_size=4,
        preset="readme", split_seed=42, test_fraction=0.2, precision="auto", seed=0,
    )
    t0 = time.monotonic()
    with local_workers(settings, workers, "gpu,train,cpu", demo / "logs"):
        print(f"started {workers} local worker processes (logs in {demo / 'logs'})")
        job_id = submit_invert(settings, args)
        print(f"submitted invert --shards {shards}: {job_id}")
        job = jobs.wait(settings, job_id, timeout=900, on_tick=_progress_line)
        print()
    print(f"{job_id}: {job.state} in {time.monotonic() - t0:.1f} s")
    for k, v in queries.summary_metrics(settings, job_id).items():
        print(f"  {k:<24} {fmt(v)}")
    rows = queries.results(settings, job_id, limit=5)
    print(table(rows, ["pair_id", "split", "shard", "position", "artifact"]))
    print("\nquery it:")
    for cmd in (f"status {job_id}", f"results {job_id} --format csv", f"metrics {job_id} --json", "jobs"):
        print(f"  ORCH_HOME={settings.home} orchestrator {cmd}")
    return C.EXIT_OK if job.state == "succeeded" else C.EXIT_JOB_FAILED
