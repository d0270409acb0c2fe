"""kill -9 of a pool child (20 times in one job on Redis + PostgreSQL), of a whole node mid-shard, and of a whole
node mid-training (Redis + PostgreSQL; tests/orchestrator/test_train_e2e.py kills one on the embedded default)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import assert_kept, run_case

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_kill9_pool_children_mid_shard(bench):
    (out,) = run_case("kill_children", bench)
    assert_kept(out)


def test_kill9_whole_node_mid_shard(bench):
    (out,) = run_case("kill_node", bench)
    assert_kept(out)


def test_kill9_whole_node_mid_training(servers_bench):
    (out,) = run_case("kill_training", servers_bench)
    assert_kept(out)
