"""The same message delivered twice at once to two nodes, and a shard outliving Redis' visibility timeout: the
lease allows one execution."""

from __future__ import annotations

import pytest

from tests.faults.conftest import assert_kept, run_case

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_same_message_twice_runs_once(bench):
    (out,) = run_case("duplicate", bench)
    assert_kept(out)


def test_shard_outliving_visibility_timeout_runs_once(servers_bench):
    (out,) = run_case("visibility", servers_bench)
    assert_kept(out)
