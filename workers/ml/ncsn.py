"""Noise Conditional Score Network: a sigma-conditioned U-Net s_theta(x~, sigma) ~ grad_x log q_sigma(x~).

Song & Ermon 2019 (NCSN) estimate the score of the data perturbed by Gaussian noise of every level sigma_i
with one network. This one follows the seed project's description (a U-Net with sinusoidal embeddings of the
noise level and FiLM conditioning) with the usual DDPM-style blocks:

- the noise level enters as log(sigma) (levels are geometric, so log spaces them evenly), embedded with
  sinusoids and an MLP into a vector e (B, 4 * base_channels);
- every residual block is GroupNorm -> SiLU -> conv -> GroupNorm -> FiLM(e) -> SiLU -> conv, where FiLM
  (Perez et al. 2018) is h * (1 + gamma(e)) + beta(e) per channel, plus a residual connection;
- the encoder halves the resolution after each level but the last, the decoder mirrors it and concatenates
  the encoder's skip at each level (28 -> 14 -> 7 for MNIST with channel_mults (1, 2, 2));
- with ``scale_by_sigma`` (NCSNv2, Song & Ermon 2020, technique 3) the output is divided by sigma, because
  ||grad log q_sigma|| grows like 1/sigma and a plain network struggles to span that range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int) -> int:
    """Largest GroupNorm group count <= 32 that divides ``channels`` (tiny test models have 8 channels)."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


def sigma_embedding(sigma: torch.Tensor, dim: int, max_freq: float = 100.0) -> torch.Tensor:
    """Sinusoidal embedding of log(sigma): (B,) -> (B, dim), float32.

    Frequencies run geometrically from 1 to ``max_freq`` radians per unit of log(sigma): over NCSN's range
    log(sigma) in [log 0.01, log 1] = [-4.6, 0] the low ones vary smoothly and the high ones separate
    neighbouring levels (0.5 apart in log sigma for L = 10 geometric levels).
    """
    if dim % 2:
        raise ValueError(f"embedding dim must be even, got {dim}")
    half = dim // 2
    u = torch.log(sigma.float().clamp_min(1e-12))  # (B,)
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half, device=sigma.device))  # (half,)
    angles = u[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class FiLMResBlock(nn.Module):
    """Residual block with FiLM conditioning: (B, C_in, H, W), e (B, E) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(embed_dim, 2 * out_channels)  # -> (gamma, beta) per channel
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        gamma, beta = self.film(F.silu(emb)).chunk(2, dim=1)  # (B, C_out) each
        # 1 + gamma: at initialisation (gamma ~ 0) the block starts close to an unconditioned block
        h = self.norm2(h) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class ScoreUNet(nn.Module):
    """Sigma-conditioned U-Net: forward(x (B, C, H, W), sigma (B,) or scalar) -> score (B, C, H, W).

    Level i of ``channel_mults`` works at ``base_channels * channel_mults[i]`` channels with
    ``num_res_blocks`` FiLM residual blocks; all levels but the last are followed by a stride-2 conv, so H and
    W must be divisible by 2 ** (len(channel_mults) - 1) (4 for the default (1, 2, 2), e.g. 28x28 MNIST).
    The score has the units of 1 / x (DSM target -(x~ - x) / sigma^2).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 64,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        scale_by_sigma: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not channel_mults:
            raise ValueError("channel_mults must name at least one level")
        self.in_channels = in_channels
        self.scale_by_sigma = scale_by_sigma
        self.n_down = len(channel_mults) - 1
        self.embed_dim = 4 * base_channels
        self.freq_dim = base_channels if base_channels % 2 == 0 else base_channels + 1
        self.embed = nn.Sequential(
            nn.Linear(self.freq_dim, self.embed_dim), nn.SiLU(), nn.Linear(self.embed_dim, self.embed_dim)
        )
        chs = [base_channels * m for m in channel_mults]
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = base_channels
        skip_chs = []
        for i, out_ch in enumerate(chs):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(FiLMResBlock(ch, out_ch, self.embed_dim, dropout))
                ch = out_ch
            self.down_blocks.append(blocks)
            skip_chs.append(ch)
            if i < self.n_down:
                self.downsamples.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))

        self.mid = nn.ModuleList(
            [FiLMResBlock(ch, ch, self.embed_dim, dropout), FiLMResBlock(ch, ch, self.embed_dim, dropout)]
        )

        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(len(chs))):
            blocks = nn.ModuleList()
            for j in range(num_res_blocks):
                in_ch = ch + skip_chs[i] if j == 0 else ch  # the first block of a level eats the skip
                blocks.append(FiLMResBlock(in_ch, chs[i], self.embed_dim, dropout))
                ch = chs[i]
            self.up_blocks.append(blocks)
            if i > 0:
                self.upsamples.append(nn.Conv2d(ch, ch, 3, padding=1))

        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Score estimate s_theta(x, sigma): x (B, C, H, W), sigma (B,) (or a scalar for every example)."""
        b, _, h_in, w_in = x.shape
        m = 2**self.n_down
        if h_in % m or w_in % m:
            raise ValueError(f"ScoreUNet needs H and W divisible by {m}, got {h_in}x{w_in}")
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(b)
        emb = self.embed(sigma_embedding(sigma, self.freq_dim).to(self.embed[0].weight.dtype))  # (B, E)

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = []
        for i, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if i < self.n_down:
                h = self.downsamples[i](h)  # (B, C_i, H / 2^(i+1), W / 2^(i+1))
        for block in self.mid:
            h = block(h, emb)
        for k, blocks in enumerate(self.up_blocks):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
            if k < self.n_down:
                h = self.upsamples[k](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)
        if self.scale_by_sigma:
            out = out / sigma.to(out.dtype)[:, None, None, None]
        return out
