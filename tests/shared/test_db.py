"""The DB layer: pooled connections survive a server-side disconnect; upserts are idempotent."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, exc, func, select, text
from sqlalchemy.pool import NullPool

from shared import db
from shared.models import Metric


def _backend_pid(settings) -> int:
    with db.session_scope(settings) as s:
        return s.execute(text("SELECT pg_backend_pid()")).scalar_one()


def _kill(settings, pid: int) -> None:
    other = create_engine(settings.database_url, poolclass=NullPool)
    with other.begin() as c:
        assert c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar_one()
    other.dispose()


@pytest.fixture
def one_connection(servers):
    """The servers' engine with an empty pool: the tests below then see one pooled connection, the one they kill,
    and leave no dead connection behind for later tests (whose set-up does not retry)."""
    engine = db.get_engine(servers.database_url)
    engine.dispose()
    yield servers
    engine.dispose()


def test_an_idle_connection_killed_by_the_server_is_replaced_transparently(one_connection, monkeypatch):
    """A pooled connection idle for longer than PING_AFTER_IDLE_SECONDS is pinged at checkout; a dead one is
    replaced without the caller seeing an error (a restarted PostgreSQL, an idle timeout of a proxy)."""
    servers = one_connection
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.05)
    pid = _backend_pid(servers)
    assert _backend_pid(servers) == pid  # one pooled connection, handed out again
    _kill(servers, pid)
    time.sleep(0.1)
    assert _backend_pid(servers) != pid  # no error: the ping found it dead and the pool reconnected


def test_a_connection_killed_right_after_use_fails_once_then_reconnects(one_connection, monkeypatch):
    """Within the idle window the connection is handed out unpinged (no round trip on the hot path): its first
    statement fails as a disconnect, which callers retry as transient, and the next checkout is a fresh one."""
    servers = one_connection
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 3600)
    pid = _backend_pid(servers)
    _kill(servers, pid)
    with pytest.raises(exc.OperationalError) as e:
        _backend_pid(servers)
    assert e.value.connection_invalidated
    assert _backend_pid(servers) != pid


def test_upsert_inserts_then_updates_in_place(backend):
    from orchestrator import jobs
    from workers.recording import record_metrics

    job_id = jobs.create_job(backend, "bench", {}, 1)
    rows = [(n, float(i), -1, f"p{i}") for i in range(3) for n in ("a", "b")]
    for _ in range(2):  # a redelivered shard re-records the same keys
        with db.session_scope(backend) as s:
            record_metrics(s, job_id, rows, 0)
    with db.session_scope(backend) as s:
        record_metrics(s, job_id, [("a", 9.0, -1, "p1")], 0)
    with db.session_scope(backend) as s:
        n = s.execute(select(func.count()).select_from(Metric).where(Metric.job_id == job_id)).scalar_one()
        v = s.execute(select(Metric.value).where(Metric.job_id == job_id, Metric.name == "a",
                                                 Metric.item == "p1")).scalar_one()
    assert n == 6 and v == 9.0
