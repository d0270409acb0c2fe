"""A kind that only records its finaliser's calls (tests/workers/test_bookkeeping.py loads it via ORCH_EXTRA_KINDS)."""

from __future__ import annotations

from dataclasses import dataclass

from kinds.base import Kind, Plan
from shared import constants as C

CALLS: list[str] = []


@dataclass(frozen=True)
class NoOptions:
    pass


def finalize(s, job) -> None:
    CALLS.append(job.id)


KIND = Kind(name="test-finalizer", help="records finaliser calls", options=NoOptions,
            plan=lambda settings, o: Plan({}), describe=lambda data: "a test job",
            queue=C.QUEUE_CPU, task="bench.shard", work="workers.tasks.bench:bench_work",
            finalize="tests.workers.finalizer_kind:finalize")
