"""Evaluation of a latent translator f_theta: z^RGB_t -> z^IR_t on test pairs, under two protocols.

For each test pair the prediction f_theta(z^RGB_t), the ground truth z^IR_t and a trivial baseline (z^RGB_t taken
as the prediction) are DDIM-denoised from t_end back to 0 with the IR prompt and decoded by the VAE. Then:

- honest protocol: prediction vs the real infrared pixels (``psnr``, ``ssim``);
- seed protocol (docs/background.md s.1): prediction vs the ground truth's own round trip decode(denoise(z^IR_t)),
  which is what the seed project reported as 19.07 dB / 0.7083 (``psnr_seed_protocol``, ``ssim_seed_protocol``);
- the baseline under both (``psnr_baseline``, ``ssim_baseline`` vs real IR; ``*_baseline_seed_protocol`` vs the
  round trip), so a translator's number can be read against "copy the RGB latent".

The round trip alone (VAE + inversion + denoising) loses detail, so the seed protocol is always more flattering.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from workers.ml.image_metrics import psnr_ssim
from workers.ml.inversion import InversionConfig, decode, denoise
from workers.ml.sd import SDParts


def evaluate_batch(
    parts: SDParts,
    predict: Callable[[torch.Tensor], torch.Tensor],
    z_rgb_t: torch.Tensor,
    z_ir_t: torch.Tensor,
    ir01: torch.Tensor,
    cfg: InversionConfig,
) -> dict[str, torch.Tensor]:
    """Metrics of one batch of test pairs; every value is a CPU float32 (B,) tensor except ``pred_images``.

    ``predict`` receives z_rgb_t as (B, 4, h, w) float32 on parts.device (inside torch.inference_mode) and
    returns the predicted z_ir_t of the same shape. ``ir01`` (B, 3, H, W) in [0, 1] are the real IR pixels
    (``load_image_pair``'s third output); if their size differs from the decoded images (8h x 8w) they are
    resized to it with antialiased bilinear interpolation. Prediction, ground truth and baseline are denoised
    together as one batch of 3B with ``cfg.prompt_ir``.

    Keys: psnr, ssim, psnr_seed_protocol, ssim_seed_protocol, psnr_baseline, ssim_baseline,
    psnr_baseline_seed_protocol, ssim_baseline_seed_protocol, and pred_images (B, 3, 8h, 8w) float32 in [0, 1].
    """
    b = z_rgb_t.shape[0]
    if z_ir_t.shape != z_rgb_t.shape or ir01.shape[0] != b:
        raise ValueError(
            f"batch shapes differ: z_rgb_t {tuple(z_rgb_t.shape)}, z_ir_t {tuple(z_ir_t.shape)}, ir01 {tuple(ir01.shape)}"
        )
    z_rgb_t = z_rgb_t.to(parts.device, torch.float32)
    z_ir_t = z_ir_t.to(parts.device, torch.float32)
    with torch.inference_mode():
        pred_t = predict(z_rgb_t).float()
        if pred_t.shape != z_rgb_t.shape:
            raise ValueError(f"predictor returned {tuple(pred_t.shape)}, expected {tuple(z_rgb_t.shape)}")
        zs = torch.cat([pred_t, z_ir_t, z_rgb_t])  # (3B, 4, h, w)
        z0 = denoise(parts, zs, cfg.prompt_ir, cfg)
        images = decode(parts, z0, max_batch=b).cpu()  # (3B, 3, H, W)
    pred_img, truth_rt, base_img = images.split(b)

    target = ir01.detach().to("cpu", torch.float32)
    if target.shape[-2:] != pred_img.shape[-2:]:
        target = F.interpolate(
            target, size=pred_img.shape[-2:], mode="bilinear", antialias=True, align_corners=False
        )
    target = target.clamp(0.0, 1.0)

    out: dict[str, torch.Tensor] = {}
    for name, (pred, ref) in {
        "": (pred_img, target),
        "_seed_protocol": (pred_img, truth_rt),
        "_baseline": (base_img, target),
        "_baseline_seed_protocol": (base_img, truth_rt),
    }.items():
        psnr, ssim = psnr_ssim(pred, ref)
        out[f"psnr{name}"], out[f"ssim{name}"] = psnr, ssim
    out["pred_images"] = pred_img.clone()
    return out


def image_grid(rows: Sequence[torch.Tensor], ncols: int = 3, pad: int = 2) -> np.ndarray:
    """Tile images (each (3, H, W) or (1, H, W) float in [0, 1], all the same size) into an (H', W', 3) uint8 grid.

    Images fill the grid row by row, ``ncols`` per row (e.g. RGB | predicted IR | real IR), separated by
    ``pad`` white pixels; missing cells at the end stay white.
    """
    if not rows:
        raise ValueError("image_grid needs at least one image")
    imgs = []
    for img in rows:
        x = img.detach().to("cpu", torch.float32)
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"image_grid expects (3, H, W) or (1, H, W) images, got {tuple(x.shape)}")
        x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
        imgs.append(np.rint(x.clamp(0.0, 1.0).numpy().transpose(1, 2, 0) * 255.0).astype(np.uint8))
    h, w = imgs[0].shape[:2]
    if any(i.shape[:2] != (h, w) for i in imgs):
        raise ValueError("image_grid needs images of one size")
    nrows = -(-len(imgs) // ncols)
    grid = np.full((nrows * h + (nrows + 1) * pad, ncols * w + (ncols + 1) * pad, 3), 255, dtype=np.uint8)
    for k, img in enumerate(imgs):
        r, c = divmod(k, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid
