"""Redis restarted mid-job, PostgreSQL unavailable for several seconds mid-job or while a node starts (servers
only: the embedded default has no server to lose)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from sqlalchemy import update

from shared.db import session_scope
from shared.models import Shard
from shared.status import ShardState
from tests.faults import cluster as cl
from tests.faults.bench import JOB_TIMEOUT, Bench, Outcome, conclude, fault_case, shards_in, submit, wait_job
from tests.faults.conftest import assert_kept, run_case
from tests.faults.infra import PrivateRedis, TcpProxy
from tests.faults.state import SMALL, create_unpublished

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _need_redis_server():
    if not PrivateRedis.available():
        pytest.skip("redis-server is not installed: the case restarts a private one")


@fault_case("redis_restart", backends=("servers",))
def redis_restart(bench: Bench, down: float = 3.0, persistent: bool = True, timeout: float = JOB_TIMEOUT,
                  ) -> list[Outcome]:
    """A private Redis is stopped (SIGTERM) and started again mid-job. `persistent`: with AOF, as deploy/ runs it,
    so queued messages survive; without, they are lost with the restart and only the DB knows those shards."""
    plan, t0 = SMALL, time.monotonic()
    server = PrivateRedis(bench.folder("redis" if persistent else "redis-volatile"), appendonly=persistent)
    server.start()
    try:
        s = replace(bench.fresh("redis"), broker_url=server.url)
        with bench.cluster(s, "redis" if persistent else "redis-volatile") as cluster:
            cluster.start(2)
            job_id = submit(s, bench, plan)
            cl.wait_for(lambda: shards_in(s, job_id, "done") >= 2 and cl.running_shards(s, job_id), 120, 0.02,
                        "two shards done and one running")
            queued = shards_in(s, job_id, "queued")
            server.restart(down)
            wait_job(s, job_id, timeout)
    finally:
        server.stop()
    case = "Redis restarted mid-job" + ("" if persistent else " (no persistence)")
    return [conclude(bench, s, case, plan, job_id, 1, t0,
                     notes=[f"Redis down {down:.0f} s with {queued} shard(s) queued"])]


def test_redis_restart_mid_job(servers_bench):
    _need_redis_server()
    (out,) = run_case(redis_restart, servers_bench)
    assert_kept(out)


@fault_case("redis_volatile", backends=("servers",), servers={"timeout": 15.0})
def redis_restart_volatile(bench: Bench, timeout: float = JOB_TIMEOUT) -> list[Outcome]:
    """`redis_restart` without AOF: the queued messages are lost with the restart."""
    return redis_restart(bench, persistent=False, timeout=timeout)


def test_redis_restart_without_persistence_loses_nothing(servers_bench):
    _need_redis_server()
    (out,) = run_case(redis_restart_volatile, servers_bench)
    assert_kept(out)


@fault_case("postgres_outage", backends=("servers",))
def postgres_outage(bench: Bench, down: float = 5.0) -> list[Outcome]:
    """The workers reach PostgreSQL through a proxy that is cut for `down` s mid-job (open connections dropped,
    new ones refused): heartbeats fail and leases age, DB errors in tasks retry with backoff."""
    plan, s, t0 = SMALL, bench.fresh("postgres"), time.monotonic()
    proxy = TcpProxy(_host_port(s.database_url))
    proxy.start()
    try:
        with bench.cluster(s, "pg", env={"ORCH_DATABASE_URL": proxy.url_for(s.database_url)}) \
                as cluster:
            cluster.start(2)
            job_id = submit(s, bench, plan)
            cl.wait_for(lambda: shards_in(s, job_id, "done") >= 2 and cl.running_shards(s, job_id), 120, 0.02,
                        "two shards done and one running")
            proxy.cut()
            time.sleep(down)
            proxy.restore()
            wait_job(s, job_id)
            logs = cluster.logs()
    finally:
        proxy.close()
    retried = logs.count("will retry") + logs.count(" retry: ")
    checks = {"the workers saw the outage (DB errors retried)": retried > 0 or "heartbeat failed" in logs}
    return [conclude(bench, s, f"PostgreSQL unavailable {down:.0f} s", plan, job_id, 1, t0, checks,
                     [f"{retried} retry log lines"])]


def test_postgres_unavailable_mid_job(servers_bench):
    (out,) = run_case(postgres_outage, servers_bench)
    assert_kept(out)


@fault_case("reaper_start", backends=("servers",), servers={"timeout": 15.0})
def reaper_after_db_down_at_start(bench: Bench, timeout: float = 30.0) -> list[Outcome]:
    """PostgreSQL is unreachable while a node starts (as when workers and the database start together), then
    comes back. The node works, but must also reap: a shard left `running` under a dead owner whose lease expired
    (forced in the DB here, as a node killed earlier leaves it) must be re-enqueued and finished."""
    from datetime import timedelta

    from workers import bookkeeping as bk
    from workers.dispatch import enqueue_shards

    plan, s, t0 = SMALL, bench.fresh("reaper-start"), time.monotonic()
    proxy = TcpProxy(_host_port(s.database_url))
    proxy.start()
    proxy.cut()
    try:
        with bench.cluster(s, "reaper-start", env={"ORCH_DATABASE_URL": proxy.url_for(s.database_url)}) as cluster:
            (node,) = cluster.start(1)
            proxy.restore()
            job_id = create_unpublished(s, bench.inputs, plan)
            with session_scope(s) as ss:  # shard 0: claimed by a node that died; its lease expired
                ss.execute(update(Shard).where(Shard.job_id == job_id, Shard.index == 0).values(
                    state=ShardState.RUNNING.value, attempts=1, lease_owner="gone:1:dead",
                    lease_expires_at=bk.utcnow() - timedelta(seconds=1)))
            enqueue_shards(s, job_id, list(range(1, plan.shards)))
            wait_job(s, job_id, timeout)
            handler_failed = "_on_worker_ready" in node.text() and "raised" in node.text()
    finally:
        proxy.close()
    notes = ["the node's worker_ready handler raised, so it runs no reaper thread"] if handler_failed else []
    return [conclude(bench, s, "reaper after DB down at node start", plan, job_id, 1, t0, notes=notes)]


def test_reaper_runs_on_a_node_started_while_postgres_was_down(servers_bench):
    (out,) = run_case(reaper_after_db_down_at_start, servers_bench)
    assert_kept(out)


def _host_port(url: str) -> tuple[str, int]:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return u.host or "127.0.0.1", int(u.port or 5432)
