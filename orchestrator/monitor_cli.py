"""Monitoring subcommands (Flower, watch, report, queue lengths): registered into the CLI by `orchestrator.cli`."""

from __future__ import annotations

import argparse

from shared import constants as C
from shared.settings import Settings


def cmd_flower(args, settings: Settings) -> int:
    """`orchestrator flower`: runs until SIGTERM/SIGINT."""
    from orchestrator.flower import run_flower

    return run_flower(settings, port=args.port, address=args.address, basic_auth=args.basic_auth,
                      unauthenticated_api=args.unauthenticated_api, url_prefix=args.url_prefix,
                      insecure_public=args.insecure_public)


def cmd_watch(args, settings: Settings) -> int:
    """`orchestrator watch JOB`: exit 0 if the job succeeded, 1 otherwise."""
    from orchestrator.watch import watch

    return watch(settings, args.job, interval=args.interval, timeout=args.timeout, as_json=args.json)


def cmd_report(args, settings: Settings) -> int:
    """`orchestrator report JOB`: writes the page and prints its path."""
    from orchestrator.output import dumps
    from orchestrator.report import write_report

    path = write_report(settings, args.job, args.out, examples=args.examples, decode=not args.no_decode)
    if args.json:
        print(dumps({"job_id": args.job, "report": str(path.resolve()), "bytes": path.stat().st_size}), flush=True)
    else:
        print(path, flush=True)
    return C.EXIT_OK


def cmd_queue_length(args, settings: Settings) -> int:
    """`orchestrator queue-length`: waiting messages per queue."""
    from orchestrator.exporter import queue_lengths_or_error
    from orchestrator.output import dumps, table

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in queues if q not in C.QUEUES]
    if unknown:
        from shared.errors import UserError

        raise UserError(f"unknown queue {', '.join(unknown)}: use {', '.join(C.QUEUES)}")
    lengths = queue_lengths_or_error(settings, queues)
    if args.json:
        print(dumps(lengths), flush=True)
    elif len(queues) == 1:
        print(lengths[queues[0]], flush=True)  # one queue asked for: the bare number, for scripts
    else:
        print(table([{"queue": q, "waiting": n} for q, n in lengths.items()], ["queue", "waiting"]), flush=True)
    return C.EXIT_OK


def cmd_exporter(args, settings: Settings) -> int:
    """`orchestrator exporter`: serve /metrics, or print one scrape with --once."""
    from orchestrator.exporter import collect, render_prometheus, serve

    if args.once:
        print(render_prometheus(collect(settings, db=not args.no_db), db=not args.no_db), end="", flush=True)
        return C.EXIT_OK
    return serve(settings, port=args.port, address=args.address, db=not args.no_db)


COMMANDS = {"flower": cmd_flower, "watch": cmd_watch, "report": cmd_report, "queue-length": cmd_queue_length,
            "exporter": cmd_exporter}


def _positive(v: str) -> float:
    x = float(v)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {v})")
    return x


def add_parsers(sub) -> None:
    """Add this module's subcommands to the `orchestrator` parser."""
    p = sub.add_parser("flower", help="start Flower (live workers and tasks) against the configured broker")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--address", default=None,
                   help="interface to listen on (default: all with --basic-auth, else 127.0.0.1 only)")
    p.add_argument("--insecure-public", action="store_true",
                   help="allow listening on a public interface without authentication")
    p.add_argument("--basic-auth", default=None, metavar="USER:PASS",
                   help="require HTTP basic auth for the UI and API (several: a,b); FLOWER_BASIC_AUTH also works")
    p.add_argument("--unauthenticated-api", action="store_true",
                   help="serve the REST API without credentials (off: the API answers 401 without auth)")
    p.add_argument("--url-prefix", default=None, help="serve under this path, behind a reverse proxy")

    p = sub.add_parser("watch", help="live progress of a job until it ends (plain lines when not a terminal)")
    p.add_argument("job")
    p.add_argument("--interval", type=_positive, default=1.0, help="seconds between DB reads")
    p.add_argument("--timeout", type=_positive, default=None, help="give up after this many seconds (exit 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per change (JSON Lines)")

    p = sub.add_parser("report", help="a self-contained HTML report of a job (timings, metrics, pictures)")
    p.add_argument("job")
    p.add_argument("--out", default=None, help="output file (default: report-JOB.html)")
    p.add_argument("--examples", type=int, default=4, help="example pairs shown for invert jobs")
    p.add_argument("--no-decode", action="store_true", help="invert: leave out the VAE decodes the workers made")
    p.add_argument("--json", action="store_true", help='print {"report": path, "bytes": n}')

    p = sub.add_parser("queue-length", help="messages waiting in the broker queues (what autoscalers act on)")
    p.add_argument("--queues", default=",".join(C.QUEUES), help="comma-separated; one queue prints a bare number")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("exporter", help="Prometheus exporter of queue lengths and job/shard gauges")
    p.add_argument("--port", type=int, default=9808)
    p.add_argument("--address", default="", help="interface to listen on (default: all)")
    p.add_argument("--no-db", action="store_true", help="broker queue lengths only (no results-DB gauges)")
    p.add_argument("--once", action="store_true", help="print one scrape to stdout and exit")
