"""`orchestrator flower`: Flower against the configured broker, with shard progress and no result backend.

What Flower shows and why:
- Tasks by their readable names (`invert.shard`, `train.run`, ...) with kwargs `{'job_id': ..., 'shard_index': ...}`
  (messages carry nothing else), their worker, runtime and result: the dict `run_shard` returns (pairs, seconds,
  device, ...), which the worker's `task-succeeded` event carries without any result backend. The pages show them
  compactly (`shard 3 of invert-...`, `pairs=5 seconds=1.25 ...`, see `format_task`); the REST API keeps raw values.
- Progress while a task runs: `ShardContext.progress` sends a custom `task-progress` event. Celery's event state
  (celery/events/state.py, `Task.event`) turns an unknown `task-*` event into a custom state named after it
  (`PROGRESS`) and merges the event's fields into the task; ours are `result` (a one-line summary: done/total,
  epoch, loss, rate) and `progress` (the numbers). A stock Flower shows the state and the summary; the Flower started
  here also lists `progress` among the task's fields (REST API and task page) and ignores a progress event that
  arrives after the task ended, so it can never overwrite the final result.
- With the embedded filesystem broker, kombu cannot auto-delete Flower's event queue: its binding would outlive
  Flower and every later worker event would pile up as a file. The binding and its files are removed when Flower
  stops.
- Without credentials Flower listens on 127.0.0.1 only, and says so: its pages show every task's arguments and
  worker. Serving other hosts needs --basic-auth (or FLOWER_BASIC_AUTH / FLOWER_AUTH), or an explicit
  --insecure-public.
- The REST API stays closed without credentials: Flower refuses API calls unless basic auth (or OAuth) is on or
  FLOWER_UNAUTHENTICATED_API is true, and this command only lets that variable through with --unauthenticated-api.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.errors import UserError
from shared.settings import Settings

log = logging.getLogger(__name__)

#: Columns of Flower's tasks page: kwargs hold the job id and shard index, result the summary or progress.
TASK_COLUMNS = "name,state,kwargs,worker,runtime,result,received,started,uuid"
#: The custom state a `task-progress` event gives a running task.
PROGRESS_STATE = "PROGRESS"
#: Flower's switch for serving its REST API without credentials.
UNAUTHENTICATED_API_ENV = "FLOWER_UNAUTHENTICATED_API"


def check_basic_auth(value: str) -> str:
    """Validate `user:password[,user2:password2]` (Flower's --basic-auth) and return it unchanged."""
    for cred in value.split(","):
        user, sep, password = cred.partition(":")
        if not sep or not user or not password:
            raise UserError("--basic-auth must be user:password (several separated by commas), both non-empty")
    return value


#: Where Flower listens when no credentials protect it.
LOOPBACK = "127.0.0.1"


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or "" (all interfaces)


def listen_address(address: str | None, authenticated: bool, insecure_public: bool = False) -> str:
    """The interface Flower listens on: anything with credentials (default: all interfaces), loopback without
    them unless --insecure-public says otherwise. UserError for a public address with neither."""
    if authenticated or insecure_public:
        return address or ""
    if address is None:
        return LOOPBACK
    if not _is_loopback(address):
        where = f"--address {address}" if address else "all interfaces"
        raise UserError(f"Flower without authentication may not listen on {where}: pass --basic-auth USER:PASS "
                        "(or set FLOWER_BASIC_AUTH), or --insecure-public to serve it openly anyway")
    return address


def flower_argv(port: int, address: str = "", basic_auth: str | None = None, url_prefix: str | None = None,
                extra: Sequence[str] = ()) -> list[str]:
    """The argv of `celery flower` for these options (Flower's own names; --tasks_columns shows kwargs and result)."""
    argv = ["flower", f"--port={int(port)}", f"--tasks_columns={TASK_COLUMNS}"]
    if address:
        argv.append(f"--address={address}")
    if basic_auth:
        argv.append(f"--basic_auth={check_basic_auth(basic_auth)}")
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix}")
    return argv + list(extra)


def _literal(value):
    try:
        return ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def format_task(task):
    """Flower's display hook (tasks page, task page); the REST API keeps the raw values.

    kwargs `{'job_id': J, 'shard_index': i}` read `shard i of J` (the shard first, so a narrow column still shows
    it), and a finished shard's result dict reads `pairs=5 seconds=1.25 ...` without the job and shard it repeats.
    """
    kw = _literal(task.kwargs)
    if isinstance(kw, dict) and {"job_id", "shard_index"} <= kw.keys():
        task.kwargs = f"shard {kw['shard_index']} of {kw['job_id']}"
        result = _literal(task.result) if task.state == "SUCCESS" else None
        if isinstance(result, dict) and result.get("job_id") == kw["job_id"]:
            task.result = " ".join(f"{k}={v}" for k, v in result.items() if k not in ("job_id", "shard"))
    return task


def install_progress_state() -> None:
    """Make Flower's event state keep a task's `progress` field and drop progress events that arrive late.

    Flower serialises tasks with `Task.as_dict()` (the fields listed in `Task._fields`), and its task page lists the
    same fields: adding `progress` there exposes the numbers on /api/task/info/<id> and /api/tasks. A progress event
    sent by the pool process can reach Flower after the `task-succeeded` event sent by the worker's main process;
    Celery would then merge its `result` summary over the real result, so such events are ignored.
    """
    from celery import states
    from celery.events.state import Task
    from flower.events import EventsState

    if getattr(EventsState.Task, "shows_progress", False):
        return

    class ProgressTask(Task):
        """A Celery event-state task that also shows its latest `progress` numbers."""

        shows_progress = True
        progress = None
        _fields = (*Task._fields, "progress")

        def event(self, type_, timestamp=None, local_received=None, fields=None, **kwargs):
            if type_ == PROGRESS_STATE.lower() and self.state in states.READY_STATES:
                return None
            return super().event(type_, timestamp, local_received, fields, **kwargs)

    EventsState.Task = ProgressTask


def _event_table(settings: Settings) -> Path:
    return settings.broker_folder / "control" / "celeryev.exchange"


def event_queues(settings: Settings) -> set[str]:
    """Queues bound to the `celeryev` exchange of the embedded filesystem broker (empty for other brokers)."""
    if not settings.embedded_broker:
        return set()
    try:
        return {row[2] for row in json.loads(_event_table(settings).read_text() or "[]")}
    except (OSError, ValueError, IndexError, TypeError):
        return set()


def unbind_event_queues(settings: Settings, queues: set[str]) -> None:
    """Remove `queues` from the filesystem broker's `celeryev` exchange table and delete their waiting messages.

    The table is a JSON list of [routing key, pattern, queue] that kombu rewrites under an exclusive lock; the same
    lock is taken here so a worker publishing at that moment never reads half a file.
    """
    import fcntl

    if not queues or not settings.embedded_broker:
        return
    try:
        with open(_event_table(settings), "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                table = json.loads(f.read() or b"[]")
                keep = [row for row in table if row[2] not in queues]
                f.seek(0)
                f.truncate()
                f.write(json.dumps(keep).encode())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    except FileNotFoundError:
        pass
    folder = settings.broker_folder / "in"
    for q in queues:
        for p in folder.glob(f"*.{q}.msg"):
            p.unlink(missing_ok=True)


def run_flower(settings: Settings, port: int = 5555, address: str | None = None, basic_auth: str | None = None,
               unauthenticated_api: bool = False, url_prefix: str | None = None, extra: Sequence[str] = (),
               insecure_public: bool = False) -> int:
    """Run Flower in this process until SIGTERM/SIGINT; returns the exit status.

    Other Flower options can still come from its FLOWER_* environment variables (e.g. FLOWER_BASIC_AUTH,
    FLOWER_PERSISTENT, FLOWER_PURGE_OFFLINE_WORKERS), which Flower reads itself.
    """
    from workers.celery_app import make_app

    if unauthenticated_api:
        os.environ[UNAUTHENTICATED_API_ENV] = "true"
    elif os.environ.get(UNAUTHENTICATED_API_ENV, "").strip().lower() in ("1", "true", "yes", "on", "y", "t"):
        log.warning("%s ignored: pass --unauthenticated-api to serve the REST API without credentials",
                    UNAUTHENTICATED_API_ENV)
        os.environ.pop(UNAUTHENTICATED_API_ENV)
    authenticated = bool(basic_auth or os.environ.get("FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_AUTH"))
    address = listen_address(address, authenticated, insecure_public)
    if not authenticated:
        if _is_loopback(address):
            note = f"listening on {address} only; pass --basic-auth USER:PASS to serve other hosts"
        else:
            note = f"listening on {address or 'all interfaces'} OPENLY (--insecure-public)"
        print(f"Flower runs without authentication (its REST API answers 401), {note}", file=sys.stderr, flush=True)
    install_progress_state()
    from flower.options import options as flower_options

    flower_options.format_task = format_task
    app = make_app(settings)
    before = event_queues(settings)
    try:
        code = app.start(flower_argv(port, address, basic_auth, url_prefix, extra))
    finally:
        unbind_event_queues(settings, event_queues(settings) - before)
    return int(code or 0)
