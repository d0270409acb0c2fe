"""Per-image PSNR and SSIM of images in [0, 1] (torchmetrics functional, as the seed project computed them).

Pitfalls avoided (docs/background.md s.5): torchmetrics' PSNR with ``dim=None`` pools the squared error over the whole
batch, which is not the mean of per-image PSNRs; here the error is reduced per image (``dim=(1, 2, 3)``) and
``data_range=1.0`` is given explicitly for both metrics (otherwise it is inferred from the data).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM of ``pred`` against ``target``, both (B, 3, H, W) float in [0, 1].

    PSNR_i = 10 log10(1 / mean((pred_i - target_i)^2)) (+inf for identical images); SSIM with torchmetrics'
    defaults (11x11 Gaussian window, sigma 1.5) and data_range 1. Returns two float32 (B,) tensors on the input's
    device; averaging over a test set is the caller's (the seed averaged per-image values).
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be equal (B, C, H, W) shapes"
        )
    pred = pred.float().clamp(0.0, 1.0)
    target = target.float().clamp(0.0, 1.0)
    psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
    return psnr.float().reshape(-1), ssim.float().reshape(-1)
