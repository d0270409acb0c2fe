"""Poison messages, wrong-task messages and a submission whose broker is down: nothing lost or duplicated, every
bad message refused and recorded, no worker exits, and a failed submission never runs on its own."""

from __future__ import annotations

import pytest

from tests.faults.conftest import assert_kept, run_case

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_poison_messages(bench):
    assert_kept(*run_case("poison", bench))


def test_wrong_task_messages(bench):
    assert_kept(*run_case("wrong_task", bench))


def test_submit_with_the_broker_down(bench):
    assert_kept(*run_case("submit_broker_down", bench))
