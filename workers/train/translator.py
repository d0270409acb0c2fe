"""Train the latent translator f_theta: z^RGB_t -> z^IR_t (MSE on DDIM-inverted SD latents) with DDP.

    torchrun --standalone --nproc_per_node=G -m workers.train.translator --config CONFIG.json
    python -m workers.train.translator --config CONFIG.json        # one process, no DDP

CONFIG.json holds the common keys of ``workers.train.common`` plus
    "preset": "readme" | "seed-code"   (optional; defaults for lr, weight_decay, epochs, batch_size, amp, model)
    "model": {"base_channels": 64, "depth": 3}
    "data":  {"files": [".../shard-00000.safetensors", ...], "rows": [[file_idx, row], ...]}   (the TRAIN rows)
    "val_data": the same for the held-out (test) rows   (optional)
Each shard file holds "z_rgb_t" and "z_ir_t" of shape (N, 4, h, w). Without "rows" every row of every file is
used. The whole training set is loaded once onto the device (3,360 pairs of 4x64x64 fp32 latents ~ 440 MB).

With "val_data", every epoch end also logs "val_loss_epoch": the same MSE on the held-out latent pairs (the
model in eval mode, no gradients; every rank computes it on the whole held-out set, rank 0 logs it), and the
first epoch end logs "val_loss_identity", the MSE of the identity map z_rgb_t -> z_ir_t on them, the level a
translator has to get below. Both are latent-space MSEs: the eval-translator job measures pixels.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from safetensors import safe_open

from shared.errors import UserError
from workers.ml.translator import TRANSLATOR_PRESETS, LatentUNet
from workers.train.common import (
    StopFlag,
    Trainer,
    load_checkpoint,
    read_config,
    setup_distributed,
    teardown_distributed,
)
from workers.train.runtime import exit_rank

LATENT_KEYS = ("z_rgb_t", "z_ir_t")


def preset_defaults(given: dict) -> dict:
    """Config defaults from ``TRANSLATOR_PRESETS[given["preset"]]`` (none without a preset)."""
    name = given.get("preset")
    if name is None:
        return {}
    if name not in TRANSLATOR_PRESETS:
        raise UserError(f"unknown translator preset {name!r}: use one of {', '.join(TRANSLATOR_PRESETS)}")
    p = dict(TRANSLATOR_PRESETS[name])
    p["model"] = {"base_channels": p.pop("base_channels"), "depth": p.pop("depth")}
    return p


def build_model(cfg: dict) -> LatentUNet:
    """The translator U-Net described by a run config's "model" entry."""
    return LatentUNet(**(cfg.get("model") or {}))


def load_translator(path: str, device: torch.device | str = "cpu") -> tuple[LatentUNet, dict]:
    """Rebuild the trained translator from a training checkpoint: (model in eval mode on ``device``, config)."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]


def load_latent_pairs(data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the listed (file, row) pairs in order: z_rgb_t, z_ir_t, each float32 (N, 4, h, w) on the CPU."""
    files = list(data.get("files") or [])
    if not files:
        raise UserError("translator config has no data.files: list the latent shard .safetensors files")
    rows = data.get("rows")
    wanted: dict[int, list[int] | None] = {}  # file index -> rows (None = all), in first-seen order
    positions: dict[int, list[int]] = {}  # file index -> positions of its rows in the requested order
    if rows is None:
        wanted = dict.fromkeys(range(len(files)))
    else:
        for pos, (fi, r) in enumerate(rows):
            wanted.setdefault(int(fi), []).append(int(r))  # type: ignore[union-attr]
            positions.setdefault(int(fi), []).append(pos)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in LATENT_KEYS}
    order: list[int] = []
    for fi, file_rows in wanted.items():
        if not 0 <= fi < len(files):
            raise UserError(f"data.rows names file index {fi} but data.files has {len(files)} files: fix the rows")
        path = files[fi]
        if not os.path.isfile(path):
            raise UserError(f"latent shard {path} does not exist: rerun the inversion job or fix data.files")
        with safe_open(path, framework="pt") as f:
            missing = [k for k in LATENT_KEYS if k not in f.keys()]
            if missing:
                raise UserError(f"latent shard {path} lacks {', '.join(missing)}: it is not an inversion output")
            for k in LATENT_KEYS:
                t = f.get_tensor(k)
                if file_rows is not None:
                    if max(file_rows) >= t.shape[0]:
                        raise UserError(f"data.rows asks for row {max(file_rows)} of {path}, which has "
                                        f"{t.shape[0]} rows: fix the rows")
                    t = t[torch.tensor(file_rows, dtype=torch.long)]
                parts[k].append(t.float())
        order.extend(positions.get(fi, []))
    z_rgb, z_ir = (torch.cat(parts[k]) for k in LATENT_KEYS)
    if z_rgb.shape != z_ir.shape or z_rgb.ndim != 4 or z_rgb.shape[0] == 0:
        raise UserError(f"latent pairs have shapes {tuple(z_rgb.shape)} and {tuple(z_ir.shape)}: "
                        "expected equal non-empty (N, 4, h, w)")
    if rows is not None:  # undo the grouping by file so row i of the result is rows[i]
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        z_rgb, z_ir = z_rgb[inverse], z_ir[inverse]
    return z_rgb, z_ir


def held_out_loss(model: torch.nn.Module, z_rgb: torch.Tensor, z_ir: torch.Tensor, batch: int = 64) -> float:
    """Mean squared error of ``model`` over held-out latent pairs (eval mode, no gradients, fp32)."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for a in range(0, z_rgb.shape[0], batch):
            pred = model(z_rgb[a : a + batch]).float()
            total += F.mse_loss(pred, z_ir[a : a + batch], reduction="sum").item()
    model.train(was_training)
    return total / z_rgb.numel()


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag.install()  # first: a cancel during start-up is honoured at the first step boundary
    cfg, checkpoint = read_config(argv, "Train the latent RGB->IR translator.", preset_defaults)
    info = setup_distributed(cfg["device"])

    z_rgb, z_ir = load_latent_pairs(cfg["data"])  # (N, 4, h, w) each
    z_rgb, z_ir = z_rgb.to(info.device), z_ir.to(info.device)

    torch.manual_seed(int(cfg["seed"]))  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg).to(info.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    trainer = Trainer(cfg, info, model, optimizer, stop=stop, checkpoint=checkpoint)

    def step_fn(model: torch.nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        idx = idx.to(info.device)
        pred = model(z_rgb[idx])  # (B, 4, h, w)
        return F.mse_loss(pred.float(), z_ir[idx]), {}

    val = load_latent_pairs(cfg["val_data"]) if cfg.get("val_data") else None
    on_epoch_end = None
    if val is not None:
        v_rgb, v_ir = (t.to(info.device) for t in val)
        identity = F.mse_loss(v_rgb, v_ir).item()

        def on_epoch_end(tr: Trainer) -> dict[str, float]:
            out = {"val_loss_epoch": held_out_loss(tr.raw_model, v_rgb, v_ir, int(cfg["batch_size"]) * 8)}
            if "val_loss_identity" not in tr.metrics:
                out["val_loss_identity"] = identity
            return out

    trainer.fit(z_rgb.shape[0], step_fn, on_epoch_end=on_epoch_end)
    teardown_distributed(info)
    return 0


if __name__ == "__main__":
    exit_rank(main())  # an exception still exits 1 with its traceback
