"""`bench.shard`: a fixed CPU kernel with real exactly-once bookkeeping, to measure what orchestration costs.

The work of every shard is the same small, deterministic numpy kernel (``kernel``), so the time a job of S shards
takes beyond S kernels is the system's own cost: publishing, delivery, the claim, the heartbeat thread, the
completing transaction with one metric upsert, and the job's end. ``benchmarks/overhead.py`` runs the same kernel in
a plain loop, a raw Celery group and Ray tasks for comparison.
"""

from __future__ import annotations

import time

import numpy as np
from sqlalchemy.orm import Session

from shared import constants as C
from workers.recording import record_metrics
from workers.runner import ShardContext, ShardOutput

#: Side of the square matrices of the kernel and how many products it chains (about 1-3 ms on one core).
KERNEL_SIZE = 64
KERNEL_REPEATS = 40


def kernel(seed: int, size: int = KERNEL_SIZE, repeats: int = KERNEL_REPEATS) -> float:
    """A fixed CPU workload: ``repeats`` chained (size x size) float64 matrix products; returns a checksum.

    Deterministic in ``seed``; the product is renormalised each step so values stay finite. Costs
    ``repeats * 2 * size^3`` flops (21 MFLOP at the defaults).
    """
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((size, size))
    x = np.eye(size)
    for _ in range(repeats):
        x = a @ x
        x /= np.abs(x).max()
    return float(x.sum())


def bench_work(ctx: ShardContext) -> ShardOutput:
    """Run ``kernel`` once (sizes from the job spec) and record its checksum as the metric ``checksum`` of item
    ``shard-<index>``, inside the completing transaction like every real job."""
    spec = ctx.spec
    size = int(spec.get("size", KERNEL_SIZE))
    repeats = int(spec.get("repeats", KERNEL_REPEATS))
    t0 = time.perf_counter()
    value = kernel(ctx.index, size, repeats)
    seconds = time.perf_counter() - t0

    def record(s: Session) -> None:
        record_metrics(s, ctx.job_id, [("checksum", value, C.SUMMARY_STEP, f"shard-{ctx.index}")], ctx.index)

    return ShardOutput(record, {"seconds": round(seconds, 6)})


