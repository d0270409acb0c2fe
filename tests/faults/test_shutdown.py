"""SIGTERM warm shutdown during a shard (what Kubernetes does on scale-down)."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.faults import cluster as cl
from tests.faults.bench import (
    Bench,
    Outcome,
    attempts_of,
    conclude,
    fault_case,
    submit,
    wait_job,
    wait_running_on,
)
from tests.faults.conftest import assert_kept, run_case
from tests.faults.state import SMALL

pytestmark = [pytest.mark.slow, pytest.mark.faults]


# on servers the signalled node is the real `orchestrator worker` command, started cold
@fault_case("sigterm", servers={"cold": True}, embedded={"cold": False})
def warm_shutdown(bench: Bench, cold: bool = True) -> list[Outcome]:
    """SIGTERM to a node while it runs a shard: the shard finishes and is recorded by that node, the node exits 0,
    the other node does the rest; nothing runs twice. With `cold`, that node is the real `orchestrator worker`
    command (which execs Celery, so the signal reaches Celery itself); its first shard then includes importing
    torch and diffusers, so it lasts a while."""
    plan, s, t0 = SMALL, bench.fresh("sigterm"), time.monotonic()
    with bench.cluster(s, "sigterm") as cluster:
        (a,) = cluster.start(1, warm=not cold)
        cluster.start(1)
        job_id = submit(s, bench, plan)
        with cl.Watch(s, job_id) as watch:
            r = wait_running_on(s, job_id, cluster, a, timeout=180)
            a.warm_shutdown()
            try:
                rc = a.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                rc = None
            wait_job(s, job_id)
        log_a = a.text()
    attempts = attempts_of(s, job_id)
    checks = {
        "the node exited 0 after its shard": rc == 0,
        "the node logged a warm shutdown": "Warm shutdown" in log_a,
        "the interrupted shard was finished by the same owner": watch.owners.get(r.index) == [r.owner],
        "no shard ran twice": all(n == 1 for n in attempts.values()),
    }
    notes = [f"SIGTERM to {a.name} while shard {r.index} ran in pid {r.pid}; exit status {rc}"]
    return [conclude(bench, s, "SIGTERM warm shutdown mid-shard", plan, job_id, 1, t0, checks, notes)]


def test_sigterm_finishes_the_running_shard_and_exits_0(bench):
    (out,) = run_case(warm_shutdown, bench)
    assert_kept(out)
