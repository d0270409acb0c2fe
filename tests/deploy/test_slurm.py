"""Slurm scripts in deploy/slurm: syntax (bash -n, shellcheck), directives, and a real run of each script against
fake `srun`/`scontrol`/`orchestrator`/`torchrun` commands, which record what they were asked to do.

The workers script is run to its end: SIGTERM to the batch shell (what `#SBATCH --signal=B:TERM@300` sends before
the time limit) must reach the worker through srun, and the script must wait for the worker's warm shutdown to end
before it exits 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.deploy.tools import SHELLCHECK_HINT, required_tool

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "deploy" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
WORKERS = SLURM / "workers.sbatch"
TRAIN = SLURM / "train-multinode.sbatch"

SERVER_ENV = {
    "ORCH_BROKER_URL": "redis://:secret@broker:6379/0",
    "ORCH_DATABASE_URL": "postgresql+psycopg2://orch:secret@db:5432/orch",
    "ORCH_STORAGE": "/shared/artifacts",
}


def _directives(path: Path) -> dict[str, str]:
    """The #SBATCH options (as sbatch reads them: only before the first command)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        m = re.match(r"#SBATCH\s+(--[\w-]+)(?:=(\S+))?", stripped)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


def test_there_are_both_scripts():
    assert WORKERS in SCRIPTS and TRAIN in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses_the_script(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert script.read_text().startswith("#!/bin/bash\n")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_is_clean(script):
    shellcheck = required_tool("shellcheck", SHELLCHECK_HINT)
    out = subprocess.run([shellcheck, "-s", "bash", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_directives(script):
    d = _directives(script)
    assert d["--ntasks-per-node"] == "1", "one srun task per node; the worker/torchrun fans out over the GPUs"
    assert int(d["--gpus-per-node"]) >= 1 and int(d["--nodes"]) >= 1
    m = re.fullmatch(r"B:TERM@(\d+)", d["--signal"])
    assert m, "SIGTERM to the batch shell (B:), which forwards it through srun"
    assert int(m.group(1)) >= 300, "time for a warm shutdown / checkpoint before the time limit"
    text = script.read_text()
    assert re.search(r"^trap \w+ TERM", text, re.M) and 'kill -TERM "$srun_pid"' in text


def test_train_script_spans_two_nodes():
    assert _directives(TRAIN)["--nodes"] == "2"


# -- fakes ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fakes(tmp_path):
    """A bin/ folder with srun (runs its command as the one task of a one-node step, with Slurm's
    CUDA_VISIBLE_DEVICES, forwarding TERM), scontrol (two hostnames) and recording orchestrator/torchrun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    scripts = {
        "srun": """\
            #!/bin/bash
            opts=()
            while [[ "$1" == --* ]]; do opts+=("$1"); shift; done
            echo "srun ${opts[*]}" >> "$FAKE_LOG"
            CUDA_VISIBLE_DEVICES="$FAKE_GPUS" "$@" &
            child=$!
            trap 'echo "srun forwards TERM" >> "$FAKE_LOG"; kill -TERM "$child"' TERM
            while kill -0 "$child" 2>/dev/null; do rc=0; wait "$child" || rc=$?; done
            exit "$rc"
            """,
        "scontrol": """\
            #!/bin/bash
            [[ "$1 $2" == "show hostnames" ]] && printf 'gpu-node-07\\ngpu-node-08\\n'
            """,
    }
    recorder = f"""\
        #!{sys.executable}
        import json, os, signal, sys, time
        name = os.path.basename(sys.argv[0])
        log = os.environ["FAKE_LOG"]
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        with open(log, "a") as f:
            f.write(json.dumps({{"cmd": name, "argv": sys.argv[1:], "pid": os.getpid(),
                                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                "env": {{k: os.environ.get(k) for k in ("ORCH_QUEUES", "HF_HUB_OFFLINE",
                                        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "OMP_NUM_THREADS")}}}}) + "\\n")
        if os.environ.get("FAKE_WAIT_FOR_TERM"):
            while not stop:
                time.sleep(0.02)
            with open(log, "a") as f:
                f.write("worker got TERM\\n")
            time.sleep(0.5)  # a shard finishing during the warm shutdown
            with open(log, "a") as f:
                f.write("worker finished its shard\\n")
        """
    for name, text in scripts.items():
        (bin_dir / name).write_text(textwrap.dedent(text))
    for name in ("orchestrator", "torchrun"):
        (bin_dir / name).write_text(textwrap.dedent(recorder))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    yield bin_dir, log
    # Kill fake workers that outlived a failed test.
    for rec in _records(log) if log.exists() else []:
        try:
            if str(bin_dir) in Path(f"/proc/{rec['pid']}/cmdline").read_text():
                os.kill(rec["pid"], signal.SIGKILL)
        except OSError:
            pass


def _env(fakes, **extra) -> dict[str, str]:
    bin_dir, log = fakes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "SLURM_", "CUDA_", "TRAIN_"))}
    env.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_LOG=str(log),
        FAKE_GPUS="0,1",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="gpu-node-[07-08]",
    )
    env.update(extra)
    return env


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_workers_start_one_worker_per_node_over_its_gpus_and_stop_warmly_on_sigterm(fakes, tmp_path):
    _, log = fakes
    proc = subprocess.Popen(
        ["bash", str(WORKERS)],
        env=_env(fakes, FAKE_WAIT_FOR_TERM="1", **SERVER_ENV),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        _wait_for(lambda: log.exists() and _records(log))
        (rec,) = _records(log)
        assert rec["cmd"] == "orchestrator"
        assert rec["argv"] == ["worker", "--queues", "gpu", "--gpus", "0,1", "--hostname", "slurm-4242@%h"]
        assert rec["env"]["HF_HUB_OFFLINE"] == "1"
        srun_line = next(line for line in log.read_text().splitlines() if line.startswith("srun "))
        assert "--ntasks-per-node=1" in srun_line

        proc.send_signal(signal.SIGTERM)  # what Slurm does 300 s before the time limit
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    events = [line for line in log.read_text().splitlines() if not line.startswith(("{", "srun --"))]
    assert events == ["srun forwards TERM", "worker got TERM", "worker finished its shard"]
    assert "warm shutdown" in out and "workers exited with status 0" in out


def test_workers_queues_can_be_chosen(fakes, tmp_path):
    _, log = fakes
    out = subprocess.run(
        ["bash", str(WORKERS)],
        env=_env(fakes, ORCH_QUEUES="gpu,cpu", **SERVER_ENV),
        capture_output=True,
        text=True,
        timeout=15,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    (rec,) = _records(log)
    assert rec["argv"][:3] == ["worker", "--queues", "gpu,cpu"]


def test_workers_read_settings_from_an_env_file(fakes, tmp_path):
    _, log = fakes
    env_file = tmp_path / "orch.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in SERVER_ENV.items()) + "ORCH_QUEUES=cpu\n")
    out = subprocess.run(
        ["bash", str(WORKERS)],
        env=_env(fakes, ORCH_ENV_FILE=str(env_file)),
        capture_output=True,
        text=True,
        timeout=15,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert _records(log)[0]["argv"][2] == "cpu"


@pytest.mark.parametrize("missing", sorted(SERVER_ENV))
def test_workers_refuse_to_start_without_the_shared_servers(fakes, tmp_path, missing):
    env = _env(fakes, **{k: v for k, v in SERVER_ENV.items() if k != missing})
    out = subprocess.run(
        ["bash", str(WORKERS)], env=env, capture_output=True, text=True, timeout=15, cwd=tmp_path
    )
    assert out.returncode != 0
    assert missing in out.stderr
    assert not (tmp_path / "log").exists() or not _records(tmp_path / "log"), "nothing may start"


def test_workers_say_what_to_do_without_gpus(fakes, tmp_path):
    out = subprocess.run(
        ["bash", str(WORKERS)],
        env=_env(fakes, FAKE_GPUS="", **SERVER_ENV),
        capture_output=True,
        text=True,
        timeout=15,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "no GPU allocated" in out.stderr and "--gpus-per-node" in out.stderr


def test_train_script_runs_torchrun_with_a_c10d_rendezvous_on_the_first_node(fakes, tmp_path):
    _, log = fakes
    config = tmp_path / "config.json"
    config.write_text('{"run_dir": "/shared/runs/ncsn"}')
    out = subprocess.run(
        ["bash", str(TRAIN)],
        env=_env(fakes, TRAIN_CONFIG=str(config)),
        capture_output=True,
        text=True,
        timeout=15,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    (rec,) = _records(log)
    assert rec["cmd"] == "torchrun"
    argv = rec["argv"]
    opts = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    assert opts["--nnodes"] == "2" and opts["--nproc-per-node"] == "gpu"
    assert opts["--rdzv-backend"] == "c10d"
    assert opts["--rdzv-endpoint"] == "gpu-node-07:29400", "the first node of the allocation hosts the store"
    assert opts["--rdzv-id"] == "4242", "the job id: two runs never join each other"
    assert argv[-4:] == ["-m", "workers.train.ncsn", "--config", str(config)]
    assert find_spec("workers.train.ncsn") is not None
    assert int(rec["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < 300, (
        "ranks checkpoint within the signal margin"
    )


def test_train_script_requires_a_config(fakes, tmp_path):
    out = subprocess.run(
        ["bash", str(TRAIN)], env=_env(fakes), capture_output=True, text=True, timeout=15, cwd=tmp_path
    )
    assert out.returncode != 0 and "TRAIN_CONFIG" in out.stderr
