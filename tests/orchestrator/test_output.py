"""Output for people and pipes: tables use the terminal's width and never cut what users copy; `| head` is quiet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import jobs
from orchestrator.output import table
from shared import constants as C
from shared.db import session_scope
from shared.storage import Storage
from tests.conftest import embedded_settings
from workers.recording import record_artifact, record_metrics

ROOT = Path(__file__).resolve().parents[2]
EVAL_METRICS = ("psnr", "ssim", "psnr_seed_protocol", "ssim_seed_protocol", "psnr_baseline", "ssim_baseline")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A sample job with two long-URI artifacts, and an eval job with 2,000 items x 6 per-item metrics."""
    home = tmp_path_factory.mktemp("output") / "a-rather-long-folder-name-for-orchestrator-state"
    s = embedded_settings(home)
    s.ensure_local_folders()
    storage = Storage(s.storage)
    sample = jobs.create_job(s, "sample", {"n": 2}, 2)
    ev = jobs.create_job(s, "eval-translator", {"test_pairs": 2000}, 1)
    with session_scope(s) as ss:
        uris = []
        for i in range(2):
            stored = storage.write_bytes(f"jobs/{sample}/samples/shard-{i:05d}.png", bytes([i]) * 100)
            record_artifact(ss, sample, i, C.ARTIFACT_IMAGE, stored)
            uris.append((stored.uri, stored.sha256))
        record_metrics(ss, ev, [(name, 20.0 + k / 7, C.SUMMARY_STEP, f"pair-{k:05d}")
                                for k in range(2000) for name in EVAL_METRICS])
        record_metrics(ss, ev, {"pairs": 2000, "psnr": 20.5})
    env = {**os.environ, "ORCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
    for var in ("ORCH_BROKER_URL", "ORCH_DATABASE_URL", "ORCH_STORAGE"):
        env.pop(var, None)
    return {"settings": s, "sample": sample, "eval": ev, "uris": uris, "env": env}


def cli(recorded, *argv: str, columns: int = 200) -> subprocess.CompletedProcess:
    env = {**recorded["env"], "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "orchestrator", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_table_fits_the_width_and_keeps_identifiers_whole():
    uri = "file:///srv/orchestrator/artifacts/jobs/train-0123456789ab/checkpoints/step-000100.pt"
    sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    rows = [{"checkpoint_id": 7, "step": 100, "reason": "a long free-text reason " * 3, "artifact": uri, "sha256": sha}]
    wide = table(rows, width=200)
    assert uri in wide and sha in wide and all(len(line) <= 200 for line in wide.splitlines())
    assert len(wide.splitlines()) == 2  # one header, one row: it fits, so it stays a table
    narrow = table(rows, width=80)
    assert uri in narrow and sha in narrow  # too wide for 80 columns: one `name  value` line each, nothing cut
    assert narrow.splitlines()[0].split() == ["checkpoint_id", "7"]
    # free text is shortened, never below its header, so two long metric names stay distinct
    metrics = [{"item": "pair-00001", "psnr_seed_protocol": 21.123456, "ssim_seed_protocol": 0.5,
                "note": "x" * 300}]
    out = table(metrics, width=100)
    header = out.splitlines()[0].split()
    assert header == ["item", "psnr_seed_protocol", "ssim_seed_protocol", "note"]
    assert all(len(line) <= 100 for line in out.splitlines())


def test_cli_prints_uris_hashes_and_metric_names_whole_at_200_columns(recorded):
    res = cli(recorded, "results", recorded["sample"])
    assert res.returncode == 0, res.stderr
    for uri, sha in recorded["uris"]:
        assert uri in res.stdout and sha in res.stdout
    res = cli(recorded, "results", recorded["eval"], "--limit", "3")
    header = res.stdout.splitlines()[0].split()
    assert set(EVAL_METRICS) <= set(header) and len(header) == len(set(header))  # names whole and distinct
    assert all(len(line) <= 200 for line in res.stdout.splitlines())
    res = cli(recorded, "jobs")
    assert recorded["sample"] in res.stdout and recorded["eval"] in res.stdout


def test_metric_counts_are_integers(recorded):
    res = cli(recorded, "metrics", recorded["eval"], "--json")
    m = json.loads(res.stdout)
    assert m["pairs"] == 2000 and isinstance(m["pairs"], int) and isinstance(m["psnr"], float)


def test_piping_into_head_prints_no_broken_pipe_traceback(recorded, tmp_path):
    """`results | head -1` (a 2,000-row table, larger than a pipe's buffer) and `status --json | head -1`."""
    for argv in (["results", recorded["eval"]], ["results", recorded["eval"], "--format", "csv"],
                 ["status", recorded["eval"], "--json"]):
        err = tmp_path / "stderr"
        cmd = " ".join([sys.executable, "-m", "orchestrator", *argv]) + f" 2>{err} | head -1"
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=recorded["env"], cwd=ROOT,
                             timeout=120)
        assert out.stdout.strip(), argv
        assert "Traceback" not in err.read_text() and "BrokenPipe" not in err.read_text(), err.read_text()


def test_a_reader_that_is_already_gone_ends_the_cli_quietly(recorded):
    """The deterministic case: the pipe's read end is closed before the CLI writes anything."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "status", recorded["eval"], "--json"],
                              stdout=w, stderr=subprocess.PIPE, text=True, env=recorded["env"], cwd=ROOT,
                              timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == C.EXIT_BROKEN_PIPE and proc.stderr == "", proc.stderr


def test_version_log_level_and_defaults_in_help(recorded):
    res = cli(recorded, "--version")
    assert res.returncode == 0 and res.stdout.startswith("orchestrator ")
    res = cli(recorded, "submit", "invert", "--help")
    assert "(default: 16)" in res.stdout.replace("\n", " ").replace("  ", " ") or "default: 16" in res.stdout
    res = cli(recorded, "--log-level", "debug", "jobs")
    assert res.returncode == 0
    res = cli(recorded, "--log-level", "loud", "jobs")
    assert res.returncode == C.EXIT_USAGE and res.stderr.startswith("error: argument --log-level")


def test_control_plane_commands_import_no_torch(recorded):
    """The base package (no [worker] extra) serves these: they must not import the ML stack."""
    code = ("import sys\nfrom orchestrator.cli import main\n"
            "for argv in (['jobs'], ['status', sys.argv[1]], ['results', sys.argv[1], '--limit', '2'],\n"
            "             ['metrics', sys.argv[1]], ['queue-length'], ['exporter', '--once']):\n"
            "    assert main(argv) == 0, argv\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'torchvision', 'mlxtend') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code, recorded["eval"]], capture_output=True, text=True,
                         env=recorded["env"], cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_query_commands_import_neither_celery_nor_task_modules(recorded):
    """--help, jobs, status and results read the DB (and the kinds' declarations) only: no Celery, no torch, no task
    module and no matplotlib (the report's charts import it when drawn), so they start fast on a control-plane
    host."""
    code = ("import sys\nfrom orchestrator.cli import main\n"
            "for argv in (['jobs'], ['status', sys.argv[1]], ['results', sys.argv[1], '--limit', '2']):\n"
            "    assert main(argv) == 0, argv\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('celery', 'torch', 'kombu', 'matplotlib')\n"
            "       or m.startswith('workers.tasks')]\n"
            "assert not bad, sorted(bad)[:10]\n")
    res = subprocess.run([sys.executable, "-c", code, recorded["eval"]], capture_output=True, text=True,
                         env=recorded["env"], cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_command_missing_the_worker_extra_says_which_in_one_line(capsys):
    from orchestrator.cli_common import missing_worker_package

    e = ModuleNotFoundError("No module named 'torch'", name="torch")
    assert missing_worker_package(e, "submit") == C.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'm3fd-orchestrator[worker]'" in err and "torch" in err
    with pytest.raises(ModuleNotFoundError):  # anything else is a real bug, not a missing extra
        missing_worker_package(ModuleNotFoundError("x", name="yaml"), "submit")
