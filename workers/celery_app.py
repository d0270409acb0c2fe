"""The Celery application: transport only. The results DB, not Celery, records what happened.

Settings and why (README.md "Design decisions", docs/background.md s.6):
- JSON only, for messages and accepted content: a message must never be able to run code (pickle is refused).
- acks_late + reject_on_worker_lost: a shard whose worker dies is redelivered; the DB lease makes that safe.
- prefetch multiplier 1: a busy worker does not hoard shards (a hidden backlog starves autoscalers).
- task events and sent events on, started tracking on: Flower sees every task by its readable name.
- no result backend: results live in the DB; Celery results would be a second, weaker record.
- visibility_timeout (Redis) is set long (2 h) but is not what prevents double execution: the lease is.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

import kinds
from shared import constants as C
from shared.logs import quiet_third_party
from shared.settings import Settings
from workers.ml.weights import force_weights_only

# every torch.load in a worker and its torchrun children is weights-only, third-party loaders included
force_weights_only()

quiet_third_party()  # before kombu connects and any worker opens the DB


def make_app(settings: Settings | None = None, sent_events: bool = True, set_as_current: bool = True) -> Celery:
    """The Celery app for ``settings``. ``sent_events=False``: publishes no task-sent event per message (bulk
    submissions, workers/dispatch.py, which also keeps that app from becoming Celery's current app)."""
    settings = settings or Settings.from_env()
    broker_options: dict = {}
    transport = None
    if settings.embedded_broker:
        # atomic writes and takes, adaptive polling (workers/fs_transport.py); the URL stays filesystem://
        transport = "workers.fs_transport:Transport"
        settings.ensure_local_folders()
        folder = settings.broker_folder
        broker_options = {
            "data_folder_in": str(folder / "in"),
            "data_folder_out": str(folder / "in"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": C.FILESYSTEM_POLL_SECONDS,
        }
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        broker_options = {"visibility_timeout": 2 * 3600}

    app = Celery("orchestrator", broker=settings.broker_url, set_as_current=set_as_current)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        # task events batched on a 50 ms timer (workers/consumer.py): one PUBLISH per interval, not per event
        worker_consumer="workers.consumer:Consumer",
        task_send_sent_event=sent_events,
        task_track_started=True,
        task_ignore_result=True,
        broker_transport=transport,
        broker_transport_options=broker_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # seconds to wait for a dead pool child's result before requeueing its message (default 10): there is no
        # result backend to wait for, so requeue quickly
        worker_lost_wait=2.0,
        task_default_queue=C.QUEUE_CPU,
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in C.QUEUES],
        task_routes={**kinds.task_routes(), C.TASK_REAP: {"queue": C.QUEUE_CPU}},
        imports=("workers.tasks",),
    )
    return app


app = make_app()


#: Seconds between touches of ORCH_HEARTBEAT_FILE (deploy/ health checks allow 2 min for readiness, 5 for liveness).
HEARTBEAT_FILE_SECONDS = 30.0


def _install_heartbeat_step(app: Celery) -> None:
    """A worker bootstep: the main process touches ORCH_HEARTBEAT_FILE from its event loop.

    Container health checks read the file's age instead of calling `celery inspect ping`: a probe must not start a
    Python process that imports torch every period, and a broker outage must not make every busy GPU pod fail its
    liveness probe and be restarted mid-shard. With the prefork pool a long task never blocks this loop.
    """
    import os
    import pathlib

    from celery import bootsteps

    class _Step(bootsteps.StartStopStep):
        requires = {"celery.worker.components:Timer"}

        def __init__(self, worker, **kwargs):
            self.path = os.environ.get("ORCH_HEARTBEAT_FILE")
            self.tref = None

        def _touch(self):
            p = pathlib.Path(self.path)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()

        def start(self, worker):
            if self.path:
                self._touch()
                self.tref = worker.timer.call_repeatedly(HEARTBEAT_FILE_SECONDS, self._touch)

        def stop(self, worker):
            if self.tref is not None:
                self.tref.cancel()

    app.steps["worker"].add(_Step)


_install_heartbeat_step(app)


#: Seconds a cold shutdown (SIGQUIT, a second Ctrl+C) may take before the worker kills its pool children and exits.
COLD_SHUTDOWN_SECONDS = 10.0


def _kill_pool_children_and_exit(exitcode: int) -> None:
    """SIGKILL this process's children (the pool) and leave at once, without the pool teardown that can hang.

    Nothing acknowledged is lost: a shard's results are committed before its message is acked, and a shard cut
    short keeps its lease, which expires so that the reaper (or the redelivered message) runs it again.
    """
    import os
    import pathlib
    import signal as sig

    me = os.getpid()
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == me:
                os.kill(int(stat.parent.name), sig.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue
    os._exit(exitcode)


def _arm_cold_watchdog(exitcode: int = 1) -> None:
    import threading

    if getattr(_arm_cold_watchdog, "armed", False):
        return
    _arm_cold_watchdog.armed = True  # type: ignore[attr-defined]
    t = threading.Timer(COLD_SHUTDOWN_SECONDS, _kill_pool_children_and_exit, args=(exitcode,))
    t.daemon = True
    t.start()


def _on_shutting_down(sender=None, sig=None, how=None, exitcode=None, **_kw) -> None:
    """Bound every cold shutdown: billiard's pool teardown can wait for ever on a lock a dying child held.

    A cold shutdown (SIGQUIT) arms the watchdog at once. After a warm one (SIGTERM, the first Ctrl+C) the running
    shard may finish, however long it takes; but Celery has by then made SIGINT and SIGQUIT hard/cold handlers,
    and a second signal arms the watchdog too.
    """
    import signal

    if how == "Cold":
        _arm_cold_watchdog(int(exitcode or 1))
        return
    for s in (signal.SIGINT, signal.SIGQUIT):
        prev = signal.getsignal(s)

        def chained(signum, frame, prev=prev):
            _arm_cold_watchdog(1)
            if callable(prev):
                prev(signum, frame)

        signal.signal(s, chained)


def _install_shutdown_watchdog() -> None:
    from celery.signals import worker_shutting_down

    worker_shutting_down.connect(_on_shutting_down, weak=False)


_install_shutdown_watchdog()
