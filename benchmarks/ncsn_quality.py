"""NCSN quality on CPU through the job path: a learning curve of classifier-FID and IS against training wall time.

    python -m benchmarks.ncsn_quality                                  # ncsn preset, 5/10/20/40 min, 500 samples
    python -m benchmarks.ncsn_quality --preset seed-code               # the same budget for the seed's protocol
    python -m benchmarks.ncsn_quality --quick                          # a minute or two: checks the code path only

On a throw-away embedded backend with two local worker processes it submits, like a user would,
`train-classifier` (the feature extractor), `train-ncsn` on the 4,000 embedded training digits, then for every
wall-time mark (minutes of training since the training job started) `sample --shards 2` from the last checkpoint
written before the mark and `eval-fid --features mnist-classifier` against the 1,000 held-out digits. Training is
cancelled at the last mark (the run saves a checkpoint and stops); the sample jobs run after it, so that the marks
measure training alone (on 2 cores a sample job beside it would slow it). The floor and ceiling rows
(uniform noise; 500 real training digits) use the same classifier. One JSON record per row is appended to
benchmarks/results/ncsn_quality.json; --grid writes a 10x10 grid of the last mark's samples, --real-grid one of
real training digits. Classifier-FIDs are not comparable to Inception FIDs (such as the seed's 103.49).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import append_records, backend, machine

RESULTS = Path(__file__).parent / "results" / "ncsn_quality.json"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _checkpoints(settings, job_id: str) -> list[tuple[int, int, float]]:
    """(checkpoint id, step, seconds since the training job started) of a training job, oldest first."""
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.models import Checkpoint, Job
    from workers import bookkeeping as bk

    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        if job is None or job.started_at is None:
            return []
        t0 = bk.aware(job.started_at)
        rows = s.execute(select(Checkpoint.id, Checkpoint.step, Checkpoint.created_at)
                         .where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)).all()
    return [(cid, step, (bk.aware(at) - t0).total_seconds()) for cid, step, at in rows]


def _grid(u8, path: Path) -> None:
    from workers.tasks.ncsn import digits_grid_png

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(digits_grid_png(u8[:100], ncols=10))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["ncsn", "seed-code"], default="ncsn")
    p.add_argument("--minutes", default="5,10,20,40", help="training wall-time marks, comma-separated")
    p.add_argument("--n", type=int, default=500, help="samples per mark")
    p.add_argument("--steps-each", type=int, default=None, help="Langevin steps per level (default: the preset's)")
    p.add_argument("--base-channels", type=int, default=None, help="default: the preset's")
    p.add_argument("--max-steps", type=int, default=None,
                   help="end training at this step (the lr schedule decays over it); marks after the end take the "
                        "final checkpoint")
    p.add_argument("--grid", type=Path, default=None, help="PNG: 10x10 samples of the last mark")
    p.add_argument("--real-grid", type=Path, default=None, help="PNG: 10x10 real training digits")
    p.add_argument("--threads", type=int, default=2, help="OMP threads per worker process")
    p.add_argument("--quick", action="store_true", help="tiny budget: checks the code path only")
    p.add_argument("--keep", type=Path, default=None,
                   help="run in this folder and leave it (its jobs, checkpoints and samples) behind")
    args = p.parse_args(argv)
    marks = sorted(float(m) for m in args.minutes.split(","))
    if args.quick:
        marks, args.n, args.steps_each, args.base_channels = [0.3, 0.6], 20, 2, 8

    import numpy as np

    from orchestrator import jobs, submit
    from orchestrator.demo import local_workers
    from shared.db import ensure_schema, session_scope
    from shared.storage import Storage
    from shared.store import job_of_checkpoint
    from workers.ml.fid import compute_fid_is
    from workers.ml.mnist import EMBEDDED, load_mnist
    from workers.ml.score import get_preset
    from workers.tasks.ncsn import load_classifier_checkpoint, load_sample_arrays

    ns = argparse.Namespace
    preset = get_preset(args.preset)
    records: list[dict] = []
    loads: list[float] = []
    commit = _commit()
    print(machine())
    with backend("embedded", keep=args.keep) as settings:
        ensure_schema(settings)
        env = {"OMP_NUM_THREADS": str(args.threads)}
        with local_workers(settings, 2, "gpu,train,cpu", settings.home / "logs", env=env):

            def run(fn, a, timeout: float = 3600) -> str:
                job_id = fn(settings, a)
                job = jobs.wait(settings, job_id, timeout=timeout)
                if job.state != "succeeded":
                    raise RuntimeError(f"{job.kind} {job_id} ended {job.state}: {job.error or ''}")
                return job_id

            from orchestrator.queries import summary_metrics

            t0 = time.perf_counter()
            clf_job = run(submit.submitter("train-classifier"), ns(
                data=EMBEDDED, epochs=1 if args.quick else 6, batch_size=64, lr=2e-3, gpus=1,
                max_train_samples=None, log_every=50, seed=0))
            clf_ckpt = int(summary_metrics(settings, clf_job)["final_checkpoint_id"])
            print(f"classifier: job {clf_job}, checkpoint {clf_ckpt} ({time.perf_counter() - t0:.0f} s)", flush=True)

            train_job = submit.submitter("train-ncsn")(settings, ns(
                data=EMBEDDED, preset=args.preset, epochs=100000, batch_size=None, lr=None, gpus=1,
                base_channels=args.base_channels, max_train_samples=None, steps_each=None, amp=False,
                checkpoint_every=0, max_steps=args.max_steps, log_every=20, seed=0))
            print(f"train-ncsn --preset {args.preset}: job {train_job}", flush=True)
            marked: list[tuple[float, int, int, float]] = []  # (mark, checkpoint, step, seconds)
            sample_jobs: list[tuple[float, int, int, float, str]] = []  # (mark, ckpt, step, seconds, job)
            pending = list(marks)
            while pending:
                time.sleep(2.0)
                loads.append(os.getloadavg()[0])
                state = jobs.get_job(settings, train_job).state
                if state in ("failed", "cancelled"):
                    raise RuntimeError(f"train-ncsn {train_job} ended {state}")
                cks = _checkpoints(settings, train_job)
                ended = state == "succeeded"  # --max-steps reached before the last mark
                if not cks or (cks[-1][2] < pending[0] * 60 and not ended):
                    continue
                mark = pending.pop(0)
                if not pending and not ended:
                    jobs.cancel(settings, train_job)  # the run saves a last checkpoint and stops
                    time.sleep(2.0)
                    last = cks[-1][1]
                    for _ in range(300):  # until the stopped run's checkpoint is recorded (or it had one already)
                        if _checkpoints(settings, train_job)[-1][1] > last or jobs.get_job(
                                settings, train_job).shards_done:
                            break
                        time.sleep(1.0)
                    cks = _checkpoints(settings, train_job)
                # the last checkpoint written by the mark (the first one after it when none was: a slow start);
                # (the last mark: the checkpoint the cancel wrote)
                if pending and not ended:
                    cid, step, secs = ([c for c in cks if c[2] <= mark * 60] or cks[:1])[-1]
                else:
                    cid, step, secs = cks[-1]
                print(f"mark {mark:g} min: checkpoint {cid} (step {step}, {secs:.0f} s)", flush=True)
                marked.append((mark, cid, step, secs))
            train_s = _checkpoints(settings, train_job)[-1][2]
            # sampling waits for the end of training: on 2 cores a sample job beside the training run would slow
            # it, and the marks would measure a shared machine rather than training time
            for mark, cid, step, secs in marked:
                sj = submit.submitter("sample")(settings, ns(checkpoint=cid, n=args.n, shards=2, batch_size=args.n,
                                                       steps_each=args.steps_each, seed=0))
                print(f"mark {mark:g} min: checkpoint {cid} -> sample job {sj}", flush=True)
                sample_jobs.append((mark, cid, step, secs, sj))

            test_x, _ = load_mnist(EMBEDDED, "test")
            train_x, _ = load_mnist(EMBEDDED, "train")
            splits = 2 if args.quick else 10
            for mark, cid, step, secs, sj in sample_jobs:
                job = jobs.wait(settings, sj, timeout=3600)
                if job.state != "succeeded":
                    raise RuntimeError(f"sample {sj} ended {job.state}: {job.error or ''}")
                sample_m = summary_metrics(settings, sj)
                fj = run(submit.submitter("eval-fid"), ns(samples=sj, reference=EMBEDDED, reference_split="test",
                                                    n_real=None, features="mnist-classifier", inception_weights=None,
                                                    classifier=clf_ckpt, is_splits=splits, seed=0))
                m = summary_metrics(settings, fj)
                wall = (job.finished_at - job.started_at).total_seconds() if job.started_at else None
                records.append({"preset": args.preset, "max_steps": args.max_steps,
                                "base_channels": args.base_channels or preset["base_channels"],
                                "train_minutes": round(secs / 60, 2), "mark_minutes": mark,
                                "steps": step, "fid": m["fid"], "is_mean": m["is_mean"], "is_std": m["is_std"],
                                "n_samples": int(m["n_fake"]),
                                "steps_each": job.spec.get("n_steps_each") or preset["n_steps_each"],
                                "sample_wall_s": wall, "sample_shard_seconds": sample_m.get("shard_seconds_total"),
                                "train_job": train_job, "sample_job": sj, "eval_job": fj, "checkpoint": cid})
                print(f"  {mark:g} min (step {step}): FID {m['fid']:.1f}, IS {m['is_mean']:.2f} ± {m['is_std']:.2f}"
                      f"; sampling {wall or 0:.0f} s wall", flush=True)

            # floor and ceiling with the same feature extractor (the classifier job's checkpoint)
            _, uri = job_of_checkpoint(settings, clf_ckpt)
            storage = Storage(settings.storage)
            clf = load_classifier_checkpoint(str(storage.resolve(uri)), "cpu")
            noise = np.random.default_rng(0).integers(0, 256, size=(args.n, 28, 28), dtype=np.uint8)
            floor = compute_fid_is(test_x, noise, features="mnist-classifier", classifier=clf, is_splits=splits)
            ceil = compute_fid_is(test_x, train_x[: args.n], features="mnist-classifier", classifier=clf,
                                  is_splits=splits)
            with session_scope(settings) as s:
                fake = load_sample_arrays(s, storage, sample_jobs[-1][4])
            if args.grid:
                _grid(fake, args.grid)
            if args.real_grid:
                _grid(train_x, args.real_grid)

    load = {"loadavg_mean": round(float(np.mean(loads)), 2) if loads else None,
            "loadavg_max": round(float(np.max(loads)), 2) if loads else None}
    for r in records:
        r.update(fid_real=round(ceil["fid"], 3), is_real=round(ceil["is_mean"], 3), fid_noise=round(floor["fid"], 3),
                 is_noise=round(floor["is_mean"], 3), commit=commit, cpus=os.cpu_count(), **load)
    print(f"\n{args.preset}: {train_s / 60:.1f} min of training; load average during the run "
          f"{load['loadavg_mean']} (max {load['loadavg_max']}) on {os.cpu_count()} CPUs")
    print(f"{'500 digits vs the 1,000 held-out' if args.n == 500 else 'samples vs held-out':<34} {'FID':>8} {'IS':>12}")
    for r in records:
        print(f"{args.preset + ' after ' + str(r['train_minutes']) + ' min (' + str(r['steps']) + ' steps)':<34}"
              f" {r['fid']:>8.1f} {r['is_mean']:>6.2f} ± {r['is_std']:.2f}")
    print(f"{'uniform noise (floor)':<34} {floor['fid']:>8.1f} {floor['is_mean']:>6.2f}")
    print(f"{'train digits (ceiling)':<34} {ceil['fid']:>8.1f} {ceil['is_mean']:>6.2f}")
    if not args.quick:
        append_records(RESULTS, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
