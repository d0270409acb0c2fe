"""The training loop shared by the entry points: steps, logging, epoch ends, checkpoints, resume and the agreed stop
(workers/train/common.py describes the events and semantics)."""

from __future__ import annotations

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

from workers.train.checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointInfo,
    rng_state,
    save_checkpoint,
    seed_rank,
    set_rng_state,
)
from workers.train.events import EventWriter
from workers.train.fencing import LeaseFence, StopFlag
from workers.train.runtime import DistInfo, all_reduce_, epoch_batches, select_amp, steps_per_epoch

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
