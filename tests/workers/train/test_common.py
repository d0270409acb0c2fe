"""The DDP harness in one process: events, checkpoints, data order, config merging, stop and resume."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from torch import nn

from shared.errors import UserError
from workers.train import common
from workers.train.common import (
    EventWriter,
    StopFlag,
    Trainer,
    epoch_batches,
    load_checkpoint,
    read_config,
    save_checkpoint,
    select_amp,
    setup_distributed,
    sha256_file,
    steps_per_epoch,
)


def read_events(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def single(monkeypatch) -> common.DistInfo:
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return setup_distributed("cpu")


# ------------------------------------------------------------------------------------------- pieces


def test_setup_without_torchrun_is_one_process(single) -> None:
    assert (single.rank, single.world_size, single.is_main, single.ddp) == (0, 1, True, False)
    assert single.device.type == "cpu"
    with pytest.raises(UserError, match="device 'gpu'"):
        setup_distributed("gpu")


def test_event_writer_appends_json_lines(tmp_path) -> None:
    path = tmp_path / "sub" / "events.jsonl"
    w = EventWriter(str(path))
    w.emit("progress", step=1, loss=torch.tensor(0.5), bad=float("nan"))
    w.emit("done", metrics={"x": float("inf"), "y": 2.0})
    w.close()
    events = read_events(path)
    assert [e["event"] for e in events] == ["progress", "done"]
    assert events[0]["loss"] == 0.5 and events[0]["bad"] is None  # NaN is not JSON: written as null
    assert events[1]["metrics"] == {"x": None, "y": 2.0}
    assert all(isinstance(e["time"], float) for e in events)
    off = EventWriter(str(tmp_path / "other.jsonl"), enabled=False)
    assert off.emit("start") is None
    assert not (tmp_path / "other.jsonl").exists()


def test_checkpoint_is_atomic_and_hashed(tmp_path) -> None:
    state = {"format": common.CHECKPOINT_FORMAT, "model": {"w": torch.arange(3.0)}, "config": {"a": [1, 2]}}
    info = save_checkpoint(state, str(tmp_path), 12)
    assert info.path == str(tmp_path / "checkpoints" / "step-00000012.pt")
    assert info.sha256 == sha256_file(info.path) and info.bytes == os.path.getsize(info.path)
    assert os.listdir(tmp_path / "checkpoints") == ["step-00000012.pt"]  # no temporary left behind
    loaded = load_checkpoint(info.path)
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a training checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    ranks = [common.DistInfo(r, r, 2, torch.device("cpu"), r == 0, True) for r in range(2)]
    b0 = epoch_batches(21, epoch=3, seed=5, info=ranks[0], batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(b0, epoch_batches(21, 3, 5, ranks[0], 4), strict=True))
    assert not torch.equal(torch.cat(b0), torch.cat(epoch_batches(21, 4, 5, ranks[0], 4)))
    assert not torch.equal(torch.cat(b0), torch.cat(epoch_batches(21, 3, 6, ranks[0], 4)))
    b1 = epoch_batches(21, 3, 5, ranks[1], 4)
    # equal shares (11 each, one padded repeat), same batch count on both ranks, every sample seen
    assert len(b0) == len(b1) == steps_per_epoch(21, 2, 4) == 3
    assert [len(b) for b in b0] == [len(b) for b in b1] == [4, 4, 3]
    assert set(torch.cat(b0 + b1).tolist()) == set(range(21))


def test_amp_is_off_on_cpu() -> None:
    amp = select_amp(torch.device("cpu"), amp=True)
    assert amp.dtype is None and not amp.scaler.is_enabled()


def test_read_config_precedence_and_resume_merge(tmp_path) -> None:
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps({"run_dir": str(tmp_path), "lr": 0.5, "model": {"depth": 1}}))
    cfg, ckpt = read_config(["--config", str(cfg_path)], preset_defaults=lambda g: {"lr": 0.1, "epochs": 7})
    assert ckpt is None
    assert cfg["lr"] == 0.5 and cfg["epochs"] == 7 and cfg["checkpoint_every"] == 0  # file > preset > defaults
    saved = {**cfg, "lr": 0.25, "model": {"depth": 2}}
    path = save_checkpoint({"format": common.CHECKPOINT_FORMAT, "config": saved}, str(tmp_path), 3).path
    cfg_path.write_text(json.dumps({"run_dir": str(tmp_path / "b"), "lr": 9.0, "epochs": 11, "resume_from": path}))
    cfg, ckpt = read_config(["--config", str(cfg_path)])
    assert ckpt is not None
    # training keys come from the checkpoint; operational ones (run_dir, epochs) from the new config
    assert cfg["lr"] == 0.25 and cfg["model"] == {"depth": 2}
    assert cfg["epochs"] == 11 and cfg["run_dir"] == str(tmp_path / "b") and cfg["resume_from"] == path
    cfg_path.write_text(json.dumps({"lr": 1}))
    with pytest.raises(UserError, match="run_dir"):
        read_config(["--config", str(cfg_path)])
    with pytest.raises(UserError, match="does not exist"):
        read_config(["--config", str(tmp_path / "missing.json")])


def test_stop_flag_records_a_real_signal() -> None:
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        flag = StopFlag.install()
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.signum == signal.SIGTERM
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------- the loop

N, D = 40, 3
X = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3


def run(tmp_path, name: str, single, stop_at: int | None = None, **overrides) -> tuple[dict, list[dict], Trainer]:
    """Train a linear regression with the harness; ``stop_at`` raises the stop flag during that step (0: before
    the first one)."""
    cfg = {**common.DEFAULT_CONFIG, "run_dir": str(tmp_path / name), "events": str(tmp_path / name / "ev.jsonl"),
           "epochs": 3, "batch_size": 8, "lr": 0.05, "seed": 3, "log_every": 1, "checkpoint_every": 3, **overrides}
    ckpt = load_checkpoint(cfg["resume_from"]) if cfg.get("resume_from") else None
    torch.manual_seed(cfg["seed"])
    model = nn.Linear(D, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    stop = StopFlag()
    stop.requested = stop_at == 0
    trainer = Trainer(cfg, single, model, opt, stop=stop, checkpoint=ckpt)

    def step_fn(m, idx):
        # input noise from the global RNG: a resume must restore the RNG to reproduce the losses exactly
        x = X[idx] + 0.01 * torch.randn(len(idx), D)
        loss = nn.functional.mse_loss(m(x), Y[idx])
        if stop_at is not None and trainer.step + 1 == stop_at:
            stop.requested = True
        return loss, {"abs_err": (m(x) - Y[idx]).abs().mean().detach()}

    out = trainer.fit(N, step_fn, on_end=lambda t: {"final_w0": t.raw_model.weight[0, 0].item()})
    return out, read_events(cfg["events"]), trainer


def test_fit_logs_and_checkpoints_each_step_once(tmp_path, single) -> None:
    out, events, _ = run(tmp_path, "a", single)
    assert out == {"stopped": False, "step": 15, "epoch": 3, "metrics": out["metrics"]}
    assert events[0]["event"] == "start" and events[0]["total_steps"] == 15 and events[0]["pids"] == [os.getpid()]
    assert [e["step"] for e in events if e["event"] == "progress"] == list(range(1, 16))
    ckpts = [(e["step"], e["reason"]) for e in events if e["event"] == "checkpoint"]
    # interval every 3 steps, epoch ends at 5, 10; the last one is "final"; step 15 is written once
    assert ckpts == [(3, "interval"), (5, "epoch"), (6, "interval"), (9, "interval"), (10, "epoch"),
                     (12, "interval"), (15, "final")]
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == [f"step-{s:08d}.pt" for s, _ in ckpts]
    epoch_losses = [e["value"] for e in events if e["event"] == "metric" and e["name"] == "loss_epoch"]
    assert len(epoch_losses) == 3 and epoch_losses[2] < 0.5 * epoch_losses[0]
    assert [e["name"] for e in events if e["event"] == "metric"].count("abs_err_epoch") == 3
    assert events[-2]["name"] == "final_w0" and events[-1]["event"] == "done"
    assert events[-1]["metrics"]["loss_epoch"] == epoch_losses[-1]
    last = load_checkpoint(str(tmp_path / "a" / "checkpoints" / "step-00000015.pt"))
    assert (last["epoch"], last["step"], last["step_in_epoch"]) == (3, 15, 0)
    assert {"model", "optimizer", "scaler", "config", "rng", "extra"} <= set(last)


def test_max_steps_stops_mid_epoch_with_a_final_checkpoint(tmp_path, single) -> None:
    out, events, _ = run(tmp_path, "m", single, max_steps=7, checkpoint_every=0)
    assert out["step"] == 7 and out["epoch"] == 1
    assert [(e["step"], e["reason"]) for e in events if e["event"] == "checkpoint"] == [(5, "epoch"), (7, "final")]


def test_stop_then_resume_matches_an_uninterrupted_run(tmp_path, single) -> None:
    _, full, _ = run(tmp_path, "full", single)
    out, first, _ = run(tmp_path, "part", single, stop_at=7)
    assert out["stopped"] and out["step"] == 7
    assert [e["event"] for e in first[-2:]] == ["checkpoint", "stopped"]
    assert first[-2]["reason"] == "signal" and first[-1]["checkpoint"] == first[-2]["path"]
    assert (first[-1]["epoch"], first[-1]["step_in_epoch"]) == (1, 2)
    out2, second, _ = run(tmp_path, "resumed", single, resume_from=first[-2]["path"])
    assert out2["step"] == 15 and second[0]["resumed_from"] == first[-2]["path"] and second[0]["step"] == 7
    steps = [e["step"] for e in first + second if e["event"] == "progress"]
    assert steps == list(range(1, 16))  # no step trained or logged twice
    full_loss = {e["step"]: e["loss"] for e in full if e["event"] == "progress"}
    for e in second:
        if e["event"] == "progress":
            assert e["loss"] == pytest.approx(full_loss[e["step"]], rel=1e-6)
    # the epoch-1 average spans the stop: the resumed run carries the first part of the sums
    epoch1 = [e["value"] for e in second if e["event"] == "metric" and e["name"] == "loss_epoch"][0]
    full_epoch1 = [e["value"] for e in full if e["event"] == "metric" and e["name"] == "loss_epoch"][1]
    assert epoch1 == pytest.approx(full_epoch1, rel=1e-6)


def test_stop_right_after_resume_writes_no_duplicate(tmp_path, single) -> None:
    _, first, _ = run(tmp_path, "p", single, stop_at=4)
    ck = first[-2]["path"]
    out, events, _ = run(tmp_path, "q", single, resume_from=ck, stop_at=0)  # flag already up: stop at once
    assert out["stopped"] and out["step"] == 4
    assert not any(e["event"] == "checkpoint" for e in events)
    assert events[-1]["checkpoint"] == ck


def test_injected_fault_raises_and_logs_an_error(tmp_path, single) -> None:
    with pytest.raises(RuntimeError, match="injected fault"):
        run(tmp_path, "f", single, fault={"rank": 0, "step": 2})
    events = read_events(tmp_path / "f" / "ev.jsonl")
    assert events[-1]["event"] == "error" and events[-1]["step"] == 2
    assert not math.isnan(events[-2]["loss"])
