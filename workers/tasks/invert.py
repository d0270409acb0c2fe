"""`invert.shard`: encode a shard's M3FD pairs with the SD VAE and DDIM-invert both latents to t."""

from __future__ import annotations

import json
import os
import time

from sqlalchemy.orm import Session

from shared import constants as C
from shared.errors import UserError
from shared.models import Job
from shared.storage import input_path
from shared.store import Store, store
from workers import bookkeeping as bk
from workers.device import cached, pick_device, pick_dtype
from workers.recording import record_artifact, record_metrics
from workers.runner import ShardContext, ShardOutput


def load_sd_cached(model: str, device: str, precision: str):
    from workers.ml.sd import load_sd

    dtype = pick_dtype(device, precision)
    return cached(("sd", model, device, str(dtype)), lambda: load_sd(model, device=device, dtype=dtype))


def invert_work(ctx: ShardContext) -> ShardOutput:
    import torch
    from safetensors.torch import save_file

    from workers.ml.inversion import InversionConfig, inversion_timesteps, invert_pairs
    from workers.ml.m3fd import Pair, load_image_pair
    from workers.ml.prefetch import prefetched
    from workers.ml.sd import is_random_init
    from workers.previews import previews_wanted, write_previews

    spec = ctx.spec
    cfg = InversionConfig(**spec["inversion"])
    shard = store(ctx.settings).shard_pairs(ctx.job_id, ctx.index)
    items, n_previews = shard.pairs, previews_wanted(shard.before)
    device = pick_device(spec.get("device", "auto"))
    parts, hit = load_sd_cached(spec["model"], device, spec.get("precision", "auto"))
    # 'sample' latents draw noise: seeded per (job seed, shard) so a re-run writes the same bytes
    gen = torch.Generator(device=device).manual_seed(int(spec.get("seed", 0)) * 1_000_003 + ctx.index)
    bs = int(spec["batch_size"])
    chunks: dict[str, list] = {}
    kept: list[tuple[str, str, str]] = []
    skipped: list[tuple[str, str, str]] = []
    pin = device.startswith("cuda")

    def load(batch_items: list[tuple[str, str, str]]):
        """Decode and crop one batch (on a prefetch thread): (kept, rgb, ir, skipped)."""
        ok, loaded, bad = [], [], []
        for pid, rgb_path, ir_path in batch_items:
            try:
                pair = Pair(pid, input_path(rgb_path), input_path(ir_path))
                loaded.append(load_image_pair(pair, cfg.size, cfg.resize_to))
                ok.append((pid, rgb_path, ir_path))
            except UserError as e:  # a file that broke after submission (or was never fully decoded there)
                if not spec.get("skip_bad"):
                    raise
                bad.append((pid, rgb_path, str(e)))
        if not ok:
            return ok, None, None, bad
        rgb = torch.stack([x[0] for x in loaded])  # (B, 3, S, S) in [-1, 1]
        ir = torch.stack([x[1] for x in loaded])
        if pin:  # page-locked: the copy to the GPU is asynchronous
            rgb, ir = rgb.pin_memory(), ir.pin_memory()
        return ok, rgb, ir, bad

    # the next batches decode on two threads while this one is inverted (benchmarks/README.md, "Data loading")
    batches = [items[i : i + bs] for i in range(0, len(items), bs)]
    # progress counts U-Net calls (the shard's real work), so it moves inside a batch; each call also checks for
    # a cancel (at most one DB read a second), so a cancelled shard stops within about a second
    per_batch = len(inversion_timesteps(parts.scheduler_config, cfg))
    calls_total = per_batch * len(batches)
    t0 = time.perf_counter()
    loads = prefetched(batches, load, depth=2)
    try:
        for n, (batch, rgb, ir, bad) in enumerate(loads):
            ctx.check()
            skipped += bad
            if not batch:
                continue
            pairs_before = min(n * bs, len(items))

            def on_step(k: int, _calls: int, n: int = n, pairs_before: int = pairs_before) -> None:
                ctx.step(n * per_batch + k, calls_total, unit="unet_calls", pairs_done=pairs_before,
                         pairs=len(items))

            out = invert_pairs(parts, rgb, ir, cfg, generator=gen, on_step=on_step)
            for k, v in out.items():
                chunks.setdefault(k, []).append(v)
            kept += batch
            rate = round(len(kept) / max(time.perf_counter() - t0, 1e-9), 3)
            ctx.progress((n + 1) * per_batch, calls_total, unit="unet_calls",
                         pairs_done=min((n + 1) * bs, len(items)), pairs=len(items), pairs_per_s=rate)
    finally:
        loads.close()
    if not kept:
        raise UserError(f"every pair of shard {ctx.index} has a bad image (first: {skipped[0][2]})")
    tensors = {k: torch.cat(v).contiguous() for k, v in chunks.items()}
    seconds = time.perf_counter() - t0
    pair_ids = [pid for pid, _, _ in kept]
    # one metadata key: safetensors writes a multi-key metadata map in hash order, which would make a re-run's bytes
    # (and so its sha256) differ from the first run's
    meta = {"orchestrator": json.dumps({"job_id": ctx.job_id, "shard": ctx.index, "pair_ids": pair_ids,
                                        "t": cfg.t_end}, sort_keys=True)}
    key = f"jobs/{ctx.job_id}/latents/shard-{ctx.index:05d}.safetensors"
    stored = ctx.storage.write(key, lambda p: save_file(tensors, str(p), metadata=meta))
    previews = write_previews(ctx.storage, ctx.job_id, parts, tensors, pair_ids, n_previews,
                              is_random_init(spec["model"])) if n_previews else []

    def record(s: Session) -> None:
        art_id = record_artifact(
            s, ctx.job_id, ctx.index, C.ARTIFACT_LATENTS, stored,
            {"pairs": len(kept), "keys": sorted(tensors), "shape": list(tensors["z_rgb_t"].shape[1:])},
        )
        for preview, preview_meta in previews:
            record_artifact(s, ctx.job_id, ctx.index, C.ARTIFACT_IMAGE, preview, preview_meta)
        Store.place_pairs(s, ctx.job_id, art_id, pair_ids)
        # a re-run replaces this shard's skip records (its files belong to no other shard) instead of adding to them
        Store.replace_skipped(s, ctx.job_id, ctx.owner, skipped)

    result = {
        "pairs": len(kept),
        "skipped": len(skipped),
        "seconds": round(seconds, 4),
        "pairs_per_s": round(len(kept) / max(seconds, 1e-9), 3),
        "device": device,
        "pid": os.getpid(),
        "model_cache_hit": hit,
        "sha256": stored.sha256,
    }
    return ShardOutput(record, result)


def finalize_invert(s: Session, job: Job) -> None:
    n, n_train, n_skipped = Store.pair_counts(s, job.id)
    results = Store.shard_results(s, job.id)
    busy = sum(float((r or {}).get("seconds", 0.0)) for r in results)
    wall = (bk.utcnow() - bk.aware(job.started_at or job.created_at)).total_seconds()
    record_metrics(
        s,
        job.id,
        {
            "pairs": n,
            "pairs_train": n_train,
            "pairs_test": n - n_train,
            "pairs_skipped": n_skipped,
            "shard_seconds_total": round(busy, 4),
            "wall_seconds": round(wall, 4),
            "pairs_per_second": round(n / max(wall, 1e-9), 4),
        },
    )




