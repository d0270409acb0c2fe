"""Queue lengths and DB gauges in the Prometheus text format: `orchestrator queue-length` and `orchestrator exporter`.

Flower's /metrics counts events (tasks seen, runtimes, workers online) but not messages waiting in the broker, which
is what an autoscaler needs. The numbers here are read straight from the broker:
- Redis: kombu keeps a queue's waiting messages in a list named after the queue, plus one list per non-zero priority
  step named `{queue}\\x06\\x16{step}` (kombu.transport.redis `Channel._q_for_pri`); a queue's length is the sum of
  their LLENs, exactly what kombu's own `_size` computes. Messages delivered to a worker but not yet acknowledged
  (running or prefetched, with acks_late) sit in the hash `unacked` ({delivery tag: [message, exchange, routing key]})
  with their delivery time in the sorted set `unacked_index`: counted per queue, with the age of the oldest. A worker
  killed mid-shard leaves its message there until the visibility timeout; the reaper has long republished the shard
  by then (docs/hardening.md), so an old entry is a stale copy waiting to be restored and skipped.
- the embedded filesystem broker: one file `{time}_{uuid}.{queue}.msg` per waiting message in the broker's `in`
  folder (kombu.transport.filesystem).
- any other kombu transport (e.g. AMQP): a passive queue declaration's message count.
The results DB adds jobs by state and unfinished shards by state. A source that fails sets
`orch_scrape_error{source=...}` to 1 instead of failing the whole scrape.

prometheus_client builds the families and writes the text format; the HTTP server is the standard library's (GET
/metrics, text format 0.0.4, and GET /healthz, which prometheus_client's own server lacks), so a scrape reads the
broker and the DB once, under a lock, instead of once per registered metric.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from shared import constants as C
from shared.errors import UserError
from shared.settings import Settings, mask_url
from shared.status import JobState, ShardState

log = logging.getLogger(__name__)

#: Default port of `orchestrator exporter` (deploy/ scrapes it there).
DEFAULT_PORT = 9808
#: Prometheus text exposition format served on /metrics.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Shard states counted by `orch_shards` (finished shards only grow and say nothing about load).
UNFINISHED = (ShardState.PENDING, ShardState.QUEUED, ShardState.RUNNING)


@dataclass
class Snapshot:
    """One reading of every gauge; None where a source could not be read."""

    queues: dict[str, int] | None = None
    unacked: int | None = None
    #: Redis only: {queue: (unacked messages, seconds since the oldest was delivered)}.
    unacked_by_queue: dict[str, tuple[int, float]] | None = None
    jobs: dict[str, int] | None = None
    shards: dict[str, int] | None = None
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


# -- broker: the readers live with the broker code (workers/queues.py) ---------------------------------------------

from workers.queues import (  # noqa: E402  (re-exported: the exporter's and the CLI's public names)
    filesystem_queue_lengths,
    kombu_queue_lengths,
    queue_lengths,
    redis_client_url,
    redis_queue_lengths,
    redis_unacked_by_queue,
)

__all__ = ["filesystem_queue_lengths", "kombu_queue_lengths", "queue_lengths", "redis_client_url",
           "redis_queue_lengths", "redis_unacked_by_queue"]


# -- DB ---------------------------------------------------------------------------------------------------------------


def db_gauges(settings: Settings) -> tuple[dict[str, int], dict[str, int]]:
    """({job state: jobs}, {unfinished shard state: shards}), zero-filled so every series always exists."""
    from shared.store import store

    jobs, shards = store(settings).state_counts([st.value for st in UNFINISHED])
    return ({st.value: int(jobs.get(st.value, 0)) for st in JobState},
            {st.value: int(shards.get(st.value, 0)) for st in UNFINISHED})


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0].rstrip('.') if text else ''}"


def collect(settings: Settings, queues: Sequence[str] = C.QUEUES, db: bool = True) -> Snapshot:
    """Read every source once; a failing source leaves its gauges out and records its error."""
    t0 = time.perf_counter()
    snap = Snapshot()
    try:
        snap.queues, snap.unacked = queue_lengths(settings, queues)
        if snap.unacked is not None:
            from workers.dispatch import get_app

            opts = dict(get_app(settings).conf.broker_transport_options or {})
            snap.unacked_by_queue = redis_unacked_by_queue(settings.broker_url, queues, opts)
    except Exception as e:
        snap.errors["broker"] = _one_line(e)
    if db:
        try:
            snap.jobs, snap.shards = db_gauges(settings)
        except Exception as e:
            snap.errors["db"] = _one_line(e)
    snap.seconds = time.perf_counter() - t0
    return snap


# -- text format: prometheus_client's families and exposition ------------------------------------------------------


def _gauges(snap: Snapshot, db: bool = True) -> list[Any]:
    """The snapshot as prometheus_client gauge families (every series of a family always present)."""
    from prometheus_client.core import GaugeMetricFamily

    def family(name: str, help_: str, labels: list[str], samples: list[tuple[list[str], float]]) -> Any:
        fam = GaugeMetricFamily(name, help_, labels=labels)
        for values, value in samples:
            fam.add_metric(values, value)
        return fam

    out = []
    if snap.queues is not None:
        out.append(family("orch_queue_length", "Messages waiting in a broker queue (not yet delivered to a worker).",
                          ["queue"], [([q], n) for q, n in snap.queues.items()]))
    if snap.unacked is not None:
        out.append(family("orch_broker_unacked_messages",
                          "Messages delivered to workers and not yet acknowledged (running or prefetched shards).",
                          [], [([], snap.unacked)]))
    if snap.unacked_by_queue is not None:
        out.append(family("orch_queue_unacked",
                          "Messages of a queue delivered and not yet acknowledged; those of killed workers stay until "
                          "the visibility timeout.", ["queue"],
                          [([q], n) for q, (n, _age) in snap.unacked_by_queue.items()]))
        out.append(family("orch_queue_unacked_oldest_seconds",
                          "Seconds since the oldest unacknowledged message of a queue was delivered (0: none).",
                          ["queue"], [([q], round(age, 3)) for q, (_n, age) in snap.unacked_by_queue.items()]))
    if snap.jobs is not None:
        out.append(family("orch_jobs", "Jobs in the results database by state.", ["state"],
                          [([st], n) for st, n in snap.jobs.items()]))
    if snap.shards is not None:
        out.append(family("orch_shards", "Unfinished shards in the results database by state.", ["state"],
                          [([st], n) for st, n in snap.shards.items()]))
    sources = ["broker", "db"] if db else ["broker"]
    out.append(family("orch_scrape_error", "1 when a source could not be read during this scrape.", ["source"],
                      [([src], 1 if src in snap.errors else 0) for src in sources]))
    out.append(family("orch_scrape_duration_seconds", "Seconds this scrape took.", [], [([], round(snap.seconds, 6))]))
    return out


class _Reading:
    """A prometheus_client collector of one snapshot (the exporter reads its sources once per scrape)."""

    def __init__(self, snap: Snapshot, db: bool) -> None:
        self.snap, self.db = snap, db

    def collect(self):
        yield from _gauges(self.snap, self.db)


def render_prometheus(snap: Snapshot, db: bool = True) -> str:
    """The snapshot in the Prometheus text exposition format (version 0.0.4), written by prometheus_client."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reading(snap, db))
    return generate_latest(registry).decode()


# -- HTTP -------------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server_version = "orch-exporter"
    settings: Settings
    lock: threading.Lock
    db: bool = True

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            with self.lock:  # concurrent scrapes share one reading at a time instead of piling up on the broker
                snap = collect(self.settings, db=self.db)
            for src, err in snap.errors.items():
                log.warning("exporter: %s unreadable: %s", src, err)
            self._send(200, render_prometheus(snap, db=self.db), CONTENT_TYPE)
        elif path in ("/healthz", "/healthcheck"):
            self._send(200, "ok\n", "text/plain; charset=utf-8")
        elif path == "/":
            self._send(200, '<html><body><a href="/metrics">metrics</a></body></html>\n', "text/html; charset=utf-8")
        else:
            self._send(404, "not found\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: str, ctype: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("exporter: " + fmt, *args)


def make_server(settings: Settings, port: int = DEFAULT_PORT, address: str = "", db: bool = True) -> ThreadingHTTPServer:
    """A bound (not yet serving) exporter; port 0 picks a free port (see `server.server_address`)."""
    handler = type("Handler", (_Handler,), {"settings": settings, "lock": threading.Lock(), "db": db})
    try:
        server = ThreadingHTTPServer((address, port), handler)
    except OSError as e:
        raise UserError(f"exporter cannot listen on {address or '*'}:{port}: {e.strerror}: choose another --port") from e
    server.daemon_threads = True
    return server


def serve(settings: Settings, port: int = DEFAULT_PORT, address: str = "", db: bool = True) -> int:
    """Serve /metrics until SIGINT/SIGTERM."""
    import signal

    server = make_server(settings, port, address, db)
    host, bound = server.server_address[:2]
    print(f"exporter on http://{host or '0.0.0.0'}:{bound}/metrics (broker {mask_url(settings.broker_url)})",
          flush=True)

    def _stop(signum, frame):  # SIGTERM from Docker/Kubernetes: stop like SIGINT
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def queue_lengths_or_error(settings: Settings, queues: Sequence[str] = C.QUEUES) -> dict[str, int]:
    """`queue_lengths` for the CLI: a broker that cannot be read is one clear line."""
    try:
        return queue_lengths(settings, queues)[0]
    except Exception as e:
        raise UserError(f"cannot read queue lengths from broker {mask_url(settings.broker_url)}: {_one_line(e)}: "
                        "check that it is running and ORCH_BROKER_URL") from e
