"""bench: a fixed CPU kernel per shard with the real exactly-once bookkeeping; what orchestration costs, and a
quick check that a cluster's CPU workers take work (benchmarks/overhead.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kinds.base import Kind, Plan, option
from shared import constants as C


@dataclass(frozen=True)
class BenchOptions:
    shards: int = option(4, type=int)
    size: int = option(64, "side of the kernel's square matrices", type=int)
    repeats: int = option(40, "chained matrix products per shard", type=int)


def plan(settings, o: BenchOptions) -> Plan:
    from kinds.checks import check_positive

    for name in ("shards", "size", "repeats"):
        check_positive("--" + name, getattr(o, name))
    return Plan({"size": o.size, "repeats": o.repeats}, o.shards)


def describe(data: Any) -> str:
    sp = data.job.get("spec") or {}
    return (f"Ran the orchestration benchmark's CPU kernel ({sp.get('repeats', 40)} products of "
            f"{sp.get('size', 64)}x{sp.get('size', 64)} matrices) in {data.job['shards_total']} shards.")


KIND = Kind(
    name="bench",
    help="a fixed CPU kernel per shard: checks that CPU workers take work, measures orchestration overhead",
    options=BenchOptions, plan=plan, describe=describe,
    queue=C.QUEUE_CPU, task="bench.shard", work="workers.tasks.bench:bench_work",
    results="item_metrics", pictures=("images",),
)
