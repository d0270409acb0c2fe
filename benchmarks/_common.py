"""What the benchmark scripts share: backends in throw-away places, server checks, timing and table printing.

Every benchmark creates its own state and removes it: the embedded default lives in a temporary folder; the server
backend uses a fresh PostgreSQL database (dropped at the end) and one Redis DB index (flushed before and after;
ORCH_BENCH_REDIS_DB, default 15, outside the 3..14 the test suite draws from).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# One BLAS/OpenMP thread per process before numpy/torch load: on a 2-core machine shared with worker processes more
# threads only thrash, and every column of a comparison must run under the same rule.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# Figures only on stdout: no download/progress bars from the model libraries.
for _var, _value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                     ("DIFFUSERS_VERBOSITY", "error")):
    os.environ.setdefault(_var, _value)

from shared.settings import Settings  # noqa: E402

PG_ADMIN_URL = os.environ.get("ORCH_BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ORCH_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("ORCH_BENCH_REDIS_DB", "15"))


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def servers_available() -> bool:
    """Redis and PostgreSQL reachable at the benchmark URLs."""
    from urllib.parse import urlsplit

    pg = urlsplit(PG_ADMIN_URL.replace("+psycopg2", ""))
    rd = urlsplit(REDIS_URL)
    return port_open(pg.hostname or "127.0.0.1", pg.port or 5432) and port_open(rd.hostname or "127.0.0.1",
                                                                              rd.port or 6379)


def machine() -> str:
    """One line naming the host: CPU count, Python, torch version (and GPU when there is one)."""
    line = f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}"
    if hasattr(os, "getloadavg"):  # other work on the machine: it shares the cores with the figures
        line += ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    try:
        import torch

        line += f", torch {torch.__version__}"
        if torch.cuda.is_available():
            line += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return line


@contextmanager
def pg_database(prefix: str = "orch_bench") -> Iterator[str]:
    """A fresh PostgreSQL database migrated to head; dropped (WITH FORCE) on exit. Yields its SQLAlchemy URL."""
    from shared.db import temporary_database

    with temporary_database(PG_ADMIN_URL, prefix) as url:
        yield url


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


@contextmanager
def backend(kind: str, lease_seconds: float = 60.0, keep: Path | None = None) -> Iterator[Settings]:
    """Settings of a throw-away backend: "embedded" (filesystem broker + SQLite in a temp folder) or "servers"
    (Redis DB REDIS_DB, flushed, + a fresh PostgreSQL database). ``keep`` (embedded only): use this folder
    instead and leave it behind, so that its checkpoints and samples can be used again (ORCH_HOME=keep/orch)."""
    with contextlib.ExitStack() as stack:
        tmp = str(keep) if keep else stack.enter_context(tempfile.TemporaryDirectory(prefix=f"orch-bench-{kind}-"))
        env = {"ORCH_HOME": str(Path(tmp) / "orch"), "ORCH_LEASE_SECONDS": str(lease_seconds),
               "ORCH_STORAGE": str(Path(tmp) / "artifacts")}
        if kind == "embedded":
            s = Settings.from_env(env)
            s.ensure_local_folders()
            yield s
            return
        if kind != "servers":
            raise ValueError(f"unknown backend {kind!r}: embedded or servers")
        broker = f"{REDIS_URL}/{REDIS_DB}"
        flush_redis(broker)
        with pg_database() as url:
            s = Settings.from_env({**env, "ORCH_BROKER_URL": broker, "ORCH_DATABASE_URL": url})
            s.ensure_local_folders()
            try:
                yield s
            finally:
                flush_redis(broker)


class Timer:
    """``with Timer() as t: ...`` then ``t.s`` (seconds, perf_counter)."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        self.s = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self.t0


def p95(values: Sequence[float]) -> float:
    """95th percentile (nearest rank) of ``values``."""
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, int(round(0.95 * len(xs) + 0.5)) - 1))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain monospaced table (numbers right-aligned), as the README records it."""
    if not rows:
        return "(no rows)"
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in cols]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for r in cells:
        out.append("  ".join(v.rjust(w) if num else v.ljust(w)
                             for v, w, num in zip(r, widths, numeric, strict=True)).rstrip())
    return "\n".join(out)


def emit(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
         json_path: str | None = None) -> None:
    """Print ``title`` and the table; append the rows as one JSON line to ``json_path`` when given."""
    print(f"\n== {title}")
    print(table(rows, columns), flush=True)
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps({"title": title, "rows": list(rows)}, default=str) + "\n")


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append `records` to the JSON list in `path` (created if missing): the benchmarks' results files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(old + list(records), indent=1))
    print(f"appended {len(records)} records to {path}")


def header(name: str) -> None:
    print(f"# {name} -- {machine()}")
    print(f"# command: {' '.join([Path(sys.executable).name, '-m', 'benchmarks.' + name, *sys.argv[1:]])}",
          flush=True)


# -- CPU accounting ------------------------------------------------------------------------------------------------------
# Wall time on a shared machine includes waiting for a core; CPU seconds (user + system) of the processes that do the
# work do not, so the figures carry both. Linux /proc only; elsewhere CPU figures are None.

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, int] | None:
    """(process group, utime + stime in ticks) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[2]), int(fields[11]) + int(fields[12])


def _pg_backend_pids(database_url: str) -> list[int]:
    from sqlalchemy import create_engine, text

    name = database_url.rsplit("/", 1)[-1]
    eng = create_engine(PG_ADMIN_URL)
    try:
        with eng.connect() as c:
            return [int(p) for p in c.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :d"),
                                              {"d": name}).scalars()]
    finally:
        eng.dispose()


class CpuMeter:
    """CPU seconds spent between ``start()`` and ``stop()`` by: this process, every process in the process groups
    ``pgids`` (worker processes and their pool children), and the PostgreSQL backends of ``database_url``."""

    def __init__(self, pgids: Sequence[int] = (), database_url: str | None = None):
        self.pgids = set(pgids)
        self.pg = database_url if database_url and database_url.startswith("postgresql") else None
        self.available = os.path.isdir("/proc/self")

    def _snapshot(self) -> dict[int, int]:
        ticks: dict[int, int] = {}
        if self.pgids:
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    st = _stat(int(entry))
                    if st is not None and st[0] in self.pgids:
                        ticks[int(entry)] = st[1]
        if self.pg:
            for pid in _pg_backend_pids(self.pg):
                st = _stat(pid)
                if st is not None:
                    ticks[pid] = st[1]
        return ticks

    def start(self) -> None:
        if self.available:
            self._before = self._snapshot()
        self._self0 = time.process_time()

    def stop(self) -> float | None:
        """CPU seconds used since ``start()`` (None without /proc)."""
        own = time.process_time() - self._self0
        if not self.available:
            return None
        after = self._snapshot()
        other = sum(t - self._before.get(pid, 0) for pid, t in after.items())
        return own + other / _TICK
