"""Engine, sessions and migrations of the results database.

One engine per (process, URL). SQLite (the embedded default) is shared by several local processes: WAL journal, a busy
timeout, and `BEGIN IMMEDIATE` for every transaction so two writers never deadlock on a lock upgrade. PostgreSQL needs
nothing special. Migrations are Alembic's; the embedded SQLite DB is upgraded automatically on first use.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.settings import Settings

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}
_sessions: dict[tuple[int, str], sessionmaker] = {}
_upgraded: set[str] = set()


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
    _ping_when_idle(engine)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no cover - exercised by every sqlite test
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # pragma: no cover
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


#: A pooled connection idle for longer than this is pinged (SELECT 1) before it is handed out.
PING_AFTER_IDLE_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Pessimistic disconnect handling, minus the round trip on the hot path.

    ``pool_pre_ping`` pings on every checkout: two extra round trips per shard (claim and completion), ~0.6 ms of a
    worker's CPU (benchmarks/README.md). A connection that went back to the pool less than a second ago is handed
    out as is; one idle for longer (across a database restart, a failover, an idle-timeout of a proxy) is pinged,
    and a dead one is replaced transparently (DisconnectionError makes the pool retry with a fresh connection). A
    connection that dies within that second fails its statement; SQLAlchemy sees a disconnect, invalidates the pool,
    and the caller's retry of transient DB errors (workers/runner.py, workers/bookkeeping.py) gets a fresh one.
    """
    from sqlalchemy import exc

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn, record):
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn, record, _proxy):
        last = record.info.get("checked_in")
        if last is not None and time.monotonic() - last < PING_AFTER_IDLE_SECONDS:
            return
        try:
            cur = dbapi_conn.cursor()
            try:
                cur.execute("SELECT 1")
                cur.fetchall()
            finally:
                cur.close()
        except Exception as e:  # the driver's own error types: psycopg2, sqlite3, ...
            raise exc.DisconnectionError(f"stale pooled connection: {e}") from e


def get_engine(url: str) -> Engine:
    key = (os.getpid(), url)  # engines are not fork-safe: one per process
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            if url.startswith("sqlite"):
                path = url.split("///", 1)[-1]
                if path and path != ":memory:":
                    try:
                        Path(path).parent.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        from shared.errors import UserError

                        raise UserError(f"cannot create the folder of the SQLite database {path}: {e.strerror}: "
                                        "set ORCH_DATABASE_URL (or ORCH_HOME) to a writable place") from e
                engine = _sqlite_engine(url)
            else:
                engine = create_engine(url, pool_size=5, max_overflow=10)
                _ping_when_idle(engine)
            _engines[key] = engine
            _sessions[key] = sessionmaker(bind=engine, expire_on_commit=False)
        return engine


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Run the migrations up to `revision` (idempotent)."""
    from alembic import command

    get_engine(url)  # creates the folder of a SQLite file
    if url.startswith("sqlite") and url.split("///", 1)[-1] not in ("", ":memory:"):
        # several local worker processes start together on a new SQLite file: one migrates, the others wait
        # for it and then find the schema at head (Alembic re-checks the revision inside the lock)
        import fcntl

        with open(url.split("///", 1)[-1] + ".migrate.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            command.upgrade(alembic_config(url), revision)
    else:
        command.upgrade(alembic_config(url), revision)
    _upgraded.add(url)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@functools.cache
def head_revision() -> str:
    """The newest migration's revision id, read from the scripts' `revision` / `down_revision` lines (no Alembic
    import: a CLI query on an up-to-date database should not pay for it)."""
    import re

    revs, downs = set(), set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        text = path.read_text()
        rev = re.search(r"^revision\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        down = re.search(r"^down_revision\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        if rev:
            revs.add(rev.group(1))
        if down:
            downs.add(down.group(1))
    heads = revs - downs
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads ({sorted(heads)}): merge them")
    return heads.pop()


def _at_head(url: str) -> bool:
    """Whether the database already records the newest migration (False on any doubt: Alembic then decides)."""
    from sqlalchemy import text

    try:
        with get_engine(url).connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
    except Exception:
        return False


def ensure_schema(settings: Settings) -> None:
    """Upgrade the embedded SQLite DB on first use; a server DB must be upgraded explicitly (`orchestrator db upgrade`).

    An embedded database already at the newest revision is recognised with one query, without loading Alembic."""
    url = settings.database_url
    if url in _upgraded:
        return
    if settings.is_sqlite and _at_head(url):
        _upgraded.add(url)
        return
    if settings.is_sqlite:
        try:
            upgrade(url)
        except OSError as e:  # the migration lock file next to the database cannot be created
            from shared.errors import UserError

            raise UserError(f"cannot write next to the SQLite database {url}: {e.strerror}: set ORCH_DATABASE_URL "
                            "(or ORCH_HOME) to a writable place") from e
        return
    if not inspect(get_engine(url)).has_table("jobs"):
        from shared.errors import UserError

        raise UserError("the results database has no tables: run `orchestrator db upgrade` first")
    _upgraded.add(url)


@contextmanager
def transaction(settings_or_url: Settings | str) -> Iterator[Connection]:
    """A Core connection in a transaction that commits on success and rolls back on error: for hot paths that run
    prebuilt statements and need no ORM session (the claims of shared/store_leases.py)."""
    url = settings_or_url if isinstance(settings_or_url, str) else settings_or_url.database_url
    with get_engine(url).begin() as conn:
        yield conn


def session_factory(url: str) -> sessionmaker:
    """This process's session factory for `url`, bound to its engine (`get_engine`)."""
    get_engine(url)
    return _sessions[(os.getpid(), url)]


@contextmanager
def session_scope(settings_or_url: Settings | str) -> Iterator[Session]:
    """A session that commits on success, rolls back on error, and always closes."""
    url = settings_or_url if isinstance(settings_or_url, str) else settings_or_url.database_url
    with scoped(session_factory(url)) as session:
        yield session


@contextmanager
def scoped(factory: Callable[[], Session]) -> Iterator[Session]:
    """A session from ``factory`` that commits on success, rolls back on error, and always closes."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def upsert(
    session: Session,
    model,
    rows: Sequence[dict[str, Any]],
    key: Sequence[str],
    update: Sequence[str] | None = None,
) -> None:
    """INSERT ... ON CONFLICT (key) DO UPDATE/NOTHING, for SQLite and PostgreSQL alike.

    This is how a redelivered shard re-records its results without duplicating rows.
    """
    if not rows:
        return
    conn = session.connection()
    stmt = _upsert_statement(conn.dialect.name, model, tuple(key), tuple(update or ()))
    # chunk to stay under bind-parameter limits (SQLite 32k, PG 65k); Core executemany (insertmanyvalues), not the
    # ORM's bulk path, which costs ~1 ms more per call for the single-row upserts of the hot path
    ncols = max(len(rows[0]), 1)
    chunk = max(1, 30000 // ncols)
    for i in range(0, len(rows), chunk):
        conn.execute(stmt, list(rows[i : i + chunk]))


@functools.lru_cache(maxsize=64)
def _upsert_statement(dialect: str, model, key: tuple[str, ...], update: tuple[str, ...]):
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover
        raise RuntimeError(f"upsert is not implemented for {dialect}")
    stmt = insert(model.__table__)
    if update:
        return stmt.on_conflict_do_update(index_elements=list(key), set_={c: stmt.excluded[c] for c in update})
    return stmt.on_conflict_do_nothing(index_elements=list(key))


@contextmanager
def temporary_database(admin_url: str, prefix: str = "orch_tmp") -> Iterator[str]:
    """A fresh PostgreSQL database, migrated to head, on the server of ``admin_url`` (a role that may CREATE
    DATABASE); dropped WITH (FORCE) on exit. Yields its URL. For tests, benchmarks and fault drills."""
    import uuid

    from sqlalchemy import text

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        upgrade(url)
        yield url
    finally:
        for key in [k for k in _engines if k[1] == url]:
            _engines.pop(key).dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
