"""The translator entry point under real torchrun: 2 gloo ranks on CPU on a tiny synthetic latent dataset.

Covers training, rank-0-only events and checkpoints, resume from a mid-run checkpoint, cancel by SIGTERM
(to torchrun's process group, and to one rank), and a crashing rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from shared.errors import UserError
from workers.ml.translator import LatentUNet
from workers.train.translator import load_latent_pairs, load_translator, preset_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def write_shards(folder) -> list[str]:
    """Two shard files of 20 latent pairs (4x8x8) with a learnable RGB->IR map."""
    g = torch.Generator().manual_seed(0)
    files = []
    for i in range(2):
        z = torch.randn(20, 4, 8, 8, generator=g)
        z_ir = torch.tanh(z.flip(1)) * 0.8 + 0.2 * z
        path = str(folder / f"shard-{i:05d}.safetensors")
        save_file({"z_rgb_t": z, "z_ir_t": z_ir, "z_rgb_0": z.clone(), "z_ir_0": z_ir.clone()}, path)
        files.append(path)
    return files


def write_config(tmp_path, name: str, files: list[str], **overrides) -> str:
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "run_dir": str(run_dir), "events": str(run_dir / "events.jsonl"), "resume_from": None,
        "checkpoint_every": 4, "epochs": 3, "batch_size": 4, "lr": 3e-3, "weight_decay": 0.0, "seed": 1,
        "amp": False, "max_steps": None, "log_every": 1, "device": "cpu",
        "model": {"base_channels": 8, "depth": 2},
        # 36 of the 40 rows are "train": 18 per rank, 5 batches of 4 (the last one short) per epoch
        "data": {"files": files, "rows": [[f, r] for f in range(2) for r in range(18)]},
        **overrides,
    }
    path = run_dir / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def torchrun(config: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, "-m", "workers.train.translator", "--config", config]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def events_of(config: str) -> list[dict]:
    with open(json.load(open(config))["events"]) as f:
        return [json.loads(line) for line in f]


def progress_steps(events: list[dict]) -> list[int]:
    return [e["step"] for e in events if e["event"] == "progress"]


def start_and_wait(cmd: list[str], config: str, min_step: int) -> tuple[subprocess.Popen, list[dict]]:
    """Start a run in its own session and wait until it has logged ``min_step``."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    ev_path = json.load(open(config))["events"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        if os.path.exists(ev_path):
            events = events_of(config)
            if any(e["event"] == "progress" and e["step"] >= min_step for e in events):
                return proc, events
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("run made no progress")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("latents"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, shards) -> tuple[str, subprocess.CompletedProcess]:
    """One uninterrupted 2-rank run, shared by the tests that compare against it."""
    config = write_config(tmp_path_factory.mktemp("full"), "run", shards)
    return config, torchrun(config)


# ----------------------------------------------------------------------------------------- in-process


def test_load_latent_pairs_keeps_the_requested_row_order(tmp_path) -> None:
    files = write_shards(tmp_path)
    rows = [[1, 3], [0, 5], [1, 0], [0, 5]]
    z_rgb, z_ir = load_latent_pairs({"files": files, "rows": rows})
    assert z_rgb.shape == z_ir.shape == (4, 4, 8, 8) and z_rgb.dtype == torch.float32
    from safetensors.torch import load_file

    shard = [load_file(f) for f in files]
    for i, (f, r) in enumerate(rows):
        assert torch.equal(z_rgb[i], shard[f]["z_rgb_t"][r]) and torch.equal(z_ir[i], shard[f]["z_ir_t"][r])
    z_all, _ = load_latent_pairs({"files": files})
    assert z_all.shape[0] == 40
    with pytest.raises(UserError, match="does not exist"):
        load_latent_pairs({"files": [str(tmp_path / "missing.safetensors")]})
    with pytest.raises(UserError, match="row 99"):
        load_latent_pairs({"files": files, "rows": [[0, 99]]})
    save_file({"other": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="lacks z_rgb_t"):
        load_latent_pairs({"files": [str(tmp_path / "bad.safetensors")]})


def test_presets_become_config_defaults() -> None:
    d = preset_defaults({"preset": "seed-code"})
    assert d["lr"] == 2e-4 and d["weight_decay"] == 1e-4 and d["amp"] is True
    assert d["model"] == {"base_channels": 64, "depth": 3}
    assert preset_defaults({}) == {}
    with pytest.raises(UserError, match="unknown translator preset"):
        preset_defaults({"preset": "paper"})


# ------------------------------------------------------------------------------------------- torchrun


def test_two_rank_run_trains_and_writes_one_set_of_files(full_run) -> None:
    config, proc = full_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = events_of(config)
    assert events[0]["event"] == "start" and events[0]["world_size"] == 2 and events[0]["total_steps"] == 15
    assert len(events[0]["pids"]) == 2
    assert sum(e["event"] == "start" for e in events) == 1  # rank 0 alone writes events
    assert progress_steps(events) == list(range(1, 16))
    ckpts = [e for e in events if e["event"] == "checkpoint"]
    assert [(e["step"], e["reason"]) for e in ckpts] == [(4, "interval"), (5, "epoch"), (8, "interval"),
                                                         (10, "epoch"), (12, "interval"), (15, "final")]
    run_dir = json.load(open(config))["run_dir"]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == sorted(
        os.path.basename(e["path"]) for e in ckpts)
    epoch_loss = [e["value"] for e in events if e["event"] == "metric" and e["name"] == "loss_epoch"]
    assert len(epoch_loss) == 3 and epoch_loss[-1] < 0.75 * epoch_loss[0]
    assert events[-1]["event"] == "done" and events[-1]["step"] == 15
    model, cfg = load_translator(ckpts[-1]["path"])
    assert isinstance(model, LatentUNet) and cfg["model"] == {"base_channels": 8, "depth": 2}


def test_resume_from_mid_run_checkpoint_matches_the_full_run(tmp_path, shards, full_run) -> None:
    full_config, _ = full_run
    full = events_of(full_config)
    mid = next(e for e in full if e["event"] == "checkpoint" and e["step"] == 8)  # epoch 1, 3 batches in
    config = write_config(tmp_path, "resumed", shards, resume_from=mid["path"])
    proc = torchrun(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = events_of(config)
    assert events[0]["resumed_from"] == mid["path"] and events[0]["step"] == 8
    assert progress_steps(events) == list(range(9, 16))  # nothing before or at the checkpoint again
    assert events[-1]["event"] == "done" and events[-1]["step"] == 15
    full_loss = {e["step"]: e["loss"] for e in full if e["event"] == "progress"}
    for e in events:
        if e["event"] == "progress":  # same batches in the same order from the same state
            assert e["loss"] == pytest.approx(full_loss[e["step"]], rel=1e-5)


def test_sigterm_to_the_process_group_stops_cleanly_and_resumes(tmp_path, shards, full_run) -> None:
    config = write_config(tmp_path, "cancel", shards, epochs=200, checkpoint_every=0)
    cmd = [*TORCHRUN, "-m", "workers.train.translator", "--config", config]
    proc, _ = start_and_wait(cmd, config, min_step=3)
    os.killpg(proc.pid, signal.SIGTERM)  # what the supervisor does on cancel
    _, stderr = proc.communicate(timeout=60)
    events = events_of(config)
    stopped = events[-1]
    assert stopped["event"] == "stopped" and stopped["reason"] == "signal", stderr[-3000:]
    ck = [e for e in events if e["event"] == "checkpoint"][-1]
    # a "signal" checkpoint at the stop step, unless an interval/epoch one was written at that very step
    assert ck["step"] == stopped["step"] and stopped["checkpoint"] == ck["path"] and os.path.isfile(ck["path"])
    assert ck["reason"] in ("signal", "interval", "epoch")
    paths = [e["path"] for e in events if e["event"] == "checkpoint"]
    assert len(paths) == len(set(paths))  # no step written twice
    # both ranks stopped by themselves (no SIGKILL after torchrun's grace period) ...
    assert "forcefully exiting" not in stderr and "exitcode" not in stderr
    # ... but torchrun, signalled itself, reports the signal: the "stopped" event is the record of a clean stop
    assert proc.returncode != 0

    resumed = write_config(tmp_path, "cancel", shards, epochs=3, resume_from=ck["path"])
    before = len(events)
    done = torchrun(resumed)
    assert done.returncode == 0, done.stderr[-3000:]
    after = events_of(resumed)[before:]
    assert after[-1]["event"] == "done" and after[-1]["step"] == 15  # same total as the uninterrupted run
    steps = progress_steps(events) + progress_steps(after)
    assert steps == list(range(1, 16)), steps


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, shards) -> None:
    config = write_config(tmp_path, "one", shards, epochs=200)
    cmd = [*TORCHRUN, "-m", "workers.train.translator", "--config", config]
    proc, events = start_and_wait(cmd, config, min_step=2)
    os.kill(events[0]["pids"][1], signal.SIGTERM)  # rank 1 only: the all_reduce(MAX) tells rank 0
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]  # workers signalled directly: torchrun itself exits 0
    events = events_of(config)
    assert events[-1]["event"] == "stopped" and os.path.isfile(events[-1]["checkpoint"])


def test_single_process_run_exits_zero_on_sigterm(tmp_path, shards) -> None:
    config = write_config(tmp_path, "solo", shards, epochs=200)
    cmd = [sys.executable, "-m", "workers.train.translator", "--config", config]
    proc, _ = start_and_wait(cmd, config, min_step=2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    events = events_of(config)
    assert events[0]["world_size"] == 1 and events[-1]["event"] == "stopped"


def test_a_crashing_rank_fails_the_run(tmp_path, shards) -> None:
    config = write_config(tmp_path, "crash", shards, fault={"rank": 1, "step": 6})
    proc = torchrun(config)
    assert proc.returncode != 0
    assert "injected fault on rank 1" in proc.stderr  # the rank's traceback reaches stderr
    events = events_of(config)
    assert not any(e["event"] == "done" for e in events)
    assert max(progress_steps(events)) == 6


def test_held_out_loss_is_logged_at_every_epoch_end_and_falls(tmp_path, shards) -> None:
    """With "val_data" (the invert job's test rows, workers/tasks/train.py) every epoch end logs the MSE on the
    held-out pairs, and the first one the identity map's MSE on them; on a learnable map the held-out loss falls
    below the identity level. One process, no DDP (the module's shards: rows 0-17 train, 18-19 held out)."""
    val = {"files": shards, "rows": [[f, r] for f in range(2) for r in (18, 19)]}
    config = write_config(tmp_path, "val", shards, epochs=4, checkpoint_every=0, log_every=5, val_data=val)
    proc = subprocess.run([sys.executable, "-m", "workers.train.translator", "--config", config], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = events_of(config)
    metrics = [e for e in events if e["event"] == "metric"]
    val_loss = [e["value"] for e in metrics if e["name"] == "val_loss_epoch"]
    identity = [e["value"] for e in metrics if e["name"] == "val_loss_identity"]
    assert [e["epoch"] for e in metrics if e["name"] == "val_loss_epoch"] == [0, 1, 2, 3]
    assert len(identity) == 1
    z_rgb, z_ir = load_latent_pairs(val)
    assert identity[0] == pytest.approx(torch.mean((z_rgb - z_ir) ** 2).item(), rel=1e-5)
    assert val_loss[-1] < 0.6 * val_loss[0] and val_loss[-1] < identity[0]
    assert events[-1]["metrics"]["val_loss_epoch"] == val_loss[-1]  # the summary holds the last epoch's value
