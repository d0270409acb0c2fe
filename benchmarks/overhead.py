"""Per-shard orchestration overhead: a job of S shards of a fixed CPU kernel through the full system, side by side
with the same kernel in a plain loop, in a raw Celery group and as Ray tasks.

    python -m benchmarks.overhead                    # S = 16, 256, 4096 on both backends (~6 min on 2 cores)
    python -m benchmarks.overhead --quick            # S = 16, 64

Overhead per shard = (wall time of S shards - wall time of the plain loop of S kernels) / S, in ms, with the same
number of worker processes (``--workers``, default 1) in every column, started and warmed up before the clock
starts. A job's wall time runs from the call to ``jobs.submit`` (rows created, messages published) to the job's
``finished_at`` in the DB, i.e. it includes submission, delivery, claims, one metric upsert per shard and the job's
end: exactly-once bookkeeping included. Columns:

- system/servers: Redis broker + PostgreSQL (``bench`` jobs, ``bench.shard`` tasks on the ``cpu`` queue);
- system/embedded: the default (filesystem broker + SQLite);
- celery/redis: ``group(raw_kernel.s(i) for i in range(S))`` with a Redis result backend, same delivery settings;
- celery/fs-stock: the same group on kombu's stock filesystem transport (1 s polling) with the file:// backend
  (only up to ``--stock-fs-max`` shards: it costs about a second per task);
- ray: ``ray.get([kernel.remote(i) ...])`` with ``num_cpus = workers`` (skipped when ray is not installed).

Wall time on a shared machine includes waiting for a core, so every column also reports CPU overhead per shard: the
CPU seconds of the driver, the worker processes (with their pool children) and, for the system on servers, its
PostgreSQL backends, minus the plain loop's, divided by S (Redis's own CPU is counted in no column; none for Ray).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timezone
from pathlib import Path

from benchmarks._common import (
    REDIS_DB,
    REDIS_URL,
    CpuMeter,
    Timer,
    backend,
    emit,
    flush_redis,
    header,
    servers_available,
)
from shared import constants as C
from shared.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def run_loop(n: int, size: int, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of ``n`` kernels in a plain loop in this process."""
    from workers.tasks.bench import kernel

    c0 = time.process_time()
    with Timer() as t:
        for i in range(n):
            kernel(i, size, repeats)
    return t.s, time.process_time() - c0


def metered(meter: CpuMeter, fn: Callable[[], float]) -> tuple[float, float | None]:
    """(wall, CPU) seconds of ``fn()``, which returns its own wall time."""
    meter.start()
    wall = fn()
    return wall, meter.stop()


# -- the system --------------------------------------------------------------------------------------------------------


def run_job(settings: Settings, n: int, size: int, repeats: int, timeout: float) -> float:
    """Seconds from submit to the job's recorded end (a job that does not succeed raises)."""
    from orchestrator import jobs

    t0 = time.time()
    job_id = jobs.submit(settings, "bench", {"size": size, "repeats": repeats}, n)
    job = jobs.wait(settings, job_id, timeout=timeout, poll=0.05)
    if job.state != "succeeded":
        raise RuntimeError(f"bench job {job_id} ended {job.state} ({job.shards_done}/{n}): {job.error}")
    end = job.finished_at if job.finished_at.tzinfo else job.finished_at.replace(tzinfo=timezone.utc)
    return end.timestamp() - t0


@contextmanager
def system(kind: str, workers: int):
    """A backend with ``workers`` real worker processes on the cpu queue, warmed up by a job of one shard each;
    yields (settings, a CpuMeter over the workers and their PostgreSQL backends)."""
    from orchestrator.demo import local_workers
    from shared.db import ensure_schema

    with backend(kind) as settings, tempfile.TemporaryDirectory(prefix="orch-bench-logs-") as logs:
        ensure_schema(settings)
        with local_workers(settings, workers, C.QUEUE_CPU, Path(logs)) as procs:
            run_job(settings, workers, 8, 1, timeout=120)  # imports, connections, pools: not part of the figure
            yield settings, CpuMeter([p.pid for p in procs], settings.database_url)


# -- raw Celery ----------------------------------------------------------------------------------------------------------


@contextmanager
def raw_celery(kind: str, workers: int):
    """A raw Celery app and ``workers`` worker processes (prefork, concurrency 1 each) on the rawbench queue."""
    from benchmarks.raw_celery import make_raw_app

    with tempfile.TemporaryDirectory(prefix="orch-bench-raw-") as tmp:
        if kind == "redis":
            broker = backend_url = f"{REDIS_URL}/{REDIS_DB}"
            flush_redis(broker)
            folder = None
        else:
            broker, backend_url, folder = "filesystem://", f"file://{tmp}/results", f"{tmp}/broker"
            os.makedirs(f"{tmp}/results")
        env = {**os.environ, "ORCH_BENCH_RAW_BROKER": broker, "ORCH_BENCH_RAW_BACKEND": backend_url,
               "ORCH_BENCH_RAW_FOLDER": folder or "", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        app = make_raw_app(broker, backend_url, folder)
        procs, logs = [], []
        for i in range(workers):
            logs.append(log := open(f"{tmp}/worker-{i}.log", "ab"))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "benchmarks.raw_celery", "worker", "-Q", "rawbench", "-c", "1",
                 "-P", "prefork", "-n", f"raw{i}@%h", "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                 "--without-heartbeat"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        try:
            run_group(app, workers, 8, 1, timeout=120)  # warm-up
            yield app, CpuMeter([p.pid for p in procs])
        finally:
            from orchestrator.demo import stop_workers

            stop_workers(procs)
            for log in logs:
                log.close()
            app.close()
            if kind == "redis":
                flush_redis(broker)


def run_group(app, n: int, size: int, repeats: int, timeout: float) -> float:
    from celery import group

    from benchmarks.raw_celery import task_name

    sig = app.signature(task_name(app.conf.broker_url))
    with Timer() as t:
        res = group(sig.clone(args=(i, size, repeats)) for i in range(n)).apply_async()
        values = res.get(timeout=timeout, interval=0.01)
    assert len(values) == n
    return t.s


# -- Ray -----------------------------------------------------------------------------------------------------------------


@contextmanager
def ray_runtime(workers: int):
    import ray

    from workers.tasks.bench import kernel

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    remote = ray.remote(num_cpus=1)(kernel)
    try:
        ray.get([remote.remote(i, 8, 1) for i in range(workers * 4)])  # start the worker processes
        yield remote
    finally:
        ray.shutdown()


def run_ray(remote, n: int, size: int, repeats: int) -> float:
    import ray

    with Timer() as t:
        ray.get([remote.remote(i, size, repeats) for i in range(n)])
    return t.s


# -- main ----------------------------------------------------------------------------------------------------------------


def have_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def measure(name: str, ctx, runner: Callable, sizes: list[int], walls: dict) -> None:
    """Run ``runner(handle, n)`` for every size inside the context ``ctx``; store walls[name][n]."""
    t0 = time.perf_counter()
    with ctx as handle:
        for n in sizes:
            walls.setdefault(name, {})[n] = runner(handle, n)
            wall, cpu = walls[name][n]
            cpu_s = "-" if cpu is None else f"{cpu:.2f}"
            print(f"  {name:<16} S={n:<5} {wall:8.2f} s wall {cpu_s:>8} s CPU", flush=True)
    print(f"  ({name}: {time.perf_counter() - t0:.0f} s with start and stop)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16,256,4096", help="comma-separated shard counts S")
    p.add_argument("--quick", action="store_true", help="S = 16, 64 (a minute)")
    p.add_argument("--workers", type=int, default=1, help="worker processes in every column")
    p.add_argument("--columns", default="loop,servers,embedded,celery-redis,celery-fs,ray")
    p.add_argument("--stock-fs-max", type=int, default=64, help="largest S run on the stock filesystem transport")
    p.add_argument("--kernel-size", type=int, default=None, help="matrix side of the kernel")
    p.add_argument("--kernel-repeats", type=int, default=None, help="chained products per kernel")
    p.add_argument("--json", default=None, help="append the figures as JSON lines to this file")
    args = p.parse_args(argv)
    from workers.tasks.bench import KERNEL_REPEATS, KERNEL_SIZE

    size, repeats = args.kernel_size or KERNEL_SIZE, args.kernel_repeats or KERNEL_REPEATS
    sizes = [16, 64] if args.quick else [int(x) for x in args.sizes.split(",")]
    cols = [c.strip() for c in args.columns.split(",") if c.strip()]
    header("overhead")
    servers = servers_available()
    if not servers:
        print("# Redis/PostgreSQL not reachable: server columns skipped")
    if not have_ray():
        print("# ray not installed (pip install ray, or the `bench` extra): Ray column skipped")
    P = args.workers
    timeout = 600.0
    walls: dict[str, dict[int, tuple[float, float | None]]] = {}
    if "loop" in cols:
        run_loop(P * 4, size, repeats)
        measure("loop", _null(), lambda _h, n: run_loop(n, size, repeats), sizes, walls)

    def job(h, n):
        return metered(h[1], lambda: run_job(h[0], n, size, repeats, timeout))

    def grp(h, n):
        return metered(h[1], lambda: run_group(h[0], n, size, repeats, timeout))

    if "servers" in cols and servers:
        measure("system/servers", system("servers", P), job, sizes, walls)
    if "embedded" in cols:
        measure("system/embedded", system("embedded", P), job, sizes, walls)
    if "celery-redis" in cols and servers:
        measure("celery/redis", raw_celery("redis", P), grp, sizes, walls)
    if "celery-fs" in cols:
        fs_sizes = [n for n in sizes if n <= args.stock_fs_max]
        if fs_sizes:
            measure("celery/fs-stock", raw_celery("fs", P), grp, fs_sizes, walls)
    if "ray" in cols and have_ray():
        measure("ray", ray_runtime(P), lambda r, n: (run_ray(r, n, size, repeats), None), sizes, walls)

    loop = walls.get("loop", {})
    rows = []
    for name, by_n in walls.items():
        for n, (wall, cpu) in by_n.items():
            base_wall, base_cpu = loop.get(n, (0.0, 0.0))
            rows.append({"column": name, "S": n, "wall_s": round(wall, 3),
                         "overhead_ms_per_shard": round(1e3 * (wall - base_wall / P) / n, 3),
                         "cpu_overhead_ms_per_shard": None if cpu is None else round(1e3 * (cpu - base_cpu) / n, 3)})
    kernel_ms = 1e3 * loop[max(sizes)][0] / max(sizes) if loop else float("nan")
    emit(f"overhead per shard (kernel {size}x{size} x{repeats}: {kernel_ms:.2f} ms; {P} worker process(es))",
         rows, json_path=args.json)
    over = {(r["column"], r["S"]): r["overhead_ms_per_shard"] for r in rows}
    ratios = []
    for sysname in ("system/servers", "system/embedded"):
        for n in sizes:
            if (sysname, n) not in over:
                continue
            row = {"system": sysname, "S": n, "overhead_ms": over[(sysname, n)]}
            for alt in ("celery/redis", "celery/fs-stock", "ray"):
                a = over.get((alt, n))
                row[f"x {alt}"] = round(over[(sysname, n)] / a, 2) if a and a > 0 else None
            ratios.append(row)
    if ratios:
        emit("ratio of the system's overhead to each alternative's", ratios, json_path=args.json)
    return 0


@contextmanager
def _null():
    yield None


if __name__ == "__main__":
    sys.exit(main())
