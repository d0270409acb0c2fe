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
from shared.settings import Settings
from shared.store import store


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


_last_line: list[str] = [""]


def _progress_line(job) -> None:
    """Redraw one line on a terminal; elsewhere print a line only when something changed."""
    line = f"  {job.id}: {job.state:<9} {job.shards_done:>3}/{job.shards_total} shards"
    if sys.stdout.isatty():
        print("\r" + line, end="", flush=True)
    elif line != _last_line[0]:
        print(line, flush=True)
    _last_line[0] = line


def _stage(settings: Settings, title: str, submit_fn, args: argparse.Namespace, timeout: float = 900) -> str:
    from orchestrator import jobs, queries
    from orchestrator.output import fmt

    t0 = time.monotonic()
    job_id = submit_fn(settings, args)
    print(f"\n== {title}: {job_id}")
    job = jobs.wait(settings, job_id, timeout=timeout, on_tick=_progress_line)
    print(("\n" if sys.stdout.isatty() else "") + f"   {job.state} in {time.monotonic() - t0:.1f} s")
    if job.state != "succeeded":
        raise RuntimeError(f"{title} {job_id} ended {job.state}: {job.error or ''}".strip())
    for k, v in queries.summary_metrics(settings, job_id).items():
        print(f"   {k:<28} {fmt(v)}")
    return job_id


def run_demo(settings: Settings, workers: int = 2, pairs: int = 32, shards: int = 16, full: bool = True) -> int:
    """The main job (invert, 16 shards) end to end; with `full`, also the translator and the NCSN pipelines, tiny."""
    from orchestrator import queries, submit
    from orchestrator.output import table
    from workers.fixtures.m3fd import write_synthetic
    from workers.fixtures.tiny_sd import write_tiny_sd

    settings.ensure_local_folders()
    store(settings).check_schema()  # once, before the workers start: they then find the DB ready
    demo = settings.home / "demo"
    data, model = demo / "m3fd", demo / "tiny-sd"
    if not (data / "Vis").is_dir():
        write_synthetic(data, pairs)
    if not (model / "unet").is_dir():
        write_tiny_sd(model)
    print(f"fixtures: {pairs} synthetic M3FD pairs in {data}, tiny SD model in {model}")
    print(f"embedded default: broker {settings.broker_url} under {settings.broker_folder}, DB {settings.database_url}")
    ns = argparse.Namespace
    t0 = time.monotonic()
    ids: dict[str, str] = {}
    try:
        with local_workers(settings, workers, "gpu,train,cpu", demo / "logs"):
            print(f"started {workers} local worker processes (logs in {demo / 'logs'})")
            ids["invert"] = _stage(settings, f"invert --shards {shards}", submit.submitter("invert"), ns(
                data=str(data), model=str(model), shards=shards, t=None, steps=None, size=64, batch_size=4,
                preset="readme", split_seed=42, test_fraction=0.2, precision="auto", seed=0))
            rows = queries.results(settings, ids["invert"], limit=4)
            print(table(rows, ["pair_id", "split", "shard", "position", "artifact"]))
            if full:
                ids["train-translator"] = _stage(settings, "train-translator (DDP, 2 processes)",
                                                 submit.submitter("train-translator"), ns(
                    latents=ids["invert"], preset="readme", epochs=20, lr=3e-3, weight_decay=0.0, batch_size=4,
                    gpus=2, base_channels=8, depth=2, amp=False, checkpoint_every=0, max_steps=None, log_every=5,
                    seed=0))
                ckpt = int(queries.summary_metrics(settings, ids["train-translator"])["final_checkpoint_id"])
                ids["eval-translator"] = _stage(settings, f"eval-translator --checkpoint {ckpt}",
                                                submit.submitter("eval-translator"), ns(checkpoint=ckpt, shards=2,
                                                                                  batch_size=8))
                ids["train-ncsn"] = _stage(settings, "train-ncsn (DDP, 2 processes)", submit.submitter("train-ncsn"), ns(
                    data="mnist:embedded", preset="ncsn", epochs=1, batch_size=32, lr=1e-3, gpus=2, base_channels=8,
                    max_train_samples=512, steps_each=5, amp=False, checkpoint_every=0, max_steps=None,
                    log_every=4, seed=0))
                ids["train-classifier"] = _stage(settings, "train-classifier", submit.submitter("train-classifier"), ns(
                    data="mnist:embedded", epochs=1, batch_size=64, lr=2e-3, gpus=1, max_train_samples=2000,
                    log_every=10, seed=0))
                nckpt = int(queries.summary_metrics(settings, ids["train-ncsn"])["final_checkpoint_id"])
                cckpt = int(queries.summary_metrics(settings, ids["train-classifier"])["final_checkpoint_id"])
                ids["sample"] = _stage(settings, f"sample --checkpoint {nckpt} --n 64 --shards 4", submit.submitter("sample"),
                                       ns(checkpoint=nckpt, n=64, shards=4, batch_size=64, steps_each=5, seed=0))
                ids["eval-fid"] = _stage(settings, "eval-fid --features mnist-classifier", submit.submitter("eval-fid"), ns(
                    samples=ids["sample"], reference="mnist:embedded", reference_split="test", n_real=500,
                    features="mnist-classifier", inception_weights=None, classifier=cckpt, is_splits=4, seed=0))
    except RuntimeError as e:
        print(f"\ndemo failed: {e}")
        return C.EXIT_JOB_FAILED
    print(f"\nall stages succeeded in {time.monotonic() - t0:.1f} s (tiny models: the numbers show the plumbing,"
          " not model quality)")
    print("\nquery it:")
    home = f"ORCH_HOME={settings.home}"
    inv = ids["invert"]
    for cmd in (f"status {inv}", f"results {inv} --format csv", f"metrics {inv} --json", "jobs"):
        print(f"  {home} orchestrator {cmd}")
    return C.EXIT_OK
