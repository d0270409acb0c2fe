"""A bare Celery app for the comparison columns of ``benchmarks/overhead.py``: the same kernel, no results DB.

Its broker and result backend come from ORCH_BENCH_RAW_BROKER / ORCH_BENCH_RAW_BACKEND (Redis, or kombu's stock
filesystem transport with Celery's file:// result backend). Delivery settings match the system's (JSON, acks_late,
prefetch 1), so the difference between a raw group and a job is the exactly-once bookkeeping, not the guarantees.
Started as ``celery -A benchmarks.raw_celery worker -Q rawbench``.
"""

from __future__ import annotations

import os

from celery import Celery

from workers.tasks.bench import KERNEL_REPEATS, KERNEL_SIZE, kernel

QUEUE = "rawbench"
TASK = "rawbench.kernel"


def task_name(broker: str) -> str:
    """The kernel task's name on ``broker`` (one per transport, so the driver's two apps never share a name)."""
    return f"{TASK}.{broker.split('://', 1)[0]}"


def make_raw_app(broker: str, backend: str, folder: str | None = None) -> Celery:
    """A Celery app on ``broker`` with results in ``backend``; ``folder`` holds the filesystem transport's files."""
    options: dict = {}
    if broker.startswith("filesystem://"):
        assert folder, "the filesystem transport needs a folder"
        for sub in ("in", "processed", "control"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        # kombu's defaults except the folders: polling_interval stays at its stock 1 s
        options = {"data_folder_in": f"{folder}/in", "data_folder_out": f"{folder}/in",
                   "processed_folder": f"{folder}/processed", "control_folder": f"{folder}/control",
                   "store_processed": False}
    app = Celery("rawbench", broker=broker, backend=backend)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"], task_acks_late=True,
        worker_prefetch_multiplier=1, broker_transport_options=options, task_default_queue=QUEUE,
        worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
    )

    # shared=False: Celery's default adds a decorated task to every app created later in the process (the
    # system's own app among them, when a test or driver builds this one first)
    @app.task(name=task_name(broker), shared=False)
    def raw_kernel(seed: int, size: int = KERNEL_SIZE, repeats: int = KERNEL_REPEATS) -> float:
        return kernel(seed, size, repeats)

    return app


def __getattr__(name: str) -> Celery:
    """``celery -A benchmarks.raw_celery`` asks for ``app``: built on first use, so importing this module (the
    driver does) registers nothing."""
    if name != "app":
        raise AttributeError(name)
    global app
    app = make_raw_app(
        os.environ.get("ORCH_BENCH_RAW_BROKER", "redis://127.0.0.1:6379/15"),
        os.environ.get("ORCH_BENCH_RAW_BACKEND", "redis://127.0.0.1:6379/15"),
        os.environ.get("ORCH_BENCH_RAW_FOLDER") or None,
    )
    return app
