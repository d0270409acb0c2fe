"""Latent translator: a U-Net with skip connections that maps inverted RGB latents to inverted IR latents.

The translation network f_theta: z^RGB_t -> z^IR_t works on Stable Diffusion VAE latents after DDIM
inversion to t = 400, both of shape (B, 4, h, w) with h = w = image_size / 8 (64 at 512 px, 32 at 256 px).
It is trained with a plain MSE between f_theta(z^RGB_t) and z^IR_t (see ``workers/train/translator.py``).

``TRANSLATOR_PRESETS`` holds the two training protocols of the seed project (docs/background.md s.1): what its
README says and what its code actually did.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Training protocols of the seed project. "readme": the README's claim (AdamW lr 1e-4, 25 epochs; it states no
# weight decay or batch size, so torch's AdamW default 1e-2 and the code's batch 8 are used). "seed-code": what
# the seed's q1.py ran (AdamW lr 2e-4, wd 1e-4, batch 8, 25 epochs, fp16 autocast). Both: base 64, 3 downsamples.
TRANSLATOR_PRESETS: dict[str, dict[str, Any]] = {
    "readme": {
        "optimizer": "adamw",
        "lr": 1e-4,
        "weight_decay": 1e-2,
        "epochs": 25,
        "batch_size": 8,
        "base_channels": 64,
        "depth": 3,
        "amp": False,
    },
    "seed-code": {
        "optimizer": "adamw",
        "lr": 2e-4,
        "weight_decay": 1e-4,
        "epochs": 25,
        "batch_size": 8,
        "base_channels": 64,
        "depth": 3,
        "amp": True,
        "amp_dtype": "fp16",
    },
}


def _groups(channels: int) -> int:
    """Largest GroupNorm group count <= 32 that divides ``channels`` (tiny test models have 8 channels)."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """Two (GroupNorm -> SiLU -> 3x3 conv) layers with a residual connection; (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class LatentUNet(nn.Module):
    """U-Net z_rgb_t (B, in_channels, h, w) -> z_ir_t (B, out_channels, h, w) with skip connections.

    Encoder level i (i = 0..depth-1) runs a ResBlock at ``base_channels * 2**i`` channels, keeps its output as
    a skip, then halves the resolution with a stride-2 conv; the bottleneck runs two ResBlocks at
    ``base_channels * 2**depth``; the decoder upsamples (nearest + 3x3 conv), concatenates the matching skip and
    runs a ResBlock. Inputs whose h or w is not a multiple of ``2**depth`` are padded (replicate) and the output
    is cropped back, so 64x64, 32x32 and odd tiny sizes all work.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        base_channels: int = 64,
        depth: int = 3,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.depth = depth
        chs = [base_channels * 2**i for i in range(depth + 1)]
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(ResBlock(chs[i], chs[i]) for i in range(depth))
        self.downsamples = nn.ModuleList(nn.Conv2d(chs[i], chs[i + 1], 3, stride=2, padding=1) for i in range(depth))
        self.mid = nn.Sequential(ResBlock(chs[depth], chs[depth]), ResBlock(chs[depth], chs[depth]))
        self.upsamples = nn.ModuleList(nn.Conv2d(chs[i + 1], chs[i], 3, padding=1) for i in range(depth))
        self.up_blocks = nn.ModuleList(ResBlock(2 * chs[i], chs[i]) for i in range(depth))
        self.norm_out = nn.GroupNorm(_groups(chs[0]), chs[0])
        self.conv_out = nn.Conv2d(chs[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Translate latents: (B, 4, h, w) -> (B, 4, h, w), same dtype and device."""
        h_in, w_in = z.shape[-2:]
        m = 2**self.depth
        pad_h, pad_w = (-h_in) % m, (-w_in) % m
        if pad_h or pad_w:
            # replicate, not zeros: a zero border is far from typical latent values and would leak into the crop
            z = F.pad(z, (0, pad_w, 0, pad_h), mode="replicate")
        h = self.conv_in(z)  # (B, C0, H, W)
        skips = []
        for block, down in zip(self.down_blocks, self.downsamples, strict=True):
            h = block(h)
            skips.append(h)
            h = down(h)  # (B, C_{i+1}, H / 2^{i+1}, W / 2^{i+1})
        h = self.mid(h)
        for i in reversed(range(self.depth)):
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = self.upsamples[i](h)
            h = self.up_blocks[i](torch.cat([h, skips[i]], dim=1))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[..., :h_in, :w_in]
