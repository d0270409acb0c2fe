"""The cluster scenarios (tests/cluster/scenarios.py) as tests: one namespaced cluster for the module, the
scenarios in order on it. Without root, network namespaces or the S3 server the module is skipped, unless CI is
set: then it fails, as the server tests do. ORCH_CLUSTER_TESTS=0 skips them outside CI (they take minutes)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.cluster.netns import NAME_PREFIX, sh
from tests.cluster.run import SCENARIOS, Session
from tests.conftest import CI

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def session(tmp_path_factory, tiny_sd):
    if os.environ.get("ORCH_CLUSTER_TESTS") == "0":
        # about 5 minutes of a 2-core machine (docs/cluster.md): a laptop may opt out; CI may not
        if CI:
            pytest.fail("ORCH_CLUSTER_TESTS=0 while CI is set: the cluster scenarios are part of CI")
        pytest.skip("cluster scenarios switched off by ORCH_CLUSTER_TESTS=0")
    root = tmp_path_factory.mktemp("cluster")
    try:
        s = Session(root, model=tiny_sd).__enter__()
    except Session.Unavailable as e:
        if CI:
            pytest.fail(f"the cluster harness cannot be set up, and CI is set: {e}")
        pytest.skip(f"the cluster harness cannot be set up here: {e}")
    prefix = s.h.fabric.prefix
    assert _io_thread_namespace() == os.stat("/proc/thread-self/ns/net").st_ino  # the harness's S3 client: ctl's
    yield s
    s.__exit__(None, None, None)
    # S3 requests leave from the host's namespace again (the later S3 tests of the session reach their servers)
    assert _io_thread_namespace() == os.stat("/proc/thread-self/ns/net").st_ino
    # everything the harness made is gone: namespaces and every process in them
    left = [ln for ln in sh("ip", "netns", "list", check=False).stdout.splitlines() if ln.startswith(prefix + "-")]
    assert not left, f"namespaces left behind: {left}"


def _io_thread_namespace() -> int:
    """The network namespace (inode) of the thread that makes this process's S3 requests (fsspec's IO loop)."""
    import asyncio

    from fsspec.asyn import get_loop

    async def where() -> int:
        return os.stat("/proc/thread-self/ns/net").st_ino

    return asyncio.run_coroutine_threadsafe(where(), get_loop()).result(timeout=10)


def _check(result) -> None:
    if result.skipped:
        pytest.skip(result.skipped)
    assert not result.failures(), result.report()
    assert result.lost == 0 and result.duplicated == 0, result.report()


def test_nodes_have_no_route_out(session) -> None:
    f = session.h.fabric
    for role, host in f.hosts.items():
        routes = f.routes(role)
        assert "default" not in routes and routes.strip().startswith(host.addr.rsplit(".", 1)[0] + ".0/24"), routes
    # the machine's own loopback servers are out of reach from a node (its loopback is its own)
    probe = "import socket; socket.create_connection(('127.0.0.1', 5432), timeout=1)"
    r = subprocess.run(f.hosts["w1"].exec("python3", "-c", probe), capture_output=True, timeout=30)
    assert r.returncode != 0
    # and the harness itself reaches the head node only over the bridge
    with socket.create_connection((session.h.head.host.addr, 6379), timeout=5):
        pass
    assert all(h.name.startswith(NAME_PREFIX + "-") for h in f.hosts.values())


def test_spread_over_three_nodes(session) -> None:
    _check(session.run("spread"))


def test_partition_longer_than_the_lease(session) -> None:
    _check(session.run("partition"))


def test_whole_node_loss(session) -> None:
    _check(session.run("node-loss"))


def test_latency_and_loss(session) -> None:
    _check(session.run("netem"))


def test_multinode_ddp_survives_a_node_kill(session) -> None:
    _check(session.run("ddp"))


def test_scenarios_are_registered() -> None:
    assert set(SCENARIOS) == {"spread", "partition", "node-loss", "netem", "ddp"}
