"""The training harness's distributed set-up: joining (and leaving) the torchrun process group, AMP selection, and
each epoch's data order (workers/train/common.py describes the harness's semantics)."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from shared.errors import UserError

# ---------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on this node, number of ranks, its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool
    ddp: bool
    # gloo group for small host-side collectives (stop flag, RNG states): under NCCL they would need a CUDA
    # tensor and a device sync at every step. None = the default group (already gloo on CPU).
    cpu_group: Any = None


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun (nanoGPT style), else run as one process.

    CUDA ranks use NCCL on ``cuda:LOCAL_RANK``; CPU ranks use gloo.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device {device!r} is not one of auto, cpu, cuda: fix 'device' in the config")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is visible: use device 'auto' or 'cpu'")
    ddp = int(os.environ.get("RANK", -1)) != -1
    cpu_group = None
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if use_cuda:
            torch.cuda.set_device(local_rank)  # before init: NCCL binds each rank to its own GPU
            dev = torch.device("cuda", local_rank)
            dist.init_process_group(backend="nccl", device_id=dev)
            cpu_group = dist.new_group(backend="gloo")
        else:
            dev = torch.device("cpu")
            dist.init_process_group(backend="gloo")
    else:
        rank, local_rank, world_size = 0, 0, 1
        dev = torch.device("cuda") if use_cuda else torch.device("cpu")
    if use_cuda:  # TF32 matmuls/convs: ~free speed on Ampere+ at no visible cost for these models
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return DistInfo(rank, local_rank, world_size, dev, rank == 0, ddp, cpu_group)


def teardown_distributed(info: DistInfo) -> None:
    """Leave the process group (clean exits only; a crashing rank just exits and torchrun reaps the rest).

    The ranks meet at a barrier first: otherwise a rank that is done while rank 0 still writes the final checkpoint
    tears its gloo connections down under a peer still in use, and can die in C++ at exit ("terminate called
    without an active exception", SIGABRT), which fails a finished run."""
    if info.ddp and dist.is_initialized():
        dist.barrier(group=info.cpu_group)
        dist.destroy_process_group()


def exit_rank(code: int) -> None:
    """End a training process with ``code`` without running the interpreter's finalisation.

    By now the run's results are durable (checkpoint written, "done" event flushed) and the process group is
    destroyed. Finalisation can still tear down gloo's C++ worker threads while one holds a tensor and abort the
    process ("terminate called without an active exception", SIGABRT): seen on a finished 2-rank CPU run under
    load, where it turned a finished run into a failed one. ``os._exit`` skips that.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_(t: torch.Tensor, info: DistInfo, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all_reduce that is a no-op without DDP; returns ``t``."""
    if info.ddp:
        dist.all_reduce(t, op=op)
    return t


# ------------------------------------------------------------------------------------------------- amp


@dataclass
class Amp:
    """Autocast dtype (None = full precision) and the GradScaler (enabled for fp16 only)."""

    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def select_amp(device: torch.device, amp: bool, amp_dtype: str = "auto") -> Amp:
    """bf16 autocast on CUDA where supported (no scaler needed), else fp16 with a GradScaler; CPU: none."""
    dtype = None
    if amp and device.type == "cuda":
        if amp_dtype not in ("auto", "bf16", "fp16"):
            raise UserError(f"amp_dtype {amp_dtype!r} is not one of auto, bf16, fp16: fix the config")
        bf16 = amp_dtype == "bf16" or (amp_dtype == "auto" and torch.cuda.is_bf16_supported())
        dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Amp(device.type, dtype, scaler)


# ------------------------------------------------------------------------------------------------ data


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Optimizer steps per epoch: each rank sees ceil(N / W) samples (padded), in ceil(. / B) batches."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def epoch_batches(num_samples: int, epoch: int, seed: int, info: DistInfo, batch_size: int) -> list[torch.Tensor]:
    """This rank's index batches for ``epoch``: a deterministic function of (seed, epoch, rank, world size).

    The last batch may be short (same length on every rank, since DistributedSampler pads to equal shares).
    """
    sampler = DistributedSampler(range(num_samples), num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(iter(sampler)), dtype=torch.long)
    return list(idx.split(batch_size))

