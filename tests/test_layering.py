"""Imports run one way: the control plane (orchestrator/) may use workers/ and shared/, never the other way round,
and shared/ uses neither."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(package: str) -> list[tuple[str, str]]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(str(path.relative_to(ROOT)), a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((str(path.relative_to(ROOT)), node.module))
    return out


def test_workers_and_shared_never_import_the_control_plane():
    upward = [(f, m) for pkg in ("workers", "shared") for f, m in _imports(pkg)
              if m == "orchestrator" or m.startswith("orchestrator.")]
    assert not upward, upward


def test_shared_imports_no_worker_code():
    assert not [(f, m) for f, m in _imports("shared") if m == "workers" or m.startswith("workers.")]


def test_kinds_never_import_the_control_plane():
    """Workers read the kinds (routes, work, finalisers), so a kind reaching into orchestrator/ would run upward."""
    assert not [(f, m) for f, m in _imports("kinds") if m == "orchestrator" or m.startswith("orchestrator.")]
    assert not [(f, m) for f, m in _imports("shared") if m == "kinds" or m.startswith("kinds.")]


def _calls_and_names(package: str, name: str) -> list[str]:
    """Files of `package` that mention `name` as a called function, an imported name or an attribute."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Name) and node.id == name
                    or isinstance(node, ast.Attribute) and node.attr == name
                    or isinstance(node, ast.ImportFrom) and any(a.name == name for a in node.names)):
                out.append(str(path.relative_to(ROOT)))
                break
    return out


def test_only_the_store_checks_the_schema():
    """The Store checks the schema once per process and database (shared/store.py); no caller does it again."""
    found = [f for pkg in ("orchestrator", "workers", "kinds", "shared") for f in _calls_and_names(pkg, "ensure_schema")]
    assert found == ["shared/store.py"], found


def _sql_of(package: str, allowed: set[str], models: set[str] | None = None, exempt: dict[str, str] | None = None
            ) -> list[tuple[str, str]]:
    """What the files of `package` (but those in `exempt`) use to build SQL themselves: SQLAlchemy imports but
    those in `allowed`, anything of shared.db, ORM models but those in `models` (when given), and sessions,
    transactions or engines of their own."""
    exempt = exempt or {}
    sql = []
    for path in sorted((ROOT / package).rglob("*.py")):
        f = str(path.relative_to(ROOT))
        if f in exempt:
            continue
        for node in ast.walk(ast.parse(path.read_text(), f)):
            if isinstance(node, ast.Import):
                sql += [(f, a.name) for a in node.names if a.name.split(".")[0] == "sqlalchemy"
                        and a.name not in allowed]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
                sql += [(f, f"{node.module}.{a.name}") for a in node.names
                        if f"{node.module}.{a.name}" not in allowed and node.module not in allowed]
            elif isinstance(node, ast.ImportFrom) and node.module == "shared.db":
                sql += [(f, f"shared.db.{a.name}") for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "shared.models" and models is not None:
                sql += [(f, f"shared.models.{a.name}") for a in node.names if a.name not in models]
    for name in ("session_scope", "transaction", "get_engine", "session_factory", "upsert"):
        sql += [(f, name) for f in _calls_and_names(package, name) if f not in exempt]
    return sql


def test_the_control_plane_builds_no_sql():
    """orchestrator/ reads and writes the database through the Store: no SQLAlchemy statements, sessions or
    engines of its own (its error classes, `sqlalchemy.exc`, and the migrations of `orchestrator db` are fine)."""
    sql = _sql_of("orchestrator", {"sqlalchemy.exc"})
    assert not sql, sql


#: Files of workers/ that may build SQL themselves, and why.
WORKERS_EXEMPT = {
    # rank 0 of a training run, inside torchrun: its own plain engine, so that its read of the lease never takes
    # SQLite's write lock (shared/db.py begins every transaction IMMEDIATE) and an unreachable server cannot hang it
    "workers/train/fencing.py": "reads the lease from inside torchrun",
}


def test_kinds_and_workers_build_no_sql():
    """kinds/ and workers/ read and write the database through the Store (shared/store*.py). They may name a
    session's type (the Store hands one to a shard's `record` and a kind's finaliser, which pass it on to the Store's
    statements), SQLAlchemy's error classes, and a job row's type and the clock of shared/models.py; no statements,
    sessions, engines or other ORM models of their own."""
    allowed = {"sqlalchemy.exc", "sqlalchemy.orm.Session"}
    sql = _sql_of("kinds", allowed, models={"Job"}) + _sql_of("workers", allowed, models={"Job", "utcnow"},
                                                              exempt=WORKERS_EXEMPT)
    assert not sql, sql
    assert _sql_of("workers", allowed, models={"Job", "utcnow"}) != [], "the exemption above is no longer needed"
