"""Redis restarted mid-job, PostgreSQL unavailable for several seconds mid-job or while a node starts (servers
only: the embedded default has no server to lose)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import assert_kept, run_case
from tests.faults.infra import PrivateRedis

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _need_redis_server():
    if not PrivateRedis.available():
        pytest.skip("redis-server is not installed: the case restarts a private one")


def test_redis_restart_mid_job(servers_bench):
    _need_redis_server()
    (out,) = run_case("redis_restart", servers_bench)
    assert_kept(out)


def test_redis_restart_without_persistence_loses_nothing(servers_bench):
    _need_redis_server()
    (out,) = run_case("redis_volatile", servers_bench)
    assert_kept(out)


def test_postgres_unavailable_mid_job(servers_bench):
    (out,) = run_case("postgres_outage", servers_bench)
    assert_kept(out)


def test_reaper_runs_on_a_node_started_while_postgres_was_down(servers_bench):
    (out,) = run_case("reaper_start", servers_bench)
    assert_kept(out)
