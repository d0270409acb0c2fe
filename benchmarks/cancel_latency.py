"""Seconds from `cancel` to the worker being free, per kind of work (invert, sample, train), on this machine.

    python -m benchmarks.cancel_latency              # invert, sample, train (CPU, tiny models; a few minutes)
    python -m benchmarks.cancel_latency --quick      # invert and sample only

Each kind runs one shard whose single batch lasts minutes (invert: 999 U-Net calls on a tiny SD model; sample:
50,000 Langevin steps of a tiny score network; train: a tiny NCSN run under torchrun with far more steps than it
can reach), with this process as the worker (``run_shard``, the function a Celery task calls). Once the shard
reports progress, the job is cancelled; the figure is the time until ``run_shard`` returns, i.e. until the worker
would take its next message. The lease is 60 s (heartbeat every 15 s), so the figure measures the in-work cancel
check (at most one job-state read a second), not the heartbeat.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _progress(settings, job_id: str) -> dict:
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.models import Shard

    with session_scope(settings) as s:
        return s.execute(select(Shard.progress).where(Shard.job_id == job_id, Shard.index == 0)).scalar_one() or {}


def measure(settings, job_id: str, work, progress_timeout: float = 900.0) -> dict:
    from orchestrator import jobs
    from workers.runner import run_shard

    out: dict = {}
    t = threading.Thread(target=lambda: out.update(run_shard(settings, job_id, 0, work)), daemon=True)
    t.start()
    deadline = time.monotonic() + progress_timeout
    while not _progress(settings, job_id).get("done") and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    p = _progress(settings, job_id)
    t0 = time.monotonic()
    jobs.cancel(settings, job_id)
    t.join(timeout=600)
    return {"seconds": round(time.monotonic() - t0, 2), "cancelled": bool(out.get("cancelled")),
            "progress_at_cancel": f"{p.get('done')}/{p.get('total')} {p.get('unit', 'steps')}"}


def run_invert(settings, root: Path) -> dict:
    from orchestrator.submit import submitter
    submit_invert = submitter("invert")
    from tests.orchestrator.conftest import create_only, invert_args
    from workers.fixtures.m3fd import write_synthetic
    from workers.fixtures.tiny_sd import write_tiny_sd
    from workers.tasks.invert import invert_work

    data, model = root / "m3fd", write_tiny_sd(root / "tiny-sd")
    write_synthetic(data, 20)
    args = invert_args(data, model, shards=1, batch_size=16, size=64, steps=1000, t=999)
    return measure(settings, create_only(submit_invert, settings, args), invert_work)


def run_sample(settings, root: Path) -> dict:
    import torch

    from orchestrator import jobs
    from shared.storage import Storage
    from workers.ml.score import get_preset
    from workers.tasks.ncsn import sample_work
    from workers.train.common import CHECKPOINT_FORMAT
    from workers.train.ncsn import build_model

    cfg = {**get_preset("ncsn"), "base_channels": 8}
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "config": cfg, "model": build_model(cfg).state_dict(),
                "extra": {"ema": None}}, buf)
    uri = Storage(settings.storage).write_bytes("bench/ncsn-tiny.pt", buf.getvalue()).uri
    spec = {"checkpoint_id": 0, "checkpoint_uri": uri, "train_job": "none", "n": 64, "shards": 1, "seed": 0,
            "batch_size": 64, "n_steps_each": 5000}
    return measure(settings, jobs.create_job(settings, "sample", spec, 1), sample_work)


def run_train(settings, root: Path) -> dict:
    from orchestrator import submit as submit_mod
    from tests.orchestrator.conftest import create_only
    from tests.orchestrator.test_ncsn_pipeline import ncsn_args
    from workers.tasks.train import train_work

    args = ncsn_args(gpus=1, epochs=1000, max_train_samples=256, log_every=1)
    return measure(settings, create_only(submit_mod.submitter("train-ncsn"), settings, args), train_work)


KINDS = {"invert": run_invert, "sample": run_sample, "train": run_train}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="invert,sample,train")
    p.add_argument("--quick", action="store_true", help="invert and sample only (no torchrun)")
    p.add_argument("--json", default=None, metavar="FILE", help="append the table as a JSON line")
    args = p.parse_args(argv)
    from benchmarks._common import emit, header
    from tests.conftest import embedded_settings

    header("cancel_latency")
    rows = []
    for kind in ("invert,sample" if args.quick else args.kinds).split(","):
        with tempfile.TemporaryDirectory(prefix=f"cancel-{kind}-") as tmp:
            settings = embedded_settings(Path(tmp) / "orch")
            settings.ensure_local_folders()
            r = KINDS[kind](settings, Path(tmp))
        rows.append({"kind": kind, "cancel_to_free_s": r["seconds"], "progress_at_cancel": r["progress_at_cancel"],
                     "cancelled": r["cancelled"]})
    emit("cancel -> worker free, per kind (embedded default, 60 s lease)", rows, json_path=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
