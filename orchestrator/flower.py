"""`orchestrator flower`: Flower against the configured broker, with shard progress and no result backend.

What Flower shows and why:
- Tasks by their readable names (`invert.shard`, `train.run`, ...) with kwargs `{'job_id': ..., 'shard_index': ...}`
  (messages carry nothing else), their worker, runtime and result: the dict `run_shard` returns (pairs, seconds,
  device, ...), which the worker's `task-succeeded` event carries without any result backend.
- Progress while a task runs: `ShardContext.progress` sends a custom `task-progress` event. Celery's event state
  (celery/events/state.py, `Task.event`) turns an unknown `task-*` event into a custom state named after it
  (`PROGRESS`) and merges the event's fields into the task; ours are `result` (a one-line summary: done/total,
  epoch, loss, rate) and `progress` (the numbers). A stock Flower shows the state and the summary; the Flower started
  here also lists `progress` among the task's fields (REST API and task page) and ignores a progress event that
  arrives after the task ended, so it can never overwrite the final result.
- The REST API stays closed without credentials: Flower refuses API calls unless basic auth (or OAuth) is on or
  FLOWER_UNAUTHENTICATED_API is true, and this command only lets that variable through with --unauthenticated-api.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from shared.errors import UserError
from shared.settings import Settings

log = logging.getLogger(__name__)

#: Columns of Flower's tasks page: kwargs hold the job id and shard index, result the summary or progress.
TASK_COLUMNS = "name,uuid,state,kwargs,result,received,started,runtime,worker"
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


def run_flower(settings: Settings, port: int = 5555, address: str = "", basic_auth: str | None = None,
               unauthenticated_api: bool = False, url_prefix: str | None = None, extra: Sequence[str] = ()) -> int:
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
    if not (basic_auth or os.environ.get("FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_AUTH")):
        log.warning("Flower runs without authentication: its REST API answers 401 unless --basic-auth is given")
    install_progress_state()
    app = make_app(settings)
    code = app.start(flower_argv(port, address, basic_auth, url_prefix, extra))
    return int(code or 0)
