"""reconstruct: how faithful an invert job's DDIM inversion is.

For every pair an invert job kept, DDIM-denoise its z_t back to t = 0 along the job's own schedule and prompts
(the inverse of the inversion), decode it with the job's VAE, and compare:

- ``psnr_rgb``/``ssim_rgb`` and ``psnr_ir``/``ssim_ir``: the decoded reconstruction against the input image (the
  same crop the invert job encoded, in [0, 1]; torchmetrics, per image, as the translator's evaluation);
- ``vae_psnr_rgb``/``vae_psnr_ir``: the VAE's own round trip (decode of the stored z_0) against the input, the
  ceiling that a perfect inversion would reach, so that the inversion's loss is the difference of the two;
- ``latent_err_rgb``/``latent_err_ir``: mean |z_0' - z_0| over the latent's elements, and ``latent_rel_rgb``/
  ``latent_rel_ir``: the same divided by mean |z_0|.

DDIM inversion is exact only as the stride goes to 0 (workers/ml/inversion.py), so these numbers say what the
chosen stride and t cost. Shard 0 writes a grid: input RGB | reconstruction | input IR | reconstruction.
The summary is the mean over pairs of each metric.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from kinds._common import finished_job
from kinds.base import Kind, Plan, fmt, option
from shared import constants as C

#: Pairs of shard 0 shown in the grid.
GRID_PAIRS = 4
METRICS = ("psnr_rgb", "ssim_rgb", "psnr_ir", "ssim_ir", "vae_psnr_rgb", "vae_psnr_ir", "latent_err_rgb",
           "latent_err_ir", "latent_rel_rgb", "latent_rel_ir")


@dataclass(frozen=True)
class ReconstructOptions:
    latents: str = option(None, "id of a succeeded invert job", required=True)
    shards: int = option(4, type=int)
    batch_size: int = option(8, type=int)


def plan(settings, o: ReconstructOptions) -> Plan:
    from kinds.checks import check_positive, check_shards, plan_contiguous
    from shared.errors import UserError
    from shared.store import store

    inv = finished_job(settings, o.latents, "invert", "--latents")
    pairs = store(settings).kept_pairs(inv.id)
    if not pairs:
        raise UserError(f"invert job {inv.id} kept no pairs: there is nothing to reconstruct")
    check_shards(o.shards, len(pairs))
    check_positive("--batch-size", o.batch_size)
    items = [{"pair_id": pid, "split": split, "rgb_path": rgb, "ir_path": ir, "shard_index": shard}
             for shard, (a, b) in enumerate(plan_contiguous(len(pairs), o.shards))
             for pid, split, rgb, ir in pairs[a:b]]
    spec = {"latents": inv.id, "model": inv.spec["model"], "inversion": inv.spec["inversion"],
            "precision": inv.spec.get("precision", "auto"), "batch_size": o.batch_size, "pairs": len(pairs)}
    return Plan(spec, o.shards, items, lineage=[("job", inv.id, "latents"), ("model", inv.spec["model"], "sd")])


def describe(data: Any) -> str:
    sp, m = data.job.get("spec") or {}, data.summary
    inv = sp.get("inversion", {})
    return (f"Reconstructed the {fmt(m.get('pairs', sp.get('pairs')))} pairs of invert job {sp.get('latents')} by "
            f"DDIM-denoising z_t (t = {inv.get('t_end')}, {inv.get('steps')}-step schedule) back to t = 0 in "
            f"{data.job['shards_total']} shards: PSNR {fmt(m.get('psnr_rgb'))} dB RGB / {fmt(m.get('psnr_ir'))} dB "
            f"IR (the VAE alone: {fmt(m.get('vae_psnr_rgb'))} / {fmt(m.get('vae_psnr_ir'))} dB), SSIM "
            f"{fmt(m.get('ssim_rgb'))} / {fmt(m.get('ssim_ir'))}, latent error {fmt(m.get('latent_rel_rgb'))} / "
            f"{fmt(m.get('latent_rel_ir'))} of mean |z_0|.")


# -- worker side (imported only by the worker that runs a shard) ----------------------------------------------------


def reconstruct_work(ctx):
    import torch

    from shared.storage import input_path
    from workers.device import pick_device
    from workers.ml.image_metrics import psnr_ssim
    from workers.ml.inversion import InversionConfig, decode, denoise
    from workers.ml.m3fd import Pair, load_image_pair
    from workers.ml.translator_eval import image_grid
    from workers.recording import record_artifact, record_metrics
    from workers.runner import ShardOutput
    from workers.tasks.evaluate import shard_latent_rows, stack_latents
    from workers.tasks.invert import load_sd_cached

    spec = ctx.spec
    cfg = InversionConfig(**spec["inversion"])
    rows = shard_latent_rows(ctx)
    device = pick_device(spec.get("device", "auto"))
    parts, _ = load_sd_cached(spec["model"], device, spec.get("precision", "auto"))
    bs = int(spec.get("batch_size", 8))
    per_item: list[tuple[str, float, int, str]] = []
    grid: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for start in range(0, len(rows), bs):
        ctx.check()
        batch = rows[start : start + bs]
        z = stack_latents(ctx, batch, ("z_rgb_0", "z_ir_0", "z_rgb_t", "z_ir_t"))
        values: dict[str, torch.Tensor] = {}
        images = [load_image_pair(Pair(p, input_path(rgb), input_path(ir)), cfg.size, cfg.resize_to)
                  for p, rgb, ir, _, _ in batch]
        for side, prompt, target in (("rgb", cfg.prompt_rgb, torch.stack([(x[0] + 1) / 2 for x in images])),
                                     ("ir", cfg.prompt_ir, torch.stack([x[2] for x in images]))):
            z0 = z[f"z_{side}_0"]
            z0_rec = denoise(parts, z[f"z_{side}_t"], prompt, cfg).cpu()  # t_end -> 0, same grid and prompt
            rec = decode(parts, z0_rec, max_batch=bs).cpu()  # (B, 3, H, W) in [0, 1]
            vae = decode(parts, z0, max_batch=bs).cpu()
            target = target.clamp(0, 1)
            values[f"psnr_{side}"], values[f"ssim_{side}"] = psnr_ssim(rec, target)
            values[f"vae_psnr_{side}"], _ = psnr_ssim(vae, target)
            err = (z0_rec - z0).abs().flatten(1).mean(1)
            values[f"latent_err_{side}"] = err
            values[f"latent_rel_{side}"] = err / z0.abs().flatten(1).mean(1).clamp_min(1e-12)
            values[f"_rec_{side}"], values[f"_in_{side}"] = rec, target
        for j, (pid, *_rest) in enumerate(batch):
            per_item += [(name, float(values[name][j]), C.SUMMARY_STEP, pid) for name in METRICS]
            if ctx.index == 0 and len(grid) < 4 * GRID_PAIRS:
                grid += [values["_in_rgb"][j], values["_rec_rgb"][j], values["_in_ir"][j], values["_rec_ir"][j]]
        ctx.progress(start + len(batch), len(rows), unit="pairs")
    stored = None
    if grid:
        import cv2

        img = image_grid(grid, ncols=4)  # (H, W, 3) uint8 RGB
        ok, buf = cv2.imencode(".png", img[:, :, ::-1].copy())
        if not ok:
            raise RuntimeError("PNG encoding failed")
        stored = ctx.storage.write_bytes(f"jobs/{ctx.job_id}/grid-input-reconstruction.png", buf.tobytes())

    def record(s) -> None:
        record_metrics(s, ctx.job_id, per_item, ctx.index)
        if stored is not None:
            record_artifact(s, ctx.job_id, ctx.index, C.ARTIFACT_IMAGE, stored,
                            {"what": "input RGB | reconstruction | input IR | reconstruction",
                             "pairs": len(grid) // 4})

    return ShardOutput(record, {"pairs": len(rows), "seconds": round(time.perf_counter() - t0, 3),
                                "pid": os.getpid(), "device": device})


def finalize(s, job) -> None:
    """Summary: the mean over pairs of every per-pair metric, and the number of pairs."""
    from workers.recording import record_item_means

    record_item_means(s, job.id)


KIND = Kind(
    name="reconstruct",
    help="DDIM-denoise an invert job's z_t back to t = 0 and measure how faithful the inversion is",
    options=ReconstructOptions, plan=plan, describe=describe,
    queue=C.QUEUE_GPU, task="reconstruct.shard",
    work="kinds.reconstruct:reconstruct_work", finalize="kinds.reconstruct:finalize",
    results="item_metrics", pictures=("images",),
)
