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


def test_mask_url_masks_every_credential_form_and_keeps_ipv6_brackets():
    cases = {
        "postgresql://orch@db/orch?password=hunter2": "postgresql://orch@db/orch?password=***",
        "postgresql://u:p@[::1]:5432/orch": "postgresql://u:***@[::1]:5432/orch",
        "redis://:hunter2@[fe80::1%25eth0]:6379/0": "redis://:***@[fe80::1%25eth0]:6379/0",
        "postgresql://db/orch?sslmode=require&sslpassword=k3y&user=orch":
            "postgresql://db/orch?sslmode=require&sslpassword=***&user=orch",
        "s3://bucket/x?X-Amz-Signature=abc&X-Amz-Credential=AKIA&x-amz-date=1":
            "s3://bucket/x?X-Amz-Signature=***&X-Amz-Credential=***&x-amz-date=1",
        "https://h/p?pwd=1&pass=2&secret=3&token=4&api_key=5&sig=6&credentials=7&auth=8":
            "https://h/p?pwd=***&pass=***&secret=***&token=***&api_key=***&sig=***&credentials=***&auth=***",
        "redis://[::1]:6379/0": "redis://[::1]:6379/0",
        "amqp://guest:gu%40st@rabbit:5672//": "amqp://guest:***@rabbit:5672//",
        "postgresql://u:p%3Aq@h/d?pass%77ord=x": "postgresql://u:***@h/d?pass%77ord=***",
    }
    for url, want in cases.items():
        got = mask_url(url)
        assert got == want, (url, got)
        for secret in ("hunter2", "k3y", "abc", "AKIA", "gu%40st", "p%3Aq"):
            assert secret not in got
    assert mask_url("http://[::1") == "***"  # unparseable: nothing of it is shown
