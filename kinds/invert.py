"""invert: encode M3FD pairs with the SD VAE and DDIM-invert both latents to t, sharded over GPU workers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kinds.base import Kind, Plan, fmt, option
from shared import constants as C

#: Images sampled (evenly over the dataset) to learn their size.
SIZE_SAMPLES = 8


@dataclass(frozen=True)
class InvertOptions:
    data: str = option(None, "M3FD folder (flat Vis/ Ir/ or the scene tree)", required=True)
    model: str = option(None, "local diffusers SD folder or hub id in the offline cache", required=True)
    shards: int = option(16, type=int)
    t: int | None = option(None, "inversion end timestep (default: the preset's, 400)", type=int)
    steps: int | None = option(None, "schedule granularity over 1000 steps (readme: 50)", type=int)
    size: int | None = option(None, "centre-crop side in pixels (readme: 512)", type=int)
    batch_size: int = option(8, type=int)
    preset: str = option("readme", choices=("readme", "seed-code"))
    split_seed: int = option(42, type=int)
    test_fraction: float = option(0.2, type=float)
    precision: str = option("auto", choices=("auto", "fp32", "fp16", "bf16"))
    seed: int = option(0, "seed of latent sampling (seed-code preset)", type=int)
    skip_bad: bool = option(False, "skip pairs with unreadable or mismatched images (recorded in the DB) instead of "
                            "failing", flag=True)


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
    from kinds.checks import plan_contiguous

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


def plan(settings, o: InvertOptions) -> Plan:
    from kinds.checks import check_pairs, check_positive, check_shards, plan_contiguous
    from shared.storage import input_path
    from workers.ml import m3fd, sd
    from workers.ml.inversion import make_config

    data = input_path(o.data).expanduser()  # a local folder or s3://bucket/prefix
    refused: list[tuple[str, str, str]] = []  # non-regular image entries, collected under --skip-bad
    # UserError: empty or system path, missing folder, layout, missing IR partner, non-regular entry, no pairs
    pairs = m3fd.find_pairs(o.data, refused if o.skip_bad else None)
    check_shards(o.shards, len(pairs))
    check_positive("--batch-size", o.batch_size)
    overrides = {k: v for k, v in {"t_end": o.t, "steps": o.steps, "size": o.size}.items() if v is not None}
    cfg = make_config(o.preset, **overrides)  # UserError: t not on the schedule, bad steps/size
    sd.check_model(o.model)  # UserError: unknown path or id not in the offline cache
    pairs, skipped = check_pairs(pairs, o.skip_bad)  # UserError naming a bad file, unless --skip-bad
    skipped = refused + skipped
    check_shards(o.shards, len(pairs))
    split = m3fd.split_pairs([p.pair_id for p in pairs], seed=o.split_seed, test_fraction=o.test_fraction)
    items = []
    for shard, (a, b) in enumerate(plan_contiguous(len(pairs), o.shards)):
        for p in pairs[a:b]:
            items.append({"pair_id": p.pair_id, "split": split[p.pair_id], "rgb_path": str(p.rgb.resolve()),
                          "ir_path": str(p.ir.resolve()), "shard_index": shard})
    spec = {
        "data": str(data.resolve()), "model": o.model, "preset": o.preset, "inversion": asdict(cfg),
        "batch_size": o.batch_size, "split_seed": o.split_seed, "test_fraction": o.test_fraction,
        "split_rule": "workers.ml.m3fd.split_pairs(sorted pair ids, split_seed, test_fraction)",
        "skip_bad": o.skip_bad, "skipped_at_submit": len(skipped), "precision": o.precision, "seed": o.seed,
        "pairs": len(pairs),
    }
    warning = upscale_warning(image_sizes(pairs), cfg.size)
    return Plan(spec, o.shards, items,
                lineage=[("data", spec["data"], "pairs"), ("model", o.model, "sd")],
                rejections=[("skipped_input", f, reason) for _pid, f, reason in skipped],
                notes=[warning] if warning else [],
                summary=format_invert_plan(invert_plan(len(pairs), o.shards, o.batch_size, cfg)))


def describe(data: Any) -> str:
    sp, m, n = data.job.get("spec") or {}, data.summary, data.job["shards_total"]
    inv = sp.get("inversion", {})
    return (f"Encoded {fmt(m.get('pairs', sp.get('pairs')))} M3FD pairs ({fmt(m.get('pairs_train'))} train / "
            f"{fmt(m.get('pairs_test'))} test) from {sp.get('data')} with the VAE of {sp.get('model')} "
            f"({inv.get('latent')} latents of {inv.get('size')} px crops) and DDIM-inverted RGB and IR latents "
            f"to t = {inv.get('t_end')} ({inv.get('steps')}-step schedule), in {n} shards.")


KIND = Kind(
    name="invert",
    help="encode M3FD pairs with the SD VAE and DDIM-invert both latents to t",
    options=InvertOptions, plan=plan, describe=describe,
    queue=C.QUEUE_GPU, task="invert.shard",
    work="workers.tasks.invert:invert_work", finalize="workers.tasks.invert:finalize_invert",
    results="pairs", pictures=("invert_examples", "images"),
)
