"""What a submission will cost, said before it runs: the invert plan line and the upscaling warning."""

from __future__ import annotations

import sys
from typing import Any

#: Images sampled (evenly over the dataset) to learn their size.
SIZE_SAMPLES = 8


def image_sizes(pairs: list, samples: int = SIZE_SAMPLES) -> list[tuple[int, int]]:
    """(width, height) of up to `samples` RGB images spread over `pairs` (unreadable ones are left out)."""
    import cv2

    step = max(1, len(pairs) // samples)
    out = []
    for p in pairs[::step][:samples]:
        img = cv2.imread(str(p.rgb), cv2.IMREAD_UNCHANGED)
        if img is not None:
            out.append((int(img.shape[1]), int(img.shape[0])))
    return out


def upscale_warning(sizes: list[tuple[int, int]], size: int) -> str | None:
    """One line when the smallest image's short side is below the crop side `size`, else None.

    Such images are scaled up before the crop (workers.ml.m3fd.load_image_pair): no detail is added, and the VAE and
    the U-Net work on (size / short side)^2 times the pixels, which is what makes a shard of small images slow.
    """
    if not sizes:
        return None
    w, h = min(sizes, key=lambda wh: min(wh))
    short = min(w, h)
    if short >= size:
        return None
    fit = short // 8 * 8  # the VAE needs a multiple of 8
    return (f"warning: images are {w}x{h} px, smaller than --size {size}: each is upscaled {size / short:.1f}x "
            f"({(size / short) ** 2:.0f}x the pixels to encode and invert, no detail added); "
            f"--size {fit} matches them")


def invert_plan(n_pairs: int, shards: int, batch_size: int, cfg: Any) -> dict[str, Any]:
    """Pairs, shards, crop size, U-Net calls per batch and in all (one batched call per timestep per batch)."""
    from orchestrator.validate import plan_contiguous

    per_batch = cfg.t_end // cfg.stride  # the inversion grid stride, 2*stride, ..., t_end
    batches = sum(-(-(b - a) // batch_size) for a, b in plan_contiguous(n_pairs, shards))
    return {"pairs": n_pairs, "shards": shards, "size": cfg.image_size, "crop": cfg.size, "t_end": cfg.t_end,
            "steps": cfg.steps, "unet_calls_per_batch": per_batch, "batches": batches,
            "unet_calls": batches * per_batch, "batch_size": batch_size}


def format_invert_plan(p: dict[str, Any]) -> str:
    lo, hi = p["pairs"] // p["shards"], -(-p["pairs"] // p["shards"])
    each = f"{lo}" if lo == hi else f"{lo}-{hi}"
    resized = f", resized to {p['size']} px" if p["size"] != p["crop"] else ""
    return (f"plan: {p['pairs']} pairs in {p['shards']} shards ({each} each), {p['crop']} px crops{resized}, "
            f"t = {p['t_end']} on a {p['steps']}-step schedule ({p['unet_calls_per_batch']} U-Net calls per batch "
            f"of up to {p['batch_size']} pairs): about {p['unet_calls']} U-Net calls in all")


def say(line: str | None) -> None:
    """A line for the person at the terminal, on stderr: stdout stays the job id (or JSON) that scripts read."""
    if line:
        print(line, file=sys.stderr, flush=True)
