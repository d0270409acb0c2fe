"""SIGTERM warm shutdown during a shard (what Kubernetes does on scale-down)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import assert_kept, run_case

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_sigterm_finishes_the_running_shard_and_exits_0(bench):
    (out,) = run_case("sigterm", bench)
    assert_kept(out)
