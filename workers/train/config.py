"""A training run's configuration: the common keys, their defaults, and how a resumed run's config is merged with
its checkpoint's."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from shared.errors import UserError
from workers.train.checkpoints import load_checkpoint

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
