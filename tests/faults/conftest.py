"""Fixtures of the fault suite: inputs and fault-free references made once per session, a fork server of warm
worker nodes, and one bench per backend (the embedded default; Redis + PostgreSQL, skipped without them unless CI
is set, through tests/conftest.py's `pg_database`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest

from shared.settings import Settings
from tests.conftest import REDIS_URL, embedded_settings
from tests.faults.bench import KNOWN_BUGS, Bench, Outcome, Skip, short_lease
from tests.faults.cluster import start_zygote
from tests.faults.state import References, make_inputs


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: fault-injection cases with real worker nodes (tests/faults)")


@pytest.fixture(scope="session")
def fault_inputs(tmp_path_factory, tiny_sd):
    return make_inputs(tmp_path_factory.mktemp("fault-inputs"), model=tiny_sd)


@pytest.fixture(scope="session")
def fault_refs(fault_inputs, tmp_path_factory):
    refs = References(fault_inputs, tmp_path_factory.mktemp("fault-refs"))
    refs.prefetch()  # in the background, while the first cases wait on leases
    yield refs
    refs.close()


@pytest.fixture(scope="session")
def zygote(tmp_path_factory):
    z = start_zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@pytest.fixture(scope="session")
def embedded_bench(fault_inputs, fault_refs, zygote, tmp_path_factory) -> Bench:
    root = tmp_path_factory.mktemp("faults-embedded")
    s = embedded_settings(root / "orch")
    s.ensure_local_folders()
    return Bench("embedded", short_lease(s), fault_inputs, fault_refs, root / "cases", zygote)


@pytest.fixture(scope="session")
def servers_bench(pg_database, fault_inputs, fault_refs, zygote, tmp_path_factory) -> Bench:
    """Redis (a DB index of the shared server, emptied before each case) + the session's PostgreSQL database."""
    root = tmp_path_factory.mktemp("faults-servers")
    index = int(os.environ.get("ORCH_TEST_REDIS_DB", str(3 + uuid.uuid4().int % 12)))
    s = Settings.from_env({"ORCH_HOME": str(root / "orch"), "ORCH_BROKER_URL": f"{REDIS_URL}/{index}",
                           "ORCH_DATABASE_URL": pg_database, "ORCH_STORAGE": str(root / "artifacts")})
    s.ensure_local_folders()
    yield Bench("servers", short_lease(s), fault_inputs, fault_refs, root / "cases", zygote)
    import redis

    redis.Redis.from_url(s.broker_url).flushdb()  # leave the shared server's DB index empty


@pytest.fixture(params=["servers", "embedded"])
def bench(request) -> Bench:
    return request.getfixturevalue(f"{request.param}_bench")


def run_case(case: Callable[..., list[Outcome]], bench: Bench) -> list[Outcome]:
    """Run the fault case `case` (a function marked with tests/faults/bench.py fault_case) on `bench`, with its
    arguments there, as `python -m tests.faults.summary` runs it."""
    try:
        return case.fault_case.run(bench)
    except Skip as e:
        pytest.skip(str(e))


def known_bug(title: str):
    """xfail(strict=True) with the reason recorded for the outcome `title` in tests/faults/bench.py KNOWN_BUGS."""
    return pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[title])


def assert_kept(outcome: Outcome) -> None:
    """Every check of the case held: nothing lost, nothing recorded twice, the fault-free end state, and the
    case's own assertions."""
    assert not outcome.failures(), outcome.report()
