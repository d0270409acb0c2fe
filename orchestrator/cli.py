"""The `orchestrator` command line. Bad input -> one line `error: ...` on stderr and exit status 2, before any row."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import kinds
from orchestrator.cli_submit import add_submit_parsers
from shared import constants as C
from shared.errors import UserError
from shared.settings import Settings, mask_url


def _print(obj: Any) -> None:
    print(obj, flush=True)


def _dumps(obj: Any) -> str:
    from orchestrator.output import dumps

    return dumps(obj)


# -- submit -----------------------------------------------------------------------------------------------------------

def cmd_submit(args, settings: Settings) -> int:
    from orchestrator.submit import submit

    job_id = submit(settings, args.kind, args)
    if args.json and not args.wait:
        from orchestrator.output import dumps

        _print(dumps({"job_id": job_id}))
    elif not args.json:
        _print(job_id)
    if args.wait:
        return _wait_and_report(settings, job_id, args.json)
    return C.EXIT_OK


def _wait_and_report(settings: Settings, job_id: str, as_json: bool, timeout: float | None = None) -> int:
    from orchestrator import jobs, queries
    from orchestrator.output import dumps

    job = jobs.wait(settings, job_id, timeout=timeout)
    if as_json:
        st = queries.job_status(settings, job_id)
        st.pop("spec", None)
        st["metrics"] = queries.summary_metrics(settings, job_id)
        _print(dumps(st))
    else:
        _print(f"{job.id}: {job.state} ({job.shards_done}/{job.shards_total} shards)")
        if job.error:
            _print(f"error: {job.error.splitlines()[0]}")
    return C.EXIT_OK if job.state == "succeeded" else C.EXIT_JOB_FAILED


# -- read side --------------------------------------------------------------------------------------------------------

def cmd_status(args, settings: Settings) -> int:
    from orchestrator import queries
    from orchestrator.output import dumps

    st = queries.job_status(settings, args.job)
    if args.json:
        _print(dumps(st))
        return C.EXIT_OK
    _print(f"job      {st['job_id']}  ({st['kind']})")
    _print(f"state    {st['state']}")
    _print(f"shards   {st['shards_done']}/{st['shards_total']} done, {st['shards_failed']} failed  "
           + " ".join(f"{k}={v}" for k, v in sorted(st["shards_by_state"].items())))
    _print(f"created  {st['created_at']}   finished {st['finished_at'] or '-'}")
    if st["running"]:
        import time

        from orchestrator.watch import RateTracker, describe_running, snapshot

        view, rates = snapshot(settings, args.job), RateTracker()  # rate and ETA exactly as `watch` has them
        for sh in view.running[:50]:
            rate = rates.rate(sh, time.monotonic(), view.training)
            _print(f"  shard {sh.index:>4} on {sh.worker or '?'}: {describe_running(view, sh, rate)}")
    if st["error"]:
        _print(f"error    {st['error'].splitlines()[0]}")
    return C.EXIT_OK


def cmd_jobs(args, settings: Settings) -> int:
    from orchestrator import queries
    from orchestrator.output import dumps, table

    rows = queries.list_jobs(settings, args.kind, args.state, args.limit)
    if args.json:
        _print(dumps(rows))
    else:
        for r in rows:
            r["shards"] = f"{r['shards_done']}/{r['shards_total']}"
            r["created"] = (r["created_at"] or "")[:19].replace("T", " ")
        _print(table(rows, ["job_id", "kind", "state", "shards", "created"]))
    return C.EXIT_OK


def cmd_results(args, settings: Settings) -> int:
    from orchestrator import queries
    from orchestrator.output import dumps, table, write_csv

    rows = queries.results(settings, args.job, limit=args.limit, offset=args.offset, after=args.after)
    if args.json or args.format == "json":
        _print(dumps(rows))
    elif args.format == "csv":
        write_csv(rows)
    else:
        cols = None
        if rows and "pair_id" in rows[0]:
            cols = ["pair_id", "split", "shard", "position", "artifact"]
        _print(table(rows, cols))
    return C.EXIT_OK


def cmd_metrics(args, settings: Settings) -> int:
    from orchestrator import queries
    from orchestrator.output import dumps, fmt

    m = queries.summary_metrics(settings, args.job)
    if args.json:
        _print(dumps(m))
    else:
        for k, v in m.items():
            _print(f"{k:<28} {fmt(v)}")
    return C.EXIT_OK


def cmd_cancel(args, settings: Settings) -> int:
    from orchestrator import jobs

    state = jobs.cancel(settings, args.job)
    _print(_dumps({"job_id": args.job, "state": state}) if args.json else f"{args.job}: {state}")
    return C.EXIT_OK


def cmd_resume(args, settings: Settings) -> int:
    from orchestrator import jobs

    n = jobs.resume(settings, args.job)
    _print(_dumps({"job_id": args.job, "enqueued": n}) if args.json else
           f"{args.job}: re-enqueued {n} unfinished shard(s)")
    return C.EXIT_OK


def cmd_retry(args, settings: Settings) -> int:
    from orchestrator import jobs

    if not args.failed:
        raise UserError("say which shards to retry: `orchestrator retry JOB --failed`")
    n = jobs.resume(settings, args.job, failed_only=True)
    _print(_dumps({"job_id": args.job, "enqueued": n}) if args.json else f"{args.job}: re-enqueued {n} failed shard(s)")
    return C.EXIT_OK


def cmd_reap(args, settings: Settings) -> int:
    from workers.reaper import reap

    reaped = reap(settings, stale_queued_seconds=args.stale_after)
    _print(f"re-enqueued {len(reaped)} shard(s)")
    return C.EXIT_OK


def cmd_db(args, settings: Settings) -> int:
    from shared import db

    if args.action == "upgrade":
        db.upgrade(settings.database_url)
        _print(f"database at revision {db.current_revision(settings.database_url)}: {mask_url(settings.database_url)}")
    else:
        _print(mask_url(settings.database_url))
    return C.EXIT_OK


def cmd_fixtures(args, settings: Settings) -> int:
    from pathlib import Path

    out = Path(args.out)
    if args.what == "m3fd":
        from workers.fixtures.m3fd import write_synthetic

        ids = write_synthetic(out, args.pairs, width=args.width, height=args.height, seed=args.seed)
        _print(f"wrote {len(ids)} synthetic pairs in the flat M3FD layout to {out}")
    elif args.what == "tiny-sd":
        from workers.fixtures.tiny_sd import write_tiny_sd

        _print(f"wrote a tiny randomly initialised SD model to {write_tiny_sd(out, seed=args.seed)}")
    else:
        from workers.fixtures.mnist import write_fixture

        _print(f"wrote MNIST IDX files (real digits) to {write_fixture(out)}")
    return C.EXIT_OK


def cmd_worker(args, settings: Settings) -> int:
    from orchestrator.worker import run_workers

    return run_workers(args.queues, gpus=args.gpus, concurrency=args.concurrency, processes=args.processes,
                       hostname=args.hostname, loglevel=args.loglevel, pool=args.pool,
                       max_memory_per_child=args.max_memory_per_child, max_tasks_per_child=args.max_tasks_per_child)


def cmd_demo(args, settings: Settings) -> int:
    from orchestrator.demo import run_demo

    return run_demo(settings, workers=args.workers, pairs=args.pairs, shards=args.shards, full=not args.invert_only)


#: Modules that add their own subcommands: each has `add_parsers(sub)` and a `COMMANDS` dict {name: fn(args, settings)}.
EXTENSIONS = ("orchestrator.monitor_cli",)


def _extensions():
    import importlib

    return [importlib.import_module(m) for m in EXTENSIONS]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other error) and still exits with status 2."""

    def error(self, message: str):
        self.exit(C.EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from orchestrator.cli_common import add_global_options, show_defaults

    p = _Parser(prog="orchestrator", description="Distributed generative-modelling jobs: submit, watch, query.")
    add_global_options(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_submit_parsers(sub)

    s = sub.add_parser("status", help="one job's state, shard counts and running shards")
    s.add_argument("job")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("jobs", help="list jobs, newest first")
    s.add_argument("--kind", choices=kinds.names())
    s.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("results", help="a job's results: pairs, checkpoints, per-item metrics or artifacts")
    s.add_argument("job")
    s.add_argument("--format", choices=["table", "json", "csv"], default="table")
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("--after", default=None, metavar="KEY",
                   help="start after this pair id / item (keyset paging: fast at any depth; the last key of a page)")
    s.add_argument("--json", action="store_true", help="same as --format json")

    s = sub.add_parser("metrics", help="a job's summary metrics as {name: value}")
    s.add_argument("job")
    s.add_argument("--json", action="store_true")

    for name, what in (("cancel", "cancel a job (running training saves a checkpoint first)"),
                       ("resume", "re-enqueue only the unfinished shards of a job"),
                       ("retry", "re-enqueue the failed shards of a job")):
        s = sub.add_parser(name, help=what)
        s.add_argument("job")
        s.add_argument("--json", action="store_true")
        if name == "retry":
            s.add_argument("--failed", action="store_true")

    s = sub.add_parser("reap", help="re-enqueue shards with expired leases and jobs orphaned before publishing")
    s.add_argument("--stale-after", type=float, default=30.0, help="seconds a job may stay queued unpublished")

    s = sub.add_parser("db", help="database: run migrations, or print the (masked) URL")
    s.add_argument("action", choices=["upgrade", "url"])

    s = sub.add_parser("fixtures", help="write test data and tiny models")
    fx = s.add_subparsers(dest="what", required=True)
    f = fx.add_parser("m3fd", help="synthetic pairs in the flat M3FD layout (IR a fixed function of the scene)")
    f.add_argument("--out", required=True)
    f.add_argument("--pairs", type=int, default=32)
    f.add_argument("--width", type=int, default=128)
    f.add_argument("--height", type=int, default=96)
    f.add_argument("--seed", type=int, default=0)
    f = fx.add_parser("tiny-sd", help="a tiny randomly initialised model of the real SD classes")
    f.add_argument("--out", required=True)
    f.add_argument("--seed", type=int, default=0)
    f = fx.add_parser("mnist", help="MNIST IDX files made from the real embedded digits")
    f.add_argument("--out", required=True)

    s = sub.add_parser("worker", help="start Celery worker processes (one per GPU)")
    s.add_argument("--queues", default=None,
                   help="comma-separated: gpu, train, cpu (default: all three without --gpus, gpu,cpu with --gpus)")
    s.add_argument("--gpus", default=None, help="GPU indices (0,1) or 'all'; omitted: CPU")
    s.add_argument("--processes", type=int, default=1, help="CPU only: number of worker processes")
    s.add_argument("--concurrency", type=int, default=1, help="pool processes per worker (keep 1 per GPU)")
    s.add_argument("--pool", choices=["prefork", "solo", "threads"], default="prefork")
    s.add_argument("--hostname", default=None, help="Celery node name, e.g. gpu-a@%%h")
    s.add_argument("--loglevel", default="INFO")
    s.add_argument("--max-memory-per-child", type=int, default=None, help="KiB; recycle a pool child above it")
    s.add_argument("--max-tasks-per-child", type=int, default=None)

    s = sub.add_parser("demo", help="run the main job end to end on the embedded default")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--pairs", type=int, default=32)
    s.add_argument("--shards", type=int, default=16)
    s.add_argument("--invert-only", action="store_true", help="run only the main invert job")
    for ext in _extensions():
        ext.add_parsers(sub)
    show_defaults(p)
    return p


COMMANDS = {
    "submit": cmd_submit, "status": cmd_status, "jobs": cmd_jobs, "results": cmd_results, "metrics": cmd_metrics,
    "cancel": cmd_cancel, "reap": cmd_reap, "resume": cmd_resume, "retry": cmd_retry, "db": cmd_db, "fixtures": cmd_fixtures,
    "worker": cmd_worker, "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (status 2) and --help (status 0)
        return int(e.code or 0)
    from orchestrator.cli_common import broken_pipe, missing_worker_package
    from shared.logs import setup

    setup(args.log_level)
    try:
        from orchestrator.limits import checked_settings

        settings = checked_settings(args)  # numbers in range and a usable configuration, before anything else
        commands = dict(COMMANDS)
        for ext in _extensions():
            commands.update(ext.COMMANDS)
        return commands[args.command](args, settings)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return C.EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        return missing_worker_package(e, args.command)
    except BrokenPipeError:
        return broken_pipe()
    except Exception as e:  # a database configuration error is one line too; anything else keeps its traceback
        from orchestrator.limits import database_error

        if (line := database_error(e)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return C.EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
