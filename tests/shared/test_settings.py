from __future__ import annotations

from orchestrator.cli import main
from shared.settings import Settings, mask_url


def test_defaults_are_the_embedded_backend(tmp_path):
    s = Settings.from_env({"ORCH_HOME": str(tmp_path)})
    assert s.embedded_broker and s.is_sqlite and s.storage.startswith(str(tmp_path))


def test_mask_url_hides_passwords():
    assert mask_url("postgresql+psycopg2://orch:s3cr%40t@db:5432/orch") == "postgresql+psycopg2://orch:***@db:5432/orch"
    assert mask_url("redis://:hunter2@redis:6379/0") == "redis://:***@redis:6379/0"
    assert mask_url("sqlite:////tmp/x.sqlite") == "sqlite:////tmp/x.sqlite"


def test_db_url_command_never_prints_the_password(monkeypatch, capsys):
    monkeypatch.setenv("ORCH_DATABASE_URL", "postgresql+psycopg2://orch:hunter2@db.invalid:5432/orch")
    assert main(["db", "url"]) == 0
    out = capsys.readouterr()
    assert "hunter2" not in out.out + out.err and "***" in out.out
