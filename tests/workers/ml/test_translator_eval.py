"""Per-image PSNR/SSIM, the translator evaluation under both protocols, and the image grid."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.ml.image_metrics import psnr_ssim
from workers.ml.inversion import invert_pairs, make_config
from workers.ml.m3fd import find_pairs, load_image_pair
from workers.ml.sd import SDParts
from workers.ml.translator_eval import evaluate_batch, image_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def test_psnr_is_per_image_and_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 16, 16, generator=g)
    scales = torch.tensor([0.01, 0.05, 0.2]).reshape(3, 1, 1, 1)
    pred = (target + scales * torch.randn(3, 3, 16, 16, generator=g)).clamp(0, 1)
    psnr, ssim = psnr_ssim(pred, target)
    assert psnr.shape == (3,) and ssim.shape == (3,)
    for i in range(3):
        mse = float(((pred[i] - target[i]) ** 2).mean())
        assert psnr[i].item() == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-5)
    assert psnr[0] > psnr[1] > psnr[2] and ssim[0] > ssim[1] > ssim[2]
    # not the pooled batch PSNR (REFERENCE s.5): the mean of per-image values differs from it
    pooled = 10 * math.log10(1.0 / float(((pred - target) ** 2).mean()))
    assert abs(psnr.mean().item() - pooled) > 1.0


def test_identical_images_have_ssim_one() -> None:
    x = torch.rand(2, 3, 32, 32)
    psnr, ssim = psnr_ssim(x, x.clone())
    assert torch.isinf(psnr).all()
    assert torch.allclose(ssim, torch.ones(2), atol=1e-6)


def _latents(tiny_sd: SDParts, m3fd_dir: Path, cfg):
    pairs = find_pairs(m3fd_dir)[:3]
    rgb, ir, ir01 = (torch.stack(x) for x in zip(*(load_image_pair(p, 96, 64) for p in pairs), strict=True))
    out = invert_pairs(tiny_sd, rgb, ir, cfg)
    return out, ir01, rgb


def test_identity_predictor_is_perfect_under_the_seed_protocol(tiny_sd: SDParts, m3fd_dir: Path) -> None:
    cfg = make_config("seed-code", size=96, resize_to=64, steps=10, t_end=200)
    lat, ir01, _ = _latents(tiny_sd, m3fd_dir, cfg)
    z_ir_t = lat["z_ir_t"]
    res = evaluate_batch(tiny_sd, lambda z: z_ir_t.to(z.device), lat["z_rgb_t"], z_ir_t, ir01, cfg)
    keys = {"psnr", "ssim", "psnr_seed_protocol", "ssim_seed_protocol", "psnr_baseline", "ssim_baseline"}
    assert keys | {"psnr_baseline_seed_protocol", "ssim_baseline_seed_protocol", "pred_images"} == set(res)
    for k, v in res.items():
        if k != "pred_images":
            assert v.shape == (3,) and v.dtype == torch.float32 and v.device.type == "cpu", k
    pred = res["pred_images"]
    assert pred.shape == (3, 3, 64, 64) and pred.min() >= 0 and pred.max() <= 1
    # prediction == ground truth latent, so its round trip equals the ground truth's round trip
    assert (res["psnr_seed_protocol"] > 80).all()
    assert torch.allclose(res["ssim_seed_protocol"], torch.ones(3), atol=1e-4)
    assert (res["psnr_seed_protocol"] > res["psnr_baseline_seed_protocol"]).all()
    assert (res["ssim_seed_protocol"] > res["ssim_baseline_seed_protocol"]).all()
    # the honest protocol compares with the real pixels
    psnr, ssim = psnr_ssim(pred, ir01)
    assert torch.allclose(res["psnr"], psnr) and torch.allclose(res["ssim"], ssim)
    assert torch.isfinite(res["psnr"]).all() and torch.isfinite(res["psnr_baseline"]).all()


def test_real_ir_is_resized_to_the_decoded_size(tiny_sd: SDParts, m3fd_dir: Path) -> None:
    cfg = make_config("readme", size=64, steps=10, t_end=100)
    lat, ir01, _ = _latents(tiny_sd, m3fd_dir, cfg)
    big = F.interpolate(ir01, size=(128, 128), mode="nearest")  # same content at twice the resolution
    res_big = evaluate_batch(tiny_sd, lambda z: z, lat["z_rgb_t"], lat["z_ir_t"], big, cfg)
    res = evaluate_batch(tiny_sd, lambda z: z, lat["z_rgb_t"], lat["z_ir_t"], ir01, cfg)
    assert torch.allclose(res_big["psnr"], res["psnr"], atol=0.5)
    # predicting the RGB latent is exactly the baseline
    assert torch.allclose(res["psnr"], res["psnr_baseline"]) and torch.allclose(
        res["ssim"], res["ssim_baseline"]
    )


def test_image_grid_layout() -> None:
    red = torch.zeros(3, 4, 5)
    red[0] = 1.0
    grey = torch.full((1, 4, 5), 0.5)
    grid = image_grid([red, grey, red, grey], ncols=3, pad=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 4 + 3 * 2, 3 * 5 + 4 * 2, 3)
    assert (grid[2:6, 2:7] == [255, 0, 0]).all()
    assert (grid[2:6, 9:14] == 128).all()
    assert (grid[2:6, 16:21] == [255, 0, 0]).all()  # row by row: the third image ends the first row
    assert (grid[8:12, 2:7] == 128).all()
    assert (grid[8:12, 9:14] == 255).all() and (grid[:2] == 255).all()  # empty cells and padding are white
    with pytest.raises(ValueError):
        image_grid([red, torch.zeros(3, 2, 2)])
