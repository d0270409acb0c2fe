"""`eval_translator.shard`: PSNR/SSIM of a trained translator on a shard of the test pairs (both protocols)."""

from __future__ import annotations

import os
import time

import numpy as np
from sqlalchemy.orm import Session

from shared import constants as C
from shared.models import Job
from shared.storage import input_path
from shared.store import store
from workers.device import cached, pick_device
from workers.recording import record_artifact, record_item_means, record_metrics
from workers.runner import ShardContext, ShardOutput
from workers.tasks.invert import load_sd_cached

#: Pairs of shard 0 shown in the evaluation's image grid (RGB | predicted IR | real IR).
GRID_PAIRS = 8
METRIC_NAMES = ("psnr", "ssim", "psnr_seed_protocol", "ssim_seed_protocol", "psnr_baseline", "ssim_baseline",
                "psnr_baseline_seed_protocol", "ssim_baseline_seed_protocol")


def shard_latent_rows(ctx: ShardContext) -> list[tuple[str, str, str, str, int]]:
    """(pair, rgb path, ir path, latents uri, position in that file) of this shard's pairs, from the invert job
    named by the spec's ``latents`` (a job whose items are pairs of an invert job: eval-translator, reconstruct)."""
    return store(ctx.settings).latent_rows(ctx.spec["latents"], ctx.job_id, ctx.index)


def stack_latents(ctx: ShardContext, rows: list[tuple[str, str, str, str, int]],
                  keys: tuple[str, ...] = ("z_rgb_t", "z_ir_t")) -> dict:
    """{key: stacked tensor} of the given ``shard_latent_rows`` rows, read from the invert job's files."""
    import torch
    from safetensors import safe_open

    by_file: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for *_, uri, pos in rows:
        if uri not in by_file:
            with safe_open(str(ctx.storage.resolve(uri)), framework="pt") as f:
                by_file[uri] = {k: f.get_tensor(k) for k in keys}
        for k in keys:
            out[k].append(by_file[uri][k][pos])
    return {k: torch.stack(v) for k, v in out.items()}


def eval_translator_work(ctx: ShardContext) -> ShardOutput:
    import cv2
    import torch

    from workers.ml.inversion import InversionConfig
    from workers.ml.m3fd import Pair, load_image_pair
    from workers.ml.translator_eval import evaluate_batch, image_grid
    from workers.train.translator import load_translator

    spec = ctx.spec
    cfg = InversionConfig(**spec["inversion"])
    rows = shard_latent_rows(ctx)
    device = pick_device(spec.get("device", "auto"))
    parts, _ = load_sd_cached(spec["model"], device, spec.get("precision", "auto"))
    ckpt_path = str(ctx.storage.resolve(spec["checkpoint_uri"]))
    (model, _), _ = cached(("translator", ckpt_path, device), lambda: load_translator(ckpt_path, device))
    bs = int(spec.get("batch_size", 8))
    per_item: list[tuple[str, float, int, str]] = []
    grid_rows = []
    t0 = time.perf_counter()
    for start in range(0, len(rows), bs):
        ctx.check()
        batch = rows[start : start + bs]
        z = stack_latents(ctx, batch)
        z_rgb, z_ir = z["z_rgb_t"], z["z_ir_t"]
        loaded = [load_image_pair(Pair(p, input_path(rgb), input_path(ir)), cfg.size, cfg.resize_to)
                  for p, rgb, ir, _, _ in batch]
        ir01 = torch.stack([x[2] for x in loaded])
        out = evaluate_batch(parts, lambda z: model(z), z_rgb, z_ir, ir01, cfg)
        for j, (pid, *_rest) in enumerate(batch):
            for name in METRIC_NAMES:
                per_item.append((name, float(out[name][j]), C.SUMMARY_STEP, pid))
        if ctx.index == 0 and len(grid_rows) < GRID_PAIRS:
            for j in range(min(len(batch), GRID_PAIRS - len(grid_rows))):
                rgb01 = (loaded[j][0] + 1) / 2
                pred = out["pred_images"][j]
                real = torch.nn.functional.interpolate(ir01[j : j + 1], size=pred.shape[-2:], mode="bilinear")[0]
                rgb01 = torch.nn.functional.interpolate(rgb01[None], size=pred.shape[-2:], mode="bilinear")[0]
                grid_rows += [rgb01.clamp(0, 1), pred, real.clamp(0, 1)]
        ctx.progress(start + len(batch), len(rows))
    grid = None
    if grid_rows:
        img = image_grid(grid_rows, ncols=3)  # (H, W, 3) uint8 RGB
        key = f"jobs/{ctx.job_id}/grid-rgb-pred-ir.png"
        grid = ctx.storage.write(key, lambda p: _write_png(cv2, p, img))

    def record(s: Session) -> None:
        record_metrics(s, ctx.job_id, per_item, ctx.index)
        if grid is not None:
            record_artifact(s, ctx.job_id, ctx.index, C.ARTIFACT_IMAGE, grid,
                            {"what": "RGB | predicted IR | real IR", "pairs": len(grid_rows) // 3})

    return ShardOutput(record, {"pairs": len(rows), "seconds": round(time.perf_counter() - t0, 3),
                                "pid": os.getpid(), "device": device})


def _write_png(cv2, path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    path.write_bytes(buf.tobytes())


def finalize_eval_translator(s: Session, job: Job) -> None:
    """Summary = mean over test pairs of each per-image metric (per image, then averaged: REFERENCE s.5)."""
    record_item_means(s, job.id)


