"""Inversion throughput: the worker's batched path vs the seed's approach vs a plain per-image diffusers loop, and
data loading overlapped with compute.

    python -m benchmarks.inversion                   # CPU: tiny SD model (same classes as SD), 64 px
    python -m benchmarks.inversion --quick
    python -m benchmarks.inversion --gpu             # CUDA: SD v1-4 architecture (random weights), 512 px

CPU columns (same tiny model, same 64 px images; images/s counts RGB and IR images separately):

- ``worker batched``: ``workers.ml.inversion.invert_pairs`` on B pairs at once (RGB and IR as one batch of 2B,
  one U-Net call per timestep), the "readme" schedule (20 U-Net calls to t = 400);
- ``plain diffusers loop``: the same 20-step inversion written the obvious way, one image at a time with
  diffusers' DDIMInverseScheduler;
- ``seed approach``: one image at a time, 399 single DDIM steps (the "seed-code" schedule, what the seed ran).

``load+invert`` rows also read M3FD-sized files (1024x768 PNGs) and centre-crop them: sequentially (decode, then
compute) and overlapped (a thread pool decodes and crops the next batches while the current one computes);
``busy`` is the fraction of wall time spent computing (on a GPU, measured with CUDA events).

GPU (``--gpu``; prints "no GPU" and exits 0 without one): an SD v1-4 U-Net and VAE of the real architecture with
random weights (same FLOPs as the real model) at 512 px, the "readme" schedule; bf16, channels-last, SDPA (diffusers'
default attention on torch 2), optionally torch.compile; a batch-size sweep; images/s and the fraction of the GPU's
peak dense bf16 throughput, from FLOPs counted with torch.utils.flop_counter (docs/background.md s.7: ~18 TFLOP per image,
~55 img/s on an H100 at 100%).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks._common import Timer, emit, header
from workers.ml.prefetch import prefetched

#: Dense bf16 tensor-core peak (FLOP/s) by device-name fragment, from the vendors' data sheets (no sparsity).
PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12,
    "RTX 4090": 165e12, "RTX 6000 Ada": 364e12, "V100": 125e12,
}

#: CompVis/stable-diffusion-v1-4 unet/config.json and vae/config.json (architecture only; weights are random).
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD14_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


# -- data -----------------------------------------------------------------------------------------------------------


def pair_batches(data: Path, size: int, batch: int, limit: int | None = None) -> list[list]:
    from workers.ml.m3fd import find_pairs

    pairs = find_pairs(data)[:limit]
    return [pairs[i : i + batch] for i in range(0, len(pairs), batch)]


def load_batch(pairs: Sequence, size: int, pin: bool = False):
    """Decode and centre-crop a batch of pairs: (rgb, ir), each (B, 3, size, size) in [-1, 1]."""
    import torch

    from workers.ml.m3fd import load_image_pair

    loaded = [load_image_pair(p, size) for p in pairs]
    rgb, ir = torch.stack([x[0] for x in loaded]), torch.stack([x[1] for x in loaded])
    if pin:
        rgb, ir = rgb.pin_memory(), ir.pin_memory()
    return rgb, ir


# -- the compared implementations -----------------------------------------------------------------------------------


def plain_diffusers_invert(parts, image, cfg):
    """The obvious per-image loop: encode one image, then step diffusers' DDIMInverseScheduler to t_end."""
    import torch
    from diffusers import DDIMInverseScheduler

    from workers.ml.sd import encode_prompt

    sched = DDIMInverseScheduler.from_config({**parts.scheduler_config, "clip_sample": False,
                                              "set_alpha_to_one": False, "steps_offset": 0})
    sched.set_timesteps(cfg.steps)
    emb = encode_prompt(parts, cfg.prompt_rgb)
    with torch.no_grad():
        z = parts.vae.encode(image[None].to(parts.device, parts.dtype)).latent_dist.mean * parts.scaling_factor
        for t in sched.timesteps:
            if 0 < int(t) <= cfg.t_end:
                eps = parts.unet(z, t, encoder_hidden_states=emb).sample
                z = sched.step(eps, t, z).prev_sample
    return z


def run_batched(parts, batches, cfg) -> float:
    from workers.ml.inversion import invert_pairs

    with Timer() as t:
        for rgb, ir in batches:
            invert_pairs(parts, rgb, ir, cfg)
    return t.s


def run_per_image(parts, images, fn) -> float:
    with Timer() as t:
        for x in images:
            fn(x)
    return t.s


def run_loading(parts, data: Path, size: int, batch: int, cfg, overlap: bool, cuda: bool,
                limit: int | None = None) -> tuple[float, float, int]:
    """Decode + invert every pair under ``data``: (wall s, busy fraction, pairs)."""
    import torch

    from workers.ml.inversion import invert_pairs

    batches = pair_batches(data, size, batch, limit)
    n = sum(len(b) for b in batches)

    def load(b):
        return load_batch(b, size, pin=cuda)

    source = prefetched(batches, load) if overlap else (load(b) for b in batches)
    busy = 0.0
    with Timer() as t:
        for rgb, ir in source:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                invert_pairs(parts, rgb, ir, cfg)  # returns CPU tensors: synchronises
                end.record()
                end.synchronize()
                busy += start.elapsed_time(end) / 1e3
            else:
                c0 = time.perf_counter()
                invert_pairs(parts, rgb, ir, cfg)
                busy += time.perf_counter() - c0
    return t.s, busy / t.s, n


# -- CPU ------------------------------------------------------------------------------------------------------------


def cpu_main(args) -> list[dict]:
    import torch

    from workers.fixtures.m3fd import write_synthetic
    from workers.fixtures.tiny_sd import write_tiny_sd
    from workers.ml.inversion import make_config
    from workers.ml.sd import load_sd

    torch.set_num_threads(1)
    size, batch = 64, args.batch or 8
    n_pairs = args.pairs or (8 if args.quick else 32)
    n_seed = 1 if args.quick else 4
    rows = []
    with tempfile.TemporaryDirectory(prefix="orch-bench-inv-") as tmp:
        model = write_tiny_sd(Path(tmp) / "tiny-sd")
        data = Path(tmp) / "m3fd"
        write_synthetic(data, n_pairs, width=128, height=96)
        parts = load_sd(str(model))
        readme = make_config("readme", size=size)
        seed = make_config("seed-code", size=size, resize_to=None)
        loaded = [load_batch(b, size) for b in pair_batches(data, size, batch)]
        images = [x for rgb, ir in loaded for pair in zip(rgb, ir, strict=True) for x in pair]
        run_batched(parts, loaded[:1], readme)  # warm-up
        t = run_batched(parts, loaded, readme)
        rows.append({"path": f"worker batched (B={batch} pairs)", "unet_calls_per_image": 20, "images": 2 * n_pairs,
                     "seconds": round(t, 3), "images_per_s": round(2 * n_pairs / t, 2)})
        t = run_per_image(parts, images, lambda x: plain_diffusers_invert(parts, x, readme))
        rows.append({"path": "plain diffusers loop (B=1)", "unet_calls_per_image": 20, "images": len(images),
                     "seconds": round(t, 3), "images_per_s": round(len(images) / t, 2)})
        from workers.ml.inversion import _embeddings, _invert, encode

        def seed_one(x):
            z0 = encode(parts, x[None], "sample", torch.Generator().manual_seed(0))
            return _invert(parts, z0, _embeddings(parts, seed.prompt_rgb, 1), seed)

        t = run_per_image(parts, images[:n_seed], seed_one)
        rows.append({"path": "seed approach (B=1, 399 steps)", "unet_calls_per_image": 399, "images": n_seed,
                     "seconds": round(t, 3), "images_per_s": round(n_seed / t, 3)})
        base = rows[0]["images_per_s"]
        for r in rows:
            r["x_vs_batched"] = round(r["images_per_s"] / base, 3)
        # M3FD-sized files (1024x768 PNGs): decoding them is real work beside a 64 px inversion
        big = Path(tmp) / "m3fd-1024"
        write_synthetic(big, n_pairs, width=1024, height=768)
        for overlap in (False, True):
            wall, busy, n = run_loading(parts, big, size, batch, readme, overlap, cuda=False)
            rows.append({"path": f"load+invert, {'overlapped' if overlap else 'sequential'}", "images": 2 * n,
                         "seconds": round(wall, 3), "images_per_s": round(2 * n / wall, 2), "busy": round(busy, 3)})
    return rows


# -- GPU ------------------------------------------------------------------------------------------------------------


def sd14_parts(device: str = "cuda", channels_last: bool = True):
    """SDParts of an SD v1-4-shaped U-Net and VAE with random weights in bf16; the (empty) prompt's embedding is a
    fixed random (1, 77, 768) tensor, so no text encoder is needed (it runs once per prompt in the worker)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from workers.ml.sd import SD1_SCHEDULER, SDParts

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD14_UNET).to(torch.bfloat16).eval().requires_grad_(False)
        vae = AutoencoderKL(**SD14_VAE).to(torch.bfloat16).eval().requires_grad_(False)
    if channels_last:
        unet, vae = unet.to(memory_format=torch.channels_last), vae.to(memory_format=torch.channels_last)
    parts = SDParts(vae, unet, None, None, dict(SD1_SCHEDULER), torch.device(device), torch.bfloat16)
    parts.prompt_cache[""] = torch.randn(1, 77, 768, device=device, dtype=torch.bfloat16)
    return parts


def flops_per_image(parts, cfg) -> float:
    """FLOPs of inverting one image (encode + every U-Net call), counted by torch.utils.flop_counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from workers.ml.inversion import invert_pairs

    x = torch.zeros(1, 3, cfg.size, cfg.size)
    with FlopCounterMode(display=False) as fc:
        invert_pairs(parts, x, x, cfg)
    return fc.get_total_flops() / 2.0


def gpu_throughput(parts, cfg, batch: int, iters: int) -> float:
    """images/s of invert_pairs on ``batch`` pairs (2 * batch images) of random pixels, after one warm-up batch."""
    import torch

    from workers.ml.inversion import invert_pairs

    x = torch.rand(batch, 3, cfg.size, cfg.size) * 2 - 1
    invert_pairs(parts, x, x, cfg)
    torch.cuda.synchronize()
    with Timer() as t:
        for _ in range(iters):
            invert_pairs(parts, x, x, cfg)
        torch.cuda.synchronize()
    return 2 * batch * iters / t.s


def gpu_main(args) -> list[dict]:
    import torch

    from workers.fixtures.m3fd import write_synthetic
    from workers.ml.inversion import make_config

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    cfg = make_config("readme")  # 512 px, 20 U-Net calls to t = 400
    rows: list[dict] = []
    parts = sd14_parts(channels_last=False)
    flops = flops_per_image(parts, cfg)
    print(f"# {name}: {flops / 1e12:.1f} TFLOP per image (encode + 20 U-Net calls); peak bf16 "
          f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}", flush=True)

    def row(variant: str, batch: int, ips: float) -> dict:
        achieved = ips * flops
        r = {"variant": variant, "batch_pairs": batch, "images_per_s": round(ips, 2),
             "TFLOP_s": round(achieved / 1e12, 1), "fraction_of_peak": None if peak is None else round(achieved / peak, 3)}
        print(f"  {variant:<34} B={batch:<3} {ips:8.2f} img/s", flush=True)
        return r

    batches = [int(b) for b in args.gpu_batches.split(",")]
    iters = 2 if args.quick else 4
    rows.append(row("bf16 eager", batches[0], gpu_throughput(parts, cfg, batches[0], iters)))
    parts = sd14_parts(channels_last=True)
    best = (0.0, batches[0])
    for b in batches:
        try:
            ips = gpu_throughput(parts, cfg, b, iters)
        except torch.OutOfMemoryError:
            print(f"  B={b}: out of memory", flush=True)
            torch.cuda.empty_cache()
            break
        rows.append(row("bf16 channels-last", b, ips))
        best = max(best, (ips, b))
    if not args.no_compile:
        b = best[1]
        for mode in [m for m in args.compile_modes.split(",") if m]:
            try:
                compiled = sd14_parts(channels_last=True)
                compiled.unet = torch.compile(compiled.unet, mode=mode, fullgraph=False, dynamic=False)
                with Timer() as tc:
                    gpu_throughput(compiled, cfg, b, 1)  # compiles
                print(f"  (torch.compile mode={mode}: {tc.s:.0f} s to compile)", flush=True)
                rows.append(row(f"bf16 channels-last compile={mode}", b, gpu_throughput(compiled, cfg, b, iters)))
            except Exception as e:  # a compiler failure must not cost the other figures
                print(f"  torch.compile mode={mode} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    b = best[1]
    with tempfile.TemporaryDirectory(prefix="orch-bench-inv-") as tmp:
        data = Path(tmp) / "m3fd"
        n = b * (3 if args.quick else 6)
        write_synthetic(data, n, width=1024, height=768)  # M3FD's size: decode + crop cost like the real data
        for overlap in (False, True):
            wall, busy, npairs = run_loading(parts, data, cfg.size, b, cfg, overlap, cuda=True)
            r = row(f"load+invert {'overlapped' if overlap else 'sequential'}", b, 2 * npairs / wall)
            r["gpu_busy"] = round(busy, 3)
            rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the CUDA benchmark (SD v1-4 architecture, 512 px)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=None, help="pairs per batch on CPU (default 8)")
    p.add_argument("--pairs", type=int, default=None, help="pairs on CPU (default 32; --quick 8)")
    p.add_argument("--gpu-batches", default="8,16,32", help="pairs per batch to sweep on the GPU")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants on the GPU")
    p.add_argument("--compile-modes", default="default",
                   help="torch.compile modes to try, comma-separated (max-autotune modes take minutes)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    header("inversion")
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("no GPU")
            return 0
        emit("inversion on the GPU: SD v1-4 architecture (random weights), 512 px, 20 steps to t=400",
             gpu_main(args), json_path=args.json)
        return 0
    emit("inversion on CPU: tiny SD model, 64 px (images/s counts RGB and IR separately)", cpu_main(args),
         json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
