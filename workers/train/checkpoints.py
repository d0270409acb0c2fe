"""Checkpoint files of the training harness: atomic writes with their sha256, weights-only loads, RNG states."""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from shared.errors import UserError

CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------------------ checkpoints


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    sha256: str
    bytes: int


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.abspath(os.path.join(run_dir, "checkpoints", f"step-{step:08d}.pt"))


def save_checkpoint(state: dict, run_dir: str, step: int) -> CheckpointInfo:
    """Write ``run_dir/checkpoints/step-XXXXXXXX.pt`` atomically (temporary name, fsync, os.replace)."""
    path = checkpoint_path(run_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return CheckpointInfo(path, sha256_file(path), os.path.getsize(path))


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint onto the CPU. ``weights_only=True``: a checkpoint can carry tensors, not code."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: pass an existing checkpoint to resume_from")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a training checkpoint of this project: resume from a step-*.pt file")
    return ckpt


def rng_state() -> dict:
    """This process's torch (CPU and CUDA), numpy and python RNG states, in weights_only-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def seed_rank(seed: int, rank: int) -> None:
    """Seed every RNG of this rank; ranks differ so that per-sample noise differs across ranks."""
    s = seed + rank
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)

