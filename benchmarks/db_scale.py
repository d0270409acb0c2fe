"""Results DB at scale: 1,000,000 item rows and 10,000,000 metric rows in PostgreSQL; the CLI's queries at p95.

    python -m benchmarks.db_scale                    # 1M items, 10M metrics (~5 min to load on 2 cores)
    python -m benchmarks.db_scale --quick            # 100k items, 1M metrics

Everything happens in a fresh database (migrated to head with Alembic, so the indexes are exactly the schema's) that
is dropped at the end. Rows are generated inside PostgreSQL with INSERT ... SELECT over generate_series, job by job
(a job's rows are written together, as workers write them, so they share pages as in real use):

- 100 invert jobs x 10,000 pairs = 1,000,000 items (100 shards and 100 latents artifacts per job);
- 40 eval-translator jobs x 25,000 pairs x 8 per-item metrics = 8,000,000 metric rows, plus their summaries;
- 100 train-translator jobs x 20,000 loss points = 2,000,000 metric rows, plus 20 checkpoints each;
- 2,000 small bench jobs, so that `jobs` pages through a realistic table.

Then each query behind the CLI (orchestrator.queries: `status`, `jobs`, `results`, `metrics`, and the metric
history behind training curves) runs 3 times to warm up and ``--runs`` times measured, through the same functions
the CLI calls; the table reports median and p95 in ms (target p95 < 50 ms). ``--explain`` prints EXPLAIN (ANALYZE,
BUFFERS) of every SQL statement each query sends, and the indexes of the tables involved.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import contextmanager

from benchmarks._common import Timer, emit, header, median, p95, pg_database, servers_available
from shared.settings import Settings

#: Marks a load statement run once per job of the kind named after it (bound as :job).
PER_JOB = "-- per job: "
#: The index migration 0003 added (the figures show the metric queries with and without it).
NEW_INDEX = "ix_metrics_job_step_item"
EVAL_METRICS = ("psnr", "ssim", "psnr_seed_protocol", "ssim_seed_protocol", "psnr_baseline", "ssim_baseline",
                "psnr_baseline_seed_protocol", "ssim_baseline_seed_protocol")


def load(url: str, scale: float) -> dict[str, int]:
    """Fill the database; returns the row counts. ``scale`` 1.0 = 1M items and 10M metrics."""
    from sqlalchemy import create_engine, text

    n_inv, pairs_inv = 100, max(int(10_000 * scale), 1)
    shards_inv = min(100, pairs_inv)
    n_eval, pairs_eval = 40, max(int(25_000 * scale), 1)
    n_train, steps = 100, max(int(20_000 * scale), 1)
    names = ", ".join(f"'{n}'" for n in EVAL_METRICS)
    ts = "now() - (g * interval '1 minute')"
    steps_sql = [
        # jobs: ids sort like real ones (kind prefix + hex), created_at spread over days
        f"""INSERT INTO jobs (id, kind, spec, state, shards_total, shards_done, shards_failed, created_at,
                              started_at, finished_at)
            SELECT 'invert-' || substr(md5('i' || g), 1, 12), 'invert', '{{"preset": "readme"}}', 'succeeded',
                   {shards_inv}, {shards_inv}, 0, {ts}, {ts}, {ts} FROM generate_series(1, {n_inv}) g""",
        f"""INSERT INTO jobs (id, kind, spec, state, shards_total, shards_done, shards_failed, created_at)
            SELECT 'eval-' || substr(md5('e' || g), 1, 12), 'eval-translator', '{{}}', 'succeeded', 10, 10, 0, {ts}
            FROM generate_series(1, {n_eval}) g""",
        f"""INSERT INTO jobs (id, kind, spec, state, shards_total, shards_done, shards_failed, created_at)
            SELECT 'train-' || substr(md5('t' || g), 1, 12), 'train-translator', '{{}}', 'succeeded', 1, 1, 0, {ts}
            FROM generate_series(1, {n_train}) g""",
        f"""INSERT INTO jobs (id, kind, spec, state, shards_total, shards_done, shards_failed, created_at)
            SELECT 'bench-' || substr(md5('b' || g), 1, 12), 'bench',  '{{}}',
                   (ARRAY['succeeded', 'failed', 'cancelled', 'running'])[1 + g % 4], 4, 4 * (g % 2), 0, {ts}
            FROM generate_series(1, 2000) g""",
        """INSERT INTO shards (job_id, index, state, attempts, worker, started_at, finished_at, result)
           SELECT j.id, s, 'done', 1, 'host:1', j.created_at, j.created_at, '{"pairs": 100}'
           FROM jobs j CROSS JOIN LATERAL generate_series(0, j.shards_total - 1) s""",
        f"""INSERT INTO artifacts (job_id, shard_index, kind, uri, sha256, bytes, created_at)
            SELECT j.id, s, 'latents', 'file:///store/jobs/' || j.id || '/latents/shard-' || lpad(s::text, 5, '0')
                   || '.safetensors', md5(j.id || s), 1048576, j.created_at
            FROM jobs j CROSS JOIN LATERAL generate_series(0, {shards_inv} - 1) s WHERE j.kind = 'invert'""",
        f"""INSERT INTO items (job_id, pair_id, split, rgb_path, ir_path, shard_index, artifact_id, position)
            SELECT j.id, lpad(i::text, 6, '0'), CASE WHEN i % 5 = 0 THEN 'test' ELSE 'train' END,
                   '/data/m3fd/Vis/' || lpad(i::text, 6, '0') || '.png',
                   '/data/m3fd/Ir/' || lpad(i::text, 6, '0') || '.png',
                   i * {shards_inv} / {pairs_inv}, a.id, i % ({pairs_inv} / {shards_inv})
            FROM jobs j CROSS JOIN LATERAL generate_series(0, {pairs_inv} - 1) i
            JOIN artifacts a ON a.job_id = j.id AND a.shard_index = i * {shards_inv} / {pairs_inv}
            WHERE j.kind = 'invert' ORDER BY j.id, i""",
        f"""{PER_JOB}eval-translator
            INSERT INTO metrics (job_id, name, value, step, item, shard_index, created_at)
            SELECT j.id, n, random() * 30, -1, lpad(i::text, 6, '0'), i % 10, j.created_at
            FROM jobs j CROSS JOIN generate_series(0, {pairs_eval} - 1) i CROSS JOIN unnest(ARRAY[{names}]) n
            WHERE j.id = :job ORDER BY i, n""",
        f"""INSERT INTO metrics (job_id, name, value, step, item, shard_index, created_at)
            SELECT j.id, n, random() * 30, -1, '', NULL, j.created_at
            FROM jobs j CROSS JOIN unnest(ARRAY[{names}, 'pairs']) n WHERE j.kind = 'eval-translator'""",
        f"""{PER_JOB}train-translator
            INSERT INTO metrics (job_id, name, value, step, item, shard_index, created_at)
            SELECT j.id, 'loss', 1.0 / (1 + s), s, '', 0, j.created_at
            FROM jobs j CROSS JOIN generate_series(0, {steps} - 1) s WHERE j.id = :job ORDER BY s""",
        """INSERT INTO metrics (job_id, name, value, step, item, shard_index, created_at)
           SELECT j.id, n, random(), -1, '', NULL, j.created_at
           FROM jobs j CROSS JOIN unnest(ARRAY['final_loss', 'epochs', 'steps']) n
           WHERE j.kind IN ('train-translator', 'invert')""",
        """INSERT INTO artifacts (job_id, shard_index, kind, uri, sha256, bytes, created_at)
            SELECT j.id, 0, 'checkpoint', 'file:///store/jobs/' || j.id || '/ckpt/step-' || c || '.pt',
                   md5(j.id || c), 50000000, j.created_at
            FROM jobs j CROSS JOIN LATERAL generate_series(1, 20) c WHERE j.kind = 'train-translator'""",
        f"""INSERT INTO checkpoints (job_id, artifact_id, step, epoch, reason, created_at)
            SELECT a.job_id, a.id, a.id % 1000 * {max(steps // 20, 1)}, a.id % 25, 'interval', a.created_at
            FROM artifacts a WHERE a.kind = 'checkpoint'
            ON CONFLICT DO NOTHING""",
        """INSERT INTO lineage (job_id, input_kind, input_ref, role)
           SELECT id, 'model', 'CompVis/stable-diffusion-v1-4', 'sd' FROM jobs""",
        "ANALYZE",
    ]
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as c:
            c.execute(text("SET synchronous_commit = off"))
            c.execute(text("SET maintenance_work_mem = '256MB'"))
            with bulk_mode(c, ("items", "metrics")):
                for sql in steps_sql[:-1]:
                    with Timer() as t:
                        if sql.startswith(PER_JOB):  # one statement per job: its rows land together
                            kind, _, sql = sql[len(PER_JOB):].partition("\n")
                            for job in c.execute(text("SELECT id FROM jobs WHERE kind = :k ORDER BY created_at"),
                                                 {"k": kind}).scalars().all():
                                c.execute(text(sql), {"job": job})
                        else:
                            c.execute(text(sql))
                    print(f"  {t.s:7.1f} s  {' '.join(sql.split())[:90]}", flush=True)
            with Timer() as t:
                c.execute(text(steps_sql[-1]))
            print(f"  {t.s:7.1f} s  ANALYZE", flush=True)
            counts = {tbl: c.execute(text(f"SELECT count(*) FROM {tbl}")).scalar_one()
                      for tbl in ("jobs", "shards", "artifacts", "items", "metrics", "checkpoints")}
    finally:
        engine.dispose()
    return counts


@contextmanager
def bulk_mode(c, tables: tuple[str, ...]):
    """Load ``tables`` without their secondary indexes and foreign-key triggers, then rebuild them from the exact
    definitions the migrations created (one sort per index instead of 10M random insertions). The generated rows are
    consistent by construction, so the constraints hold when they come back."""
    from sqlalchemy import text

    saved = []
    for table in tables:
        cons = c.execute(text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = CAST(:t AS regclass) AND contype = 'u'"), {"t": table}).all()
        idx = c.execute(text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t AND indexname NOT IN "
            "(SELECT conname FROM pg_constraint WHERE conrelid = CAST(:t AS regclass))"), {"t": table}).all()
        saved.append((table, cons, idx))
        for name, _ in cons:
            c.execute(text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
        for name, _ in idx:
            c.execute(text(f'DROP INDEX "{name}"'))
        c.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER ALL"))
    try:
        yield
    finally:
        for table, cons, idx in saved:
            with Timer() as t:
                for _, definition in idx:
                    c.execute(text(definition))
                for name, definition in cons:
                    c.execute(text(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}'))
                c.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER ALL"))
            print(f"  {t.s:7.1f} s  rebuilt {len(idx) + len(cons)} index(es) of {table}", flush=True)


def capture_sql(settings: Settings, fn: Callable[[], object]) -> list[tuple[str, object]]:
    """Run ``fn`` and return the (statement, parameters) pairs it sent to the database."""
    from sqlalchemy import event

    from shared.db import get_engine

    engine = get_engine(settings.database_url)
    seen: list[tuple[str, object]] = []

    def listen(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", listen)
    try:
        fn()
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    return seen


def explain(settings: Settings, statements: list[tuple[str, object]]) -> str:
    from shared.db import get_engine

    out = []
    raw = get_engine(settings.database_url).raw_connection()
    try:
        cur = raw.cursor()
        for sql, params in statements:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
            out.append(" ".join(sql.split()))
            out += ["    " + r[0] for r in cur.fetchall()]
        raw.rollback()
    finally:
        raw.close()
    return "\n".join(out)


def indexes(settings: Settings) -> str:
    from sqlalchemy import text

    from shared.db import get_engine

    with get_engine(settings.database_url).connect() as c:
        rows = c.execute(text(
            "SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY tablename, indexname"
        )).all()
    return "\n".join(f"  {t:<12} {d}" for t, d in rows)


def queries_to_time(settings: Settings, ids: dict[str, str]) -> list[tuple[str, Callable[[], object]]]:
    from orchestrator import queries

    inv, ev, tr = ids["invert"], ids["eval-translator"], ids["train-translator"]

    def last_page(label: str, job: str, n: int, after: str) -> list[tuple[str, Callable[[], object]]]:
        """The job's last page of 50 by offset, and the same page by keyset (``after`` = the key before it)."""
        offset = max(n - 50, 0)
        return [(f"results {label} --limit 50 --offset {offset}",
                 lambda: queries.results(settings, job, limit=50, offset=offset)),
                (f"results {label} --limit 50 --after KEY (the same last page, keyset)",
                 lambda: queries.results(settings, job, limit=50, after=after))]

    return [
        ("status INVERT", lambda: queries.job_status(settings, inv)),
        ("jobs", lambda: queries.list_jobs(settings)),
        ("jobs --kind invert", lambda: queries.list_jobs(settings, kind="invert")),
        ("results INVERT --limit 50", lambda: queries.results(settings, inv, limit=50)),
        *last_page("INVERT", inv, ids["pairs_inv"], ids["inv_last_page_after"]),
        ("results INVERT (all pairs)", lambda: queries.results(settings, inv)),
        ("results EVAL --limit 50", lambda: queries.results(settings, ev, limit=50)),
        *last_page("EVAL", ev, ids["pairs_eval"], ids["eval_last_page_after"]),
        ("results TRAIN (checkpoints)", lambda: queries.results(settings, tr)),
        ("metrics EVAL", lambda: queries.summary_metrics(settings, ev)),
        ("metrics TRAIN", lambda: queries.summary_metrics(settings, tr)),
        ("loss history TRAIN", lambda: queries.metric_history(settings, tr, "loss")),
    ]


def time_query(name: str, fn: Callable[[], object], runs: int) -> dict:
    """3 warm-up calls, then ``runs`` timed ones: median and p95 in ms."""
    for _ in range(3):
        result = fn()
    times = []
    for _ in range(runs):
        with Timer() as q:
            fn()
        times.append(q.s * 1e3)
    n = len(result) if isinstance(result, (list, dict)) else 1
    print(f"  {name:<42} p95 {p95(times):8.2f} ms", flush=True)
    return {"query": name, "rows": n, "median_ms": round(median(times), 2), "p95_ms": round(p95(times), 2),
            "under_50ms": p95(times) < 50}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="1.0 = 1M items and 10M metrics")
    p.add_argument("--quick", action="store_true", help="--scale 0.1")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of every statement and the indexes")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    scale = 0.1 if args.quick else args.scale
    header("db_scale")
    if not servers_available():
        print("# PostgreSQL not reachable: nothing to measure")
        return 0
    from sqlalchemy import text

    from shared.db import get_engine

    with pg_database("orch_bench_scale") as url:
        settings = Settings.from_env({"ORCH_DATABASE_URL": url, "ORCH_HOME": "/nonexistent-orch-bench"})
        with Timer() as t:
            counts = load(url, scale)
        print(f"# loaded in {t.s:.0f} s: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()), flush=True)
        with get_engine(url).connect() as c:
            ids = {k: c.execute(text("SELECT id FROM jobs WHERE kind = :k ORDER BY id LIMIT 1"), {"k": k}).scalar_one()
                   for k in ("invert", "eval-translator", "train-translator")}
            size = c.execute(text("SELECT pg_size_pretty(pg_database_size(current_database()))")).scalar_one()
        ids["pairs_inv"], ids["pairs_eval"] = max(int(10_000 * scale), 1), max(int(25_000 * scale), 1)
        # the key just before the last page of 50: what `--after` is given when paging from the previous page
        from orchestrator import queries

        ids["inv_last_page_after"] = queries.results(settings, ids["invert"], limit=1,
                                                     offset=max(ids["pairs_inv"] - 51, 0))[0]["pair_id"]
        ids["eval_last_page_after"] = queries.results(settings, ids["eval-translator"], limit=1,
                                                      offset=max(ids["pairs_eval"] - 51, 0))[0]["item"]
        print(f"# database size {size}")
        rows = [time_query(name, fn, args.runs) for name, fn in queries_to_time(settings, ids)]
        emit(f"CLI queries on {counts['items']:,} items and {counts['metrics']:,} metrics ({args.runs} runs each)",
             rows, json_path=args.json)
        if args.explain:
            print("\n== indexes\n" + indexes(settings))
            for name, fn in queries_to_time(settings, ids):
                print(f"\n== EXPLAIN ANALYZE: {name}")
                print(explain(settings, capture_sql(settings, fn)))
        # what the index added by migration 0003 buys: the metric queries again without it
        with get_engine(url).begin() as c:
            c.execute(text(f"DROP INDEX IF EXISTS {NEW_INDEX}"))
        before = [time_query(name, fn, args.runs) for name, fn in queries_to_time(settings, ids)
                  if name.startswith(("metrics", "loss", "results EVAL"))]
        emit(f"the metric queries WITHOUT {NEW_INDEX} (schema before migration 0003)", before, json_path=args.json)
        if args.explain:
            print(f"\n== EXPLAIN ANALYZE without {NEW_INDEX}: metrics EVAL")
            print(explain(settings, capture_sql(settings, dict(queries_to_time(settings, ids))["metrics EVAL"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
