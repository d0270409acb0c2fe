"""The embedded database's schema check: an up-to-date database is recognised with one query and no Alembic import
(what a CLI query pays on every call); an older one is still upgraded to the newest migration."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from shared import db
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_head_revision_is_the_newest_migration():
    files = sorted((db.MIGRATIONS / "versions").glob("*.py"))
    assert db.head_revision() == files[-1].name.split("_", 1)[0]


def test_an_up_to_date_database_is_checked_without_alembic(tmp_path):
    home = tmp_path / "orch"
    db.ensure_schema(Settings.from_env({"ORCH_HOME": str(home)}))
    env = {**os.environ, "ORCH_HOME": str(home), "PYTHONPATH": str(REPO)}
    for var in ("ORCH_DATABASE_URL", "ORCH_BROKER_URL", "ORCH_STORAGE"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator", "jobs"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [ln for ln in r.stderr.splitlines() if ln.rstrip().endswith(("| alembic", "| alembic.command"))]


def test_an_older_database_is_still_upgraded(tmp_path):
    settings = Settings.from_env({"ORCH_HOME": str(tmp_path / "orch")})
    db.upgrade(settings.database_url, "0002")  # as an older release left it
    db._upgraded.discard(settings.database_url)  # a new process
    db.ensure_schema(settings)
    path = settings.database_url.split("///", 1)[1]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == db.head_revision()
