"""How much the SSIM convention moves the number: torchmetrics' whole-map mean vs the valid-window mean.

    python -m benchmarks.ssim_border                 # 64 and 512 px, 8 synthetic M3FD scenes each

torchmetrics' ``structural_similarity_index_measure`` (what workers/ml/image_metrics.py reports) pads both images
by reflection ((11 - 1) / 2 = 5 px for its 11x11 Gaussian window, sigma 1.5) and averages the SSIM map over the
whole image, border included. scikit-image's ``structural_similarity`` averages only the map positions whose
window lies inside the image (it crops (win - 1) / 2 px from every side). Here the valid-window figure is the
same torchmetrics map (``return_full_image=True``) with the 5 px border cropped before averaging: inside the
border the two maps are identical, so only the averaging region differs.

Pairs: the real IR image of a synthetic scene (workers/ml/m3fd.py, centre square) against four predictions of
it: Gaussian noise (sigma 0.1), a blur (Gaussian, sigma 2 px at 64 px, scaled with the size), a 0.15 brightness
shift, and the scene's RGB luminance (what the identity baseline amounts to). Prints mean SSIM per convention.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks._common import machine

WIN = 11
BORDER = (WIN - 1) // 2


def both_ssims(pred, target):
    """(torchmetrics whole-map mean, valid-window mean) per image, for (B, C, H, W) float in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    whole, full = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none",
                                                      return_full_image=True)
    valid = full[..., BORDER:-BORDER, BORDER:-BORDER].mean(dim=(1, 2, 3))
    return whole.reshape(-1), valid


def pairs(size: int, n: int, work: Path):
    """(target IR, {name: prediction}) as (n, 3, size, size) float tensors in [0, 1]."""
    import cv2
    import numpy as np
    import torch

    from workers.fixtures.m3fd import write_synthetic
    from workers.ml.m3fd import find_pairs

    folder = work / f"m3fd-{size}"
    write_synthetic(folder, n, width=size * 4 // 3, height=size, seed=1)
    ir, lum = [], []
    for p in find_pairs(str(folder)):
        x0 = (size * 4 // 3 - size) // 2
        rgb = cv2.cvtColor(cv2.imread(str(p.rgb)), cv2.COLOR_BGR2RGB)[:, x0 : x0 + size].astype(np.float32) / 255
        ir.append(cv2.imread(str(p.ir), cv2.IMREAD_GRAYSCALE)[:, x0 : x0 + size].astype(np.float32) / 255)
        lum.append(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    t = torch.from_numpy(np.stack(ir))[:, None].repeat(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    sigma = 2.0 * size / 64
    k = int(3.5 * sigma + 0.5) * 2 + 1
    blur = torch.from_numpy(np.stack([cv2.GaussianBlur(i, (k, k), sigma) for i in ir]))[:, None].repeat(1, 3, 1, 1)
    preds = {
        "noise 0.1": (t + 0.1 * torch.randn(t.shape, generator=g)).clamp(0, 1),
        f"blur {sigma:g} px": blur,
        "shift +0.15": (t + 0.15).clamp(0, 1),
        "RGB luminance": torch.from_numpy(np.stack(lum))[:, None].repeat(1, 3, 1, 1),
    }
    return t, preds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,512")
    p.add_argument("--n", type=int, default=8, help="scenes per size")
    p.add_argument("--quick", action="store_true", help="64 px, 2 scenes: checks the code path only")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.n = "64", 2
    print(machine())
    print(f"{'size':>5} {'prediction':<16} {'torchmetrics':>13} {'valid window':>13} {'difference':>11}")
    with tempfile.TemporaryDirectory(prefix="ssim-border-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            target, preds = pairs(size, args.n, Path(tmp))
            for name, pred in preds.items():
                whole, valid = both_ssims(pred, target)
                d = whole - valid
                print(f"{size:>5} {name:<16} {whole.mean():>13.4f} {valid.mean():>13.4f} {d.mean():>+11.4f}"
                      f"  (per image {d.min():+.4f} .. {d.max():+.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
