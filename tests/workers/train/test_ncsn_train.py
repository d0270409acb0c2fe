"""NCSN training entry point: single process in-process (train, resume) and one 2-rank torchrun run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from workers.ml.mnist import load_mnist, to_tensor
from workers.ml.ncsn import ScoreUNet
from workers.ml.score import NCSN_PRESETS
from workers.train import ncsn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def write_config(tmp_path, name: str, **overrides) -> str:
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "run_dir": str(run_dir), "events": str(run_dir / "events.jsonl"), "epochs": 2, "batch_size": 32,
        "seed": 0, "log_every": 2, "checkpoint_every": 0, "device": "cpu", "data": "mnist:embedded",
        "max_train_samples": 192, "preset": "ncsn", "base_channels": 8, "lr": 1e-3, **overrides,
    }
    path = run_dir / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def events_of(config: str) -> list[dict]:
    with open(json.load(open(config))["events"]) as f:
        return [json.loads(line) for line in f]


def metrics(events: list[dict], name: str) -> list[float]:
    return [e["value"] for e in events if e["event"] == "metric" and e["name"] == name]


def test_preset_defaults() -> None:
    assert ncsn.preset_defaults({}) == NCSN_PRESETS["ncsn"]
    seed = ncsn.preset_defaults({"preset": "seed-code"})
    assert seed["sigma_kind"] == "linear" and seed["optimizer"] == "adamw" and seed["lr"] == 2e-4
    mixed = ncsn.preset_defaults({"preset": {"sigma_kind": "linear"}})
    assert mixed["sigma_kind"] == "linear" and mixed["ema_decay"] == NCSN_PRESETS["ncsn"]["ema_decay"]


def test_single_process_training_writes_checkpoints_and_metrics(tmp_path, in_process) -> None:
    config = write_config(tmp_path, "a")
    assert ncsn.main(["--config", config]) == 0
    events = events_of(config)
    assert events[0]["total_steps"] == 12 and events[-1]["event"] == "done" and events[-1]["step"] == 12
    loss, seed_units = metrics(events, "loss_epoch"), metrics(events, "loss_seed_units_epoch")
    assert len(loss) == len(seed_units) == 2
    # the two units differ by 2 / (C * H * W) = 1 / 392 (per example, hence also on average)
    assert seed_units[0] == pytest.approx(loss[0] / 392, rel=1e-4)
    ckpts = [e for e in events if e["event"] == "checkpoint"]
    assert [(e["step"], e["reason"]) for e in ckpts] == [(6, "epoch"), (12, "final")]

    model, sigmas, cfg = ncsn.load_score_model(ckpts[-1]["path"])
    assert isinstance(model, ScoreUNet) and not model.training
    assert sigmas.shape == (10,) and sigmas[0] == pytest.approx(1.0) and sigmas[-1] == pytest.approx(0.01)
    raw, _, _ = ncsn.load_score_model(ckpts[-1]["path"], use_ema=False)
    # the EMA (decay 0.999, 12 steps) stays near the initial weights, unlike the trained ones
    w_ema, w_raw = model.conv_out.weight, raw.conv_out.weight
    assert not torch.allclose(w_ema, w_raw)
    with torch.no_grad():
        out = model(torch.rand(2, 1, 28, 28), sigmas[:2])
    assert out.shape == (2, 1, 28, 28)
    # the sampler's start is centred on the digits the run trained on (init_prior)
    images, _ = load_mnist("mnist:embedded", "train")
    assert cfg["init"] == "prior"
    assert torch.allclose(cfg["data_mean"], to_tensor(images[:192], "zero_one").mean(dim=0), atol=1e-6)


def test_resume_reproduces_the_noise_draws(tmp_path, in_process) -> None:
    full = write_config(tmp_path, "full", epochs=2, checkpoint_every=4, log_every=1)
    assert ncsn.main(["--config", full]) == 0
    full_ev = events_of(full)
    ck = next(e for e in full_ev if e["event"] == "checkpoint" and e["step"] == 4)
    resumed = write_config(tmp_path, "resumed", epochs=2, checkpoint_every=4, log_every=1, resume_from=ck["path"])
    assert ncsn.main(["--config", resumed]) == 0
    res_ev = events_of(resumed)
    full_loss = {e["step"]: e["loss"] for e in full_ev if e["event"] == "progress"}
    steps = [e["step"] for e in res_ev if e["event"] == "progress"]
    assert steps == list(range(5, 13))
    for e in res_ev:
        if e["event"] == "progress":  # same levels and noise: the RNG state came back with the checkpoint
            assert e["loss"] == pytest.approx(full_loss[e["step"]], rel=1e-5)
    assert metrics(res_ev, "loss_epoch") == pytest.approx(metrics(full_ev, "loss_epoch"), rel=1e-5)


def test_two_rank_ddp_run(tmp_path) -> None:
    config = write_config(tmp_path, "ddp", epochs=1, batch_size=16, preset="seed-code",
                          amp=True, max_train_samples=128)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "workers.train.ncsn", "--config", config]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = events_of(config)
    assert events[0]["world_size"] == 2 and events[0]["total_steps"] == 4  # 64 digits per rank, batch 16
    assert events[-1]["event"] == "done" and len(metrics(events, "loss_seed_units_epoch")) == 1
    ckpts = [e for e in events if e["event"] == "checkpoint"]
    assert [e["reason"] for e in ckpts] == ["final"]
    saved = torch.load(ckpts[0]["path"], weights_only=True)
    assert "ema" not in saved["extra"] and saved["config"]["sigma_kind"] == "linear"  # seed-code: no EMA
    assert len(saved["rng"]) == 2  # both ranks' RNG states, so a resume redraws the same noise
