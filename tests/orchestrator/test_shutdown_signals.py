"""`orchestrator worker` ends within a bounded time on every stop signal, and loses no acknowledged work.

Cold (SIGQUIT, a second SIGINT) during a long batch: the worker and its pool children are gone within
COLD_SHUTDOWN_SECONDS plus a margin, without kill -9 from outside; the interrupted shard is not lost (its lease
expires and the reaper re-enqueues it). Warm (SIGTERM, a single SIGINT): the running shard finishes and is
recorded, then the worker exits (0 after SIGTERM, 1 after SIGINT, as Celery does).
"""

from __future__ import annotations

import signal
import time

import pytest

from orchestrator import jobs
from orchestrator.demo import local_workers
from orchestrator.submit import submitter
from shared.status import ShardState
from tests.faults.cluster import children_of, pid_alive
from tests.orchestrator.conftest import invert_args
from tests.orchestrator.test_cancel import _long_invert_args, _shard, _wait
from workers.celery_app import COLD_SHUTDOWN_SECONDS
from workers.reaper import reap

submit_invert = submitter("invert")

pytestmark = pytest.mark.slow

#: Margin over the watchdog for a loaded 2-core machine.
MARGIN_S = 30.0


def _exit_within(proc, seconds: float) -> int | None:
    try:
        return proc.wait(timeout=seconds)
    except Exception:
        return None


@pytest.mark.parametrize("signals", [("SIGQUIT",), ("SIGINT", "SIGINT")], ids=["sigquit", "sigint-twice"])
def test_cold_shutdown_ends_in_bounded_time(signals, fast_lease, tiny_sd, m3fd_small, tmp_path):
    s = fast_lease
    with local_workers(s, 1, "gpu,cpu", tmp_path / "logs") as (proc,):
        job_id = submit_invert(s, _long_invert_args(m3fd_small, tiny_sd))
        _wait(lambda: (_shard(s, job_id).progress or {}).get("done"), 400, "progress inside the batch")
        pool = children_of(proc.pid)
        assert pool, "the worker has no pool child"
        t0 = time.monotonic()
        for name in signals:
            proc.send_signal(getattr(signal, name))
            time.sleep(1.0)
        rc = _exit_within(proc, COLD_SHUTDOWN_SECONDS + MARGIN_S)
        took = time.monotonic() - t0
        assert rc is not None, f"the worker was still running {took:.0f} s after {'+'.join(signals)}"
        _wait(lambda: not any(pid_alive(p) for p in pool), 10, "the pool children to end")
    # nothing lost: the shard was cut short, not recorded; once its lease expires the reaper re-enqueues it
    time.sleep(s.lease_seconds + 1)
    reap(s)
    assert _shard(s, job_id).state in (ShardState.QUEUED, ShardState.PENDING)


# a single SIGINT (one Ctrl+C) is a warm shutdown too; Celery then exits with status 1 (interrupted), SIGTERM with 0
@pytest.mark.parametrize(("signals", "status"), [(("SIGTERM",), 0), (("SIGINT",), 1)], ids=["sigterm", "sigint"])
def test_warm_shutdown_finishes_the_shard(signals, status, fast_lease, tiny_sd, m3fd_small, tmp_path):
    s = fast_lease
    with local_workers(s, 1, "gpu,cpu", tmp_path / "logs") as (proc,):
        # one shard of ~20 short U-Net calls per batch: it finishes soon after the signal
        job_id = submit_invert(s, invert_args(m3fd_small, tiny_sd, shards=1, batch_size=4))
        _wait(lambda: _shard(s, job_id).state == ShardState.RUNNING, 400, "the shard to start")
        for name in signals:
            proc.send_signal(getattr(signal, name))
        rc = _exit_within(proc, 300)
    assert rc == status
    assert _shard(s, job_id).state == ShardState.DONE and jobs.get_job(s, job_id).state == "succeeded"
