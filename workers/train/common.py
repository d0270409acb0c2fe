"""DDP harness shared by the torchrun training entry points (translator, NCSN, classifier).

An entry point is started by its supervisor as

    torchrun --standalone --nproc_per_node=G -m workers.train.<name> --config CONFIG.json

or, with one process and no DDP, as ``python -m workers.train.<name> --config CONFIG.json``. It never writes to
the database or touches Celery (rank 0 only reads its shard's lease, workers/train/fencing.py): it reads CONFIG.json and talks back through a JSON-lines event file that rank 0 alone appends
to (one object per line, flushed and fsynced). Events, all with "event" and "time" (unix seconds):

    start       world_size, device, epoch, step, total_steps, steps_per_epoch, epochs, resumed_from, pids
    progress    epoch, step, total_steps, loss, samples_per_s, lr                  (every log_every steps)
    metric      name, value, step, epoch     ("loss_epoch" at each epoch end, the entry point's ``on_epoch_end``
                                               metrics such as the translator's "val_loss_epoch", job metrics)
    checkpoint  path, step, epoch, step_in_epoch, sha256, bytes, reason (interval | epoch | signal | final)
    stopped     reason (signal | fenced), step, epoch, step_in_epoch, checkpoint (latest checkpoint path, or null)
                message (fenced: why the attempt no longer holds its lease)
    done        step, epoch, metrics
    error       message, rank, step, epoch     (rank 0's own exception, just before the non-zero exit)

"epoch" in progress/metric events is the 0-based epoch the step belongs to; in start/checkpoint/stopped/done it
is the resume position (the epoch the next batch comes from; after the last epoch it equals ``epochs``).
"loss" values are means over ranks and samples; a non-finite value is written as null.

Semantics: the global step counts optimizer steps. Each epoch's data order is a function of (seed, epoch) only
(DistributedSampler, shuffle, set_epoch), so a resume at (epoch, step_in_epoch) skips exactly the batches
already trained. Checkpoints are written at every epoch end, every ``checkpoint_every`` steps, and at the end
(reason "final", replacing the last epoch-end one); never twice for one step. SIGTERM/SIGINT set a flag; at the
next step boundary the ranks agree with an all_reduce(MAX), rank 0 writes a "signal" checkpoint (unless one
exists for that step already), emits "stopped" and every rank exits 0.

torchrun starts its workers in their own sessions, so a signal to torchrun's process group reaches torchrun,
which forwards SIGTERM to the workers and then exits non-zero itself although the workers stopped cleanly: the
"stopped" event is the record of a clean stop. Signalling the ranks themselves (the "pids" of the start event)
gives the same stop and a torchrun exit status of 0. A crash in any rank propagates as a non-zero exit with the
traceback on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shared.errors import UserError

# The harness's parts live in their own modules; entry points and tests import them from here.
from workers.train.checkpoints import (  # noqa: F401
    CHECKPOINT_FORMAT,
    CheckpointInfo,
    checkpoint_path,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_rank,
    set_rng_state,
    sha256_file,
)
from workers.train.fencing import LeaseFence, StopFlag  # noqa: F401
from workers.train.runtime import (  # noqa: F401
    Amp,
    DistInfo,
    EventWriter,
    all_reduce_,
    epoch_batches,
    select_amp,
    setup_distributed,
    steps_per_epoch,
    teardown_distributed,
)

# Defaults for the common config keys (the supervisor normally writes all of them).
DEFAULT_CONFIG: dict[str, Any] = {
    "events": None,  # JSONL event file; None = events only go to stdout
    "resume_from": None,  # checkpoint path to continue from
    "checkpoint_every": 0,  # optimizer steps between interval checkpoints; 0 = epoch ends only
    "epochs": 1,
    "batch_size": 8,  # per rank
    "lr": 1e-4,
    "weight_decay": 0.0,
    "seed": 0,
    "amp": False,  # autocast on CUDA (ignored on CPU)
    "amp_dtype": "auto",  # "auto" (bf16 where supported, else fp16) | "bf16" | "fp16"
    "grad_clip": None,  # max global grad norm, None = no clipping
    "max_steps": None,  # optional cap on the global step
    "log_every": 10,
    "device": "auto",  # "auto" | "cpu" | "cuda"
    "fault": None,  # testing hook: {"rank": r, "step": s} raises in rank r before step s+1
    "fence": None,  # {"shard_id", "owner", "attempt", "lease_seconds"}: rank 0 checks the lease (fencing.py)
}

# Keys a resumed run may change; everything else (model, data, optimiser, seed, batch size) comes from the
# checkpoint so that the resumed run continues the same training.
OPERATIONAL_KEYS = frozenset(
    {"run_dir", "events", "resume_from", "checkpoint_every", "epochs", "max_steps", "log_every", "device",
     "amp", "amp_dtype", "fault", "fence"}
)


# --------------------------------------------------------------------------------------------- config


def read_config(
    argv: list[str] | None = None,
    description: str | None = None,
    preset_defaults: Callable[[dict], dict] | None = None,
) -> tuple[dict, dict | None]:
    """Parse ``--config CONFIG.json``; return (config with defaults, loaded resume checkpoint or None).

    Precedence: ``DEFAULT_CONFIG`` < ``preset_defaults(given)`` (the job's named preset, e.g. "seed-code") <
    the keys given in the file. With ``resume_from`` the checkpoint's own config wins for every key outside
    ``OPERATIONAL_KEYS`` (a warning names each key the new config tried to change).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="JSON config written by the supervisor")
    args = parser.parse_args(argv)
    try:
        with open(args.config) as f:
            given = json.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {args.config} does not exist: pass the path the supervisor wrote") from None
    except json.JSONDecodeError as e:
        raise UserError(f"config file {args.config} is not valid JSON ({e}): rewrite it") from None
    if not given.get("run_dir"):
        raise UserError(f"config file {args.config} has no 'run_dir': add the run folder for checkpoints")
    cfg = {**DEFAULT_CONFIG, **(preset_defaults(given) if preset_defaults else {}), **given}
    checkpoint = None
    if cfg["resume_from"]:
        checkpoint = load_checkpoint(cfg["resume_from"])
        saved = checkpoint["config"]
        for key in sorted(set(saved) & set(given)):
            if key not in OPERATIONAL_KEYS and given[key] != saved[key] and os.environ.get("RANK", "0") == "0":
                print(f"warning: resume keeps {key}={saved[key]!r} from the checkpoint (config says {given[key]!r})",
                      file=sys.stderr)
        cfg = {**DEFAULT_CONFIG, **saved, **{k: v for k, v in cfg.items() if k in OPERATIONAL_KEYS}}
    return cfg, checkpoint



# ----------------------------------------------------------------------------------------------- loop

StepFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class _Sums:
    """Sample-weighted running sums of the loss and extra scalars (per rank; rank 0 also carries resumed ones)."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    count: float = 0.0

    def add(self, scalars: dict[str, torch.Tensor], n: int) -> None:
        for k, v in scalars.items():
            v = v.detach().float() * n
            self.values[k] = self.values[k] + v if k in self.values else v
        self.count += n

    def reduced(self, info: DistInfo, keys: list[str]) -> tuple[dict[str, float], float]:
        """Collective: global sums over ranks for ``keys`` (the same list on every rank) and the global count."""
        zero = torch.zeros((), dtype=torch.float64, device=info.device)
        t = torch.stack([self.values.get(k, zero).to(info.device, torch.float64) for k in keys]
                        + [torch.tensor(self.count, dtype=torch.float64, device=info.device)])
        t = all_reduce_(t.clone(), info).tolist()
        return dict(zip(keys, t[:-1], strict=True)), t[-1]


class Trainer:
    """Owns the DDP-wrapped model, optimiser, GradScaler, resume state, events and checkpoints of one run.

    The entry point builds the raw model and optimiser, then calls ``fit`` with a ``step_fn(model, idx)`` that
    returns (loss, extra scalars) for one batch of sample indices; the harness does autocast, backward, the
    optimiser step, logging, checkpoints, signal stops and the skip-on-resume.
    """

    def __init__(
        self,
        cfg: dict,
        info: DistInfo,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        stop: StopFlag,
        checkpoint: dict | None = None,
        extra_state: dict[str, Any] | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        self.cfg, self.info, self.stop = cfg, info, stop
        self.raw_model, self.optimizer = model, optimizer
        self.extra_state = extra_state or {}  # objects with state_dict/load_state_dict, e.g. {"ema": ema}
        self.after_step = after_step
        self.amp = select_amp(info.device, bool(cfg["amp"]), cfg.get("amp_dtype", "auto"))
        self.events = EventWriter(cfg.get("events"), enabled=info.is_main)
        if info.is_main and stop.fence is None:
            stop.fence = LeaseFence.from_config(cfg.get("fence"))
        self.epoch, self.step, self.step_in_epoch, self.total_steps = 0, 0, 0, 0
        self.resumed_from: str | None = None
        self.last_saved_step: int | None = None
        self.last_checkpoint: str | None = None
        self.epoch_sums = _Sums()
        self.metrics: dict[str, float] = {}
        self.on_epoch_end: Callable[[Trainer], dict[str, float]] | None = None
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            seed_rank(int(cfg["seed"]), info.rank)
        self.model: nn.Module = model
        if info.ddp:
            self.model = DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda"
                                                 else None)

    # -- resume / save -------------------------------------------------------------------------------

    def _restore(self, ckpt: dict) -> None:
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.amp.scaler.is_enabled() and ckpt.get("scaler"):
            self.amp.scaler.load_state_dict(ckpt["scaler"])
        for name, obj in self.extra_state.items():
            obj.load_state_dict(ckpt["extra"][name])
        self.epoch, self.step, self.step_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
        self.resumed_from = os.path.abspath(self.cfg["resume_from"])
        self.last_saved_step = self.step
        self.last_checkpoint = self.resumed_from
        rngs = ckpt["rng"]
        if len(rngs) == self.info.world_size and ckpt.get("world_size") == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        else:
            if self.info.is_main:
                print(f"warning: resuming a {ckpt.get('world_size')}-rank run on {self.info.world_size} ranks: "
                      "the rest of this epoch sees a different sample order", file=sys.stderr)
            seed_rank(int(self.cfg["seed"]) + 7919 * self.step, self.info.rank)
        if self.info.is_main:  # global sums of the epoch so far live on rank 0 only, so they count once
            self.epoch_sums = _Sums({k: torch.tensor(v, dtype=torch.float64, device=self.info.device)
                                     for k, v in ckpt["epoch_sums"].items()}, ckpt["epoch_count"])
        self.metrics = dict(ckpt.get("metrics", {}))

    def save(self, reason: str) -> CheckpointInfo | None:
        """Collective: gather RNG states and epoch sums from all ranks; rank 0 writes and logs the checkpoint."""
        if self.stop.agreed(self.info) and self.stop.fenced:
            return None  # another attempt owns the run: write nothing (the loop stops at its next check)
        rngs: list[Any] = [None] * self.info.world_size
        if self.info.ddp:
            dist.all_gather_object(rngs, rng_state(), group=self.info.cpu_group)
        else:
            rngs = [rng_state()]
        sums, count = self.epoch_sums.reduced(self.info, self._sum_keys())
        self.last_saved_step = self.step
        if not self.info.is_main:
            return None
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.amp.scaler.state_dict() if self.amp.scaler.is_enabled() else None,
            "extra": {name: obj.state_dict() for name, obj in self.extra_state.items()},
            "config": self.cfg,
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "world_size": self.info.world_size,
            "rng": rngs,
            "epoch_sums": sums,
            "epoch_count": count,
            "metrics": self.metrics,
        }
        ck = save_checkpoint(state, self.cfg["run_dir"], self.step)
        self.last_checkpoint = ck.path
        self.events.emit("checkpoint", path=ck.path, step=self.step, epoch=self.epoch,
                         step_in_epoch=self.step_in_epoch, sha256=ck.sha256, bytes=ck.bytes, reason=reason)
        print(f"checkpoint {ck.path} ({reason})", flush=True)
        return ck

    # -- loop ----------------------------------------------------------------------------------------

    def _train_step(self, step_fn: StepFn, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.model.train()
        with self.amp.autocast():
            loss, extras = step_fn(self.model, idx)
        self.optimizer.zero_grad(set_to_none=True)
        self.amp.scaler.scale(loss).backward()
        if self.cfg.get("grad_clip"):
            self.amp.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), float(self.cfg["grad_clip"]))
        self.amp.scaler.step(self.optimizer)
        self.amp.scaler.update()
        if self.after_step is not None:
            self.after_step()
        return loss.detach(), {k: v.detach() for k, v in extras.items()}

    def _batches(self, num_samples: int) -> Iterator[tuple[int, torch.Tensor, int]]:
        """(batch number in epoch, index batch, batches in epoch), skipping the batches done before a resume."""
        batches = epoch_batches(num_samples, self.epoch, int(self.cfg["seed"]), self.info,
                                int(self.cfg["batch_size"]))
        for b in range(self.step_in_epoch, len(batches)):
            yield b, batches[b], len(batches)

    def fit(
        self,
        num_samples: int,
        step_fn: StepFn,
        on_end: Callable[[Trainer], dict[str, float]] | None = None,
        on_epoch_end: Callable[[Trainer], dict[str, float]] | None = None,
    ) -> dict:
        """Train to ``epochs`` (or ``max_steps``); returns {"stopped": bool, "step", "epoch", "metrics"}.

        ``on_epoch_end(trainer)`` runs on every rank at each completed epoch, after the "loss_epoch" metric and
        before the epoch's checkpoint (e.g. a held-out loss; it must do the same collectives on every rank, or
        none); its metrics are logged at that step and epoch and kept in the summary (the last epoch's values).

        ``on_end(trainer)`` runs on every rank after the final checkpoint (e.g. a test-set evaluation, which may
        use collectives) and returns metrics that are logged and added to the "done" summary. An exception is
        logged as an "error" event (rank 0) and re-raised, so the process exits non-zero.
        """
        try:
            self.on_epoch_end = on_epoch_end
            return self._fit(num_samples, step_fn, on_end)
        except Exception as e:
            self.events.emit("error", message=f"{type(e).__name__}: {e}", rank=self.info.rank, step=self.step,
                             epoch=self.epoch)
            self.events.close()
            raise

    def _fit(self, num_samples: int, step_fn: StepFn, on_end: Callable[[Trainer], dict[str, float]] | None) -> dict:
        cfg, info = self.cfg, self.info
        epochs, log_every = int(cfg["epochs"]), max(1, int(cfg["log_every"]))
        every = int(cfg["checkpoint_every"] or 0)
        spe = steps_per_epoch(num_samples, info.world_size, int(cfg["batch_size"]))
        total = epochs * spe if cfg.get("max_steps") is None else min(epochs * spe, int(cfg["max_steps"]))
        self.total_steps = total  # read by step functions with an lr schedule
        fault = cfg.get("fault") or {}
        pids: list[Any] = [os.getpid()]
        if info.ddp:  # lets a supervisor signal the ranks themselves (torchrun exits 0 when they stop cleanly)
            pids = [None] * info.world_size
            dist.all_gather_object(pids, os.getpid(), group=info.cpu_group)
        self.events.emit("start", world_size=info.world_size, device=info.device.type, epoch=self.epoch,
                         step=self.step, total_steps=total, steps_per_epoch=spe, epochs=epochs,
                         resumed_from=self.resumed_from, pids=pids)
        if info.is_main:
            print(f"training {total} steps ({spe}/epoch) on {info.world_size} x {info.device.type}"
                  + (f", resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else ""),
                  flush=True)
        window, t0 = _Sums(), time.perf_counter()
        while self.epoch < epochs and self.step < total:
            n_batches = spe
            for b, idx, n_batches in self._batches(num_samples):
                if self.stop.agreed(info):
                    return self._stop_on_signal()
                if fault and fault.get("rank") == info.rank and fault.get("step") == self.step:
                    raise RuntimeError(f"injected fault on rank {info.rank} before step {self.step + 1}")
                loss, extras = self._train_step(step_fn, idx)
                self.step, self.step_in_epoch = self.step + 1, b + 1
                scalars = {"loss": loss, **extras}
                self.epoch_sums.add(scalars, len(idx))
                window.add(scalars, len(idx))
                if self.step % log_every == 0 or self.step == total:
                    sums, count = window.reduced(info, ["loss"])
                    dt = time.perf_counter() - t0
                    lr = self.optimizer.param_groups[0]["lr"]
                    loss_avg = sums["loss"] / max(count, 1)
                    self.metrics["loss"] = loss_avg
                    self.events.emit("progress", epoch=self.epoch, step=self.step, total_steps=total,
                                     loss=loss_avg, samples_per_s=count / max(dt, 1e-9), lr=lr)
                    if info.is_main:
                        print(f"step {self.step}/{total} | epoch {self.epoch} | loss {loss_avg:.5f} | "
                              f"{count / max(dt, 1e-9):.1f} samples/s", flush=True)
                    window, t0 = _Sums(), time.perf_counter()
                if self.step >= total:
                    break
                if every and self.step % every == 0 and b + 1 < n_batches:
                    self.save("interval")
            epoch_done = self.step_in_epoch >= n_batches
            if epoch_done:
                self._end_epoch()
            finished = self.epoch >= epochs or self.step >= total
            if (epoch_done or finished) and self.last_saved_step != self.step:
                self.save("final" if finished else "epoch")
        if self.stop.fenced:  # agreed by every rank when the last save was refused
            return self._stop_on_signal()
        if on_end is not None:
            for name, value in on_end(self).items():
                self.metrics[name] = float(value)
                self.events.emit("metric", name=name, value=value, step=self.step, epoch=self.epoch)
        self.events.emit("done", step=self.step, epoch=self.epoch, metrics=self.metrics)
        self.events.close()
        return {"stopped": False, "step": self.step, "epoch": self.epoch, "metrics": dict(self.metrics)}

    def _sum_keys(self) -> list[str]:
        """Collective: names of the running sums on any rank (rank 0 may hold resumed ones the others lack)."""
        keys = sorted(self.epoch_sums.values)
        if self.info.ddp:
            every: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(every, keys, group=self.info.cpu_group)
            keys = sorted(set().union(*every))
        return keys

    def _end_epoch(self) -> None:
        keys = self._sum_keys()
        sums, count = self.epoch_sums.reduced(self.info, keys)
        for k in keys:
            name = f"{k}_epoch"
            self.metrics[name] = sums[k] / max(count, 1)
            self.events.emit("metric", name=name, value=self.metrics[name], step=self.step, epoch=self.epoch)
        if self.on_epoch_end is not None:
            for name, value in self.on_epoch_end(self).items():
                self.emit_metric(name, float(value))
        self.epoch, self.step_in_epoch, self.epoch_sums = self.epoch + 1, 0, _Sums()

    def _stop_on_signal(self) -> dict:
        if self.stop.fenced:  # another attempt owns the run now: write nothing it could take for its own
            self.events.emit("stopped", reason="fenced", step=self.step, epoch=self.epoch,
                             step_in_epoch=self.step_in_epoch, checkpoint=None, message=self.stop.reason)
        else:
            # nothing to save when no step ran since the last checkpoint (or since the checkpoint resumed from)
            if self.step > 0 and self.last_saved_step != self.step:
                self.save("signal")
            self.events.emit("stopped", reason="signal", step=self.step, epoch=self.epoch,
                             step_in_epoch=self.step_in_epoch, checkpoint=self.last_checkpoint)
        self.events.close()
        if self.stop.fence is not None:
            self.stop.fence.close()
        if self.info.is_main:
            why = f"fenced: {self.stop.reason}" if self.stop.fenced else "by signal"
            print(f"stopped {why} at step {self.step}", flush=True)
        return {"stopped": True, "step": self.step, "epoch": self.epoch, "metrics": dict(self.metrics)}

    def emit_metric(self, name: str, value: float) -> None:
        """Log a job-specific metric at the current step (rank 0 writes; others ignore)."""
        self.metrics[name] = float(value)
        self.events.emit("metric", name=name, value=value, step=self.step, epoch=self.epoch)
