"""Scaling: the CPU inversion of a small model with 1 and then 2 worker processes (one thread each), same job.

    python -m benchmarks.scaling                     # 128 pairs in 16 shards, embedded backend
    python -m benchmarks.scaling --backend servers --pairs 256
    python -m benchmarks.scaling --quick

Each run starts N real `orchestrator worker` processes (OMP_NUM_THREADS=1), warms each one up with a job that
loads the model in every process, then submits `invert` (tiny SD model of the real classes, 64 px, "readme"
schedule) and measures from submit to the job's recorded end. ``speedup`` = wall(1 worker) / wall(N workers)
(target >= 1.8 with 2 workers on 2 cores); ``cores_busy`` = CPU seconds of the worker processes / wall, i.e. how
many cores the workers actually got (on a machine shared with other work it caps the speedup); ``efficiency`` =
pairs per CPU-second relative to 1 worker, and ``speedup_on_free_cores`` = workers x efficiency, the speedup with
every worker on a core of its own. ``plain_speedup``: the same pairs decoded and inverted by N plain processes
(no broker, no DB) in the same run, i.e. the scaling the machine itself allows; the system's ``speedup`` is
measured against it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import timezone
from pathlib import Path

from benchmarks._common import CpuMeter, backend, emit, header, servers_available


def invert_args(data: Path, model: Path, shards: int, batch: int) -> argparse.Namespace:
    return argparse.Namespace(data=str(data), model=str(model), shards=shards, t=None, steps=None, size=64,
                               batch_size=batch, preset="readme", split_seed=42, test_fraction=0.2,
                               precision="auto", seed=0)


def run_invert(settings, args_ns, timeout: float = 1800) -> float:
    from orchestrator import jobs
    from orchestrator.submit import submitter
    submit_invert = submitter("invert")

    t0 = time.time()
    job_id = submit_invert(settings, args_ns)
    job = jobs.wait(settings, job_id, timeout=timeout, poll=0.1)
    if job.state != "succeeded":
        raise RuntimeError(f"invert job {job_id} ended {job.state}: {job.error}")
    end = job.finished_at if job.finished_at.tzinfo else job.finished_at.replace(tzinfo=timezone.utc)
    return end.timestamp() - t0


def _plain_process(model: str, batches: list, size: int, barrier, out) -> None:
    """One plain process: load the model and warm up, wait for the others, decode + invert its batches."""
    import torch

    torch.set_num_threads(1)
    from benchmarks.inversion import load_batch
    from workers.ml.inversion import invert_pairs, make_config
    from workers.ml.sd import load_sd

    parts, cfg = load_sd(model), make_config("readme", size=size)
    x = torch.zeros(1, 3, size, size)
    invert_pairs(parts, x, x, cfg)  # warm-up, as the workers' warm-up job
    barrier.wait()
    t0 = time.perf_counter()
    for b in batches:
        invert_pairs(parts, *load_batch(b, size), cfg)
    out.put(time.perf_counter() - t0)


def run_plain(model: Path, data: Path, n: int, batch: int, size: int = 64) -> float:
    """The machine's own scaling: the same pairs decoded and inverted by ``n`` plain processes (no broker, no DB;
    batches dealt round-robin), one thread each, started together; wall seconds of the slowest."""
    import multiprocessing as mp

    from workers.ml.m3fd import find_pairs

    pairs = find_pairs(data)
    batches = [pairs[i : i + batch] for i in range(0, len(pairs), batch)]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_plain_process, args=(str(model), batches[i::n], size, barrier, out))
             for i in range(n)]
    for pr in procs:
        pr.start()
    walls = [out.get(timeout=1800) for _ in procs]
    for pr in procs:
        pr.join()
    return max(walls)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["embedded", "servers"], default="embedded")
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", default="1,2", help="worker-process counts to compare")
    p.add_argument("--quick", action="store_true", help="32 pairs in 8 shards")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    pairs, shards = (32, 8) if args.quick else (args.pairs, args.shards)
    header("scaling")
    if args.backend == "servers" and not servers_available():
        print("# Redis/PostgreSQL not reachable: nothing to measure")
        return 0
    from orchestrator.demo import local_workers
    from shared.db import ensure_schema
    from workers.fixtures.m3fd import write_synthetic
    from workers.fixtures.tiny_sd import write_tiny_sd

    rows = []
    with tempfile.TemporaryDirectory(prefix="orch-bench-scaling-") as tmp:
        model = write_tiny_sd(Path(tmp) / "tiny-sd")
        data, warm = Path(tmp) / "m3fd", Path(tmp) / "warm"
        write_synthetic(data, pairs, width=128, height=96)
        counts = [int(n) for n in args.workers.split(",")]
        write_synthetic(warm, 2 * max(counts), width=128, height=96)
        for n in counts:
            with backend(args.backend) as settings:
                ensure_schema(settings)
                with local_workers(settings, n, "gpu,cpu", Path(tmp) / f"logs-{n}") as procs:
                    # one shard per process, each loading the model: start-up is not part of the figure
                    run_invert(settings, invert_args(warm, model, 2 * n, 1))
                    meter = CpuMeter([pr.pid for pr in procs], settings.database_url)
                    meter.start()
                    wall = run_invert(settings, invert_args(data, model, shards, args.batch))
                    cpu = meter.stop()
            plain = run_plain(model, data, n, args.batch)
            rows.append({"workers": n, "pairs": pairs, "shards": shards, "wall_s": round(wall, 2),
                         "pairs_per_s": round(pairs / wall, 2),
                         "cores_busy": None if cpu is None else round(cpu / wall, 2), "plain_wall_s": round(plain, 2)})
            print(f"  {n} worker(s): {wall:.1f} s; {n} plain process(es): {plain:.1f} s", flush=True)
    for r in rows:
        r["speedup"] = round(rows[0]["wall_s"] / r["wall_s"], 2)
        # what the machine itself gives N processes doing the same work without the system, in the same run
        r["plain_speedup"] = round(rows[0]["plain_wall_s"] / r["plain_wall_s"], 2)
        if r["cores_busy"] and rows[0]["cores_busy"]:
            # pairs per CPU-second relative to 1 worker: the speedup the workers would reach with their cores free
            per_core, per_core_1 = r["pairs_per_s"] / r["cores_busy"], rows[0]["pairs_per_s"] / rows[0]["cores_busy"]
            r["efficiency"] = round(per_core / per_core_1, 2)
            r["speedup_on_free_cores"] = round(r["workers"] * per_core / per_core_1, 2)
    emit(f"CPU inversion (tiny SD, 64 px, 20 steps) on the {args.backend} backend, 1 thread per worker", rows,
         json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
