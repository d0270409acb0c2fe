"""Submission: a job of 10,000 shards created (one transaction, bulk inserts) and enqueued (batched publishing).

    python -m benchmarks.submit                      # 10,000 shards, both backends, vs one publish per message
    python -m benchmarks.submit --shards 2000 --quick

No worker runs: the messages stay in the broker (a flushed Redis DB index / a temporary folder) and are thrown away.
Columns: ``create_s`` (jobs.create_job: the job, its shards and one item row per shard in one transaction),
``enqueue_s`` (workers.dispatch.enqueue_shards: publish and mark queued), and ``total_s`` (target < 5 s). The
reference row ``per-message`` publishes the same messages one ``apply_async`` at a time (no pipeline), as the
dispatcher did before batching, and marks them in one UPDATE.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks._common import Timer, backend, emit, header, servers_available
from shared import constants as C
from shared.settings import Settings


def items_for(n_shards: int, per_shard: int) -> list[dict]:
    """Item rows shaped like an invert job's (one M3FD pair each)."""
    return [
        {"pair_id": f"{s:05d}-{k}", "split": "train" if (s + k) % 5 else "test",
         "rgb_path": f"/data/m3fd/Vis/{s:05d}-{k}.png", "ir_path": f"/data/m3fd/Ir/{s:05d}-{k}.png", "shard_index": s}
        for s in range(n_shards) for k in range(per_shard)
    ]


def per_message_enqueue(settings: Settings, job_id: str, n: int) -> None:
    """The reference: one publish (and one task-sent event) per message, each its own broker round trip."""
    from sqlalchemy import update

    from shared.db import session_scope
    from shared.models import Job, Shard
    from shared.status import JobState, ShardState
    from workers.bookkeeping import utcnow
    from workers.dispatch import get_app

    app = get_app(settings)
    task = app.signature("bench.shard")
    with app.producer_or_acquire() as producer:
        for i in range(n):
            task.clone(kwargs={"job_id": job_id, "shard_index": i}).apply_async(producer=producer)
    with session_scope(settings) as s:
        s.execute(update(Shard).where(Shard.job_id == job_id, Shard.state == ShardState.PENDING)
                  .values(state=ShardState.QUEUED.value, enqueued_at=utcnow()))
        s.execute(update(Job).where(Job.id == job_id).values(state=JobState.RUNNING.value))


def broker_depth(settings: Settings) -> int:
    """Messages waiting on the cpu queue (proves they were all published)."""
    from workers.dispatch import get_app

    with get_app(settings).connection_for_write() as conn:
        return conn.default_channel.queue_declare(C.QUEUE_CPU).message_count


def run(kind: str, n: int, per_shard: int, reference: bool) -> list[dict]:
    from orchestrator import jobs
    from shared.db import ensure_schema
    from workers.dispatch import enqueue_shards, get_app

    rows = []
    with backend(kind) as settings:
        ensure_schema(settings)
        get_app(settings).connection_for_write().ensure_connection()  # connect before the clock starts
        jobs.create_job(settings, "bench", {}, 1)  # warm the engine and the schema check
        items = items_for(n, per_shard)
        modes = ["batched", "per-message"] if reference else ["batched"]
        for mode in modes:
            depth0 = broker_depth(settings)
            with Timer() as tc:
                job_id = jobs.create_job(settings, "bench", {"size": 64, "repeats": 40}, n, items)
            with Timer() as te:
                if mode == "batched":
                    enqueue_shards(settings, job_id)
                else:
                    per_message_enqueue(settings, job_id, n)
            published = broker_depth(settings) - depth0
            assert published == n, f"{published} of {n} messages on the queue"
            rows.append({"backend": kind, "enqueue": mode, "shards": n, "items": len(items),
                         "create_s": round(tc.s, 3), "enqueue_s": round(te.s, 3), "total_s": round(tc.s + te.s, 3),
                         "ms_per_shard": round(1e3 * (tc.s + te.s) / n, 3)})
            print(f"  {kind:<9} {mode:<12} create {tc.s:6.2f} s  enqueue {te.s:6.2f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--items-per-shard", type=int, default=1)
    p.add_argument("--backends", default="servers,embedded")
    p.add_argument("--quick", action="store_true", help="1,000 shards")
    p.add_argument("--no-reference", action="store_true", help="skip the per-message reference row")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    n = 1000 if args.quick else args.shards
    header("submit")
    rows: list[dict] = []
    for kind in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if kind == "servers" and not servers_available():
            print("# Redis/PostgreSQL not reachable: servers skipped")
            continue
        rows += run(kind, n, args.items_per_shard, not args.no_reference)
    emit(f"create + enqueue a job of {n} shards (target < 5 s)", rows, json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
