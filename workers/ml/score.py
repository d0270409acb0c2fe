"""Score matching pieces of NCSN: noise levels, the denoising score matching loss, annealed Langevin dynamics,
an EMA of weights, and the two training/sampling protocols as presets.

Notation (Song & Ermon 2019): noise levels sigma_1 > ... > sigma_L; q_sigma(x~ | x) = N(x, sigma^2 I), whose
score is -(x~ - x) / sigma^2; s_theta(x~, sigma) is the score network.

Two protocols are kept side by side (docs/background.md s.1 and s.4):
- "ncsn": the paper's setting (geometric sigmas 1 -> 0.01, L = 10, data in [0, 1], eps = 2e-5, T = 100) with
  NCSNv2's improvements (score scaled by 1/sigma, EMA 0.999, final denoising step), started from N(data mean,
  sigma_1^2) instead of the paper's U[0, 1] (init_prior says why).
- "seed-code": what the seed project's code ran (linear sigmas, data in [-1, 1], AdamW lr 2e-4, batch 256,
  250 epochs, AMP, start from N(0, I), alpha_i = 0.1 * sigma_i^2, no final denoise, clamp to [-1, 1]).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from shared.errors import UserError

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NCSN_PRESETS: dict[str, dict[str, Any]] = {
    # NCSN (ermongroup/ncsn configs/anneal.yml) noise levels and sampler with NCSNv2 training tricks. The
    # original NCSN used Adam lr 1e-3 for 200k iterations at batch 128 (NCSNv2 lowered it to 1e-4 for long
    # runs); the short CPU budgets of benchmarks/README.md use 1e-3 after a 100-step linear warm-up, with an EMA
    # whose decay ramps up (see EMA). 100 epochs of 60k digits at batch 128 is ~46.9k steps.
    "ncsn": {
        "sigma_kind": "geometric",
        "sigma_max": 1.0,
        "sigma_min": 0.01,
        "num_levels": 10,
        "data_scale": "zero_one",
        "optimizer": "adam",
        "lr": 1e-3,
        "warmup_steps": 100,
        "weight_decay": 0.0,
        "batch_size": 128,
        "epochs": 100,
        "amp": False,
        "step_lr": 2e-5,
        "n_steps_each": 100,
        "rule": "ncsn",
        "final_denoise": True,
        "clamp": (0.0, 1.0),
        "init": "prior",  # N(data mean, sigma_1^2) (init_prior); "uniform" is NCSN's U[0, 1]
        "ema_decay": 0.999,
        "ema_warmup": True,
        "base_channels": 64,
        "channel_mults": (1, 2, 2),
        "scale_by_sigma": True,
    },
    # The seed's q2.ipynb: 250 epochs x 234 steps = 58,500 steps; the sampler's alpha_i = 0.1 * sigma_i^2 is
    # rule "seed" with step_lr 0.1. Its metrics used Inception features on 10,240 real vs 5,120 generated
    # digits (IS over the 5,120 with 10 splits). AdamW's weight decay is not stated: torch's default 0.01.
    "seed-code": {
        "sigma_kind": "linear",
        "sigma_max": 1.0,
        "sigma_min": 0.01,
        "num_levels": 10,
        "data_scale": "minus_one_one",
        "optimizer": "adamw",
        "lr": 2e-4,
        "weight_decay": 0.01,
        "batch_size": 256,
        "epochs": 250,
        "amp": True,
        "step_lr": 0.1,
        "n_steps_each": 100,
        "rule": "seed",
        "final_denoise": False,
        "clamp": (-1.0, 1.0),
        "ema_decay": None,
        "base_channels": 64,
        "channel_mults": (1, 2, 2),
        "scale_by_sigma": False,
        "eval_features": "inception",
        "eval_n_real": 10240,
        "eval_n_fake": 5120,
        "eval_is_splits": 10,
    },
}
"""Training and sampling protocols; keys are read by the NCSN training entry point and the sampling task."""


def get_preset(name: str) -> dict[str, Any]:
    """A copy of ``NCSN_PRESETS[name]``; UserError naming the known presets otherwise."""
    if name not in NCSN_PRESETS:
        raise UserError(f"unknown NCSN preset '{name}': use one of {', '.join(NCSN_PRESETS)}")
    return copy.deepcopy(NCSN_PRESETS[name])


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "constant") -> float:
    """Multiplier of the base learning rate for optimiser step ``step`` (0-based) of ``total``.

    A linear warm-up over ``warmup`` steps (NCSNv2 / DDPM practice: Adam's first steps at full lr knock a fresh
    U-Net about), then "constant" or "cosine" (half a cosine from 1 to 0 at ``total``). The decay is what lets
    the last weights settle: at a constant lr they keep SGD noise that tilts the learned score (benchmarks/README.md
    s.8 and the mixture test in tests/workers/ml/test_score_known.py).
    """
    if schedule not in ("constant", "cosine"):
        raise UserError(f"unknown lr schedule {schedule!r}: use constant or cosine")
    factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if schedule == "cosine" and total > 0:
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total)))
    return factor


def get_sigmas(
    kind: Literal["geometric", "linear"] = "geometric",
    sigma_max: float = 1.0,
    sigma_min: float = 0.01,
    num_levels: int = 10,
) -> torch.Tensor:
    """Noise levels sigma_1 > ... > sigma_L as a float32 tensor (L,), in data units.

    "geometric" (NCSN): sigma_i = sigma_max * (sigma_min / sigma_max) ** ((i - 1) / (L - 1)), a constant ratio
    between neighbours. "linear" (the seed code): evenly spaced from sigma_max to sigma_min.
    """
    if kind not in ("geometric", "linear"):
        raise UserError(f"unknown sigma schedule '{kind}': use geometric or linear")
    if not (sigma_max > sigma_min > 0):
        raise UserError(f"noise levels need sigma_max > sigma_min > 0, got {sigma_max} and {sigma_min}")
    if num_levels < 2:
        raise UserError(f"NCSN needs at least 2 noise levels, got {num_levels}")
    if kind == "geometric":
        sigmas = torch.exp(
            torch.linspace(math.log(sigma_max), math.log(sigma_min), num_levels, dtype=torch.float64)
        )
    else:
        sigmas = torch.linspace(sigma_max, sigma_min, num_levels, dtype=torch.float64)
    return sigmas.float()


def _randn(
    shape: torch.Size | tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``like``'s device/dtype, drawn from ``generator`` if given (a CPU
    generator works for CUDA tensors: it draws on the CPU and the result is moved)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def dsm_loss(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Denoising score matching loss over all noise levels (Song & Ermon 2019, eq. 5 and 6).

    For clean data x (B, C, H, W) each example gets a level index i (``labels``, (B,) long; drawn uniformly
    from 0..L-1 if None), noise z ~ N(0, I) (``noise``, else drawn from ``generator``), x~ = x + sigma_i z and
    the target score -(x~ - x) / sigma_i^2 = -z / sigma_i. Returns:

    - ``loss``: the README's / NCSN's objective, sigma^2 / 2 * sum over pixels of (s - target)^2, averaged over
      the batch; this is the one to backpropagate.
    - ``loss_seed_units``: the seed code's sigma^2 * mean over pixels of (s - target)^2, batch-averaged; it
      equals ``loss * 2 / (C * H * W)`` (1/392 on MNIST), reported so runs compare with the seed's 0.0466.
    - ``per_level``: (L,) detached mean of ``loss`` per level, NaN for levels absent from the batch.
    - ``labels``: the level indices used.

    The sigma^2 weighting makes every level contribute O(1): the target has norm ~ sqrt(D) / sigma.
    Computed in float32 even when the model runs under fp16 autocast.
    """
    b = x.shape[0]
    n_levels = sigmas.shape[0]
    sigmas = sigmas.to(x.device)
    if labels is None:
        device = generator.device if generator is not None else x.device
        labels = torch.randint(0, n_levels, (b,), generator=generator, device=device).to(x.device)
    if noise is None:
        noise = _randn(x.shape, x, generator)
    sigma = sigmas[labels].to(x.dtype)  # (B,)
    sigma_b = sigma[:, None, None, None]
    x_tilde = x + sigma_b * noise
    target = -noise / sigma_b  # = -(x~ - x) / sigma^2
    score = model(x_tilde, sigma)
    sq = (score.float() - target.float()).pow(2).flatten(1)  # (B, D)
    sigma2 = sigma.float() ** 2
    per_example = 0.5 * sigma2 * sq.sum(dim=1)  # (B,)
    seed_units = sigma2 * sq.mean(dim=1)  # (B,)
    with torch.no_grad():
        sums = torch.zeros(n_levels, device=x.device).index_add_(0, labels, per_example.detach())
        counts = torch.zeros(n_levels, device=x.device).index_add_(0, labels, torch.ones_like(per_example))
        per_level = sums / counts  # 0/0 -> NaN for absent levels
    return {
        "loss": per_example.mean(),
        "loss_seed_units": seed_units.mean(),
        "per_level": per_level,
        "labels": labels,
    }


def step_sizes(sigmas: torch.Tensor, step_lr: float, rule: Literal["ncsn", "seed"] = "ncsn") -> torch.Tensor:
    """Langevin step size alpha_i per level, (L,) float64.

    "ncsn" (Song & Ermon 2019, Algorithm 1): alpha_i = step_lr * sigma_i^2 / sigma_L^2 (step_lr is the paper's
    epsilon, 2e-5), so that alpha_i / sigma_i^2 - the signal-to-noise ratio of a step - is the same at every
    level. "seed" (the seed code): alpha_i = step_lr * sigma_i^2 with step_lr 0.1.

    Note: ermongroup's released code writes the update as x + a * s + sqrt(2a) z with a = eps (sigma_i /
    sigma_L)^2, i.e. its alpha is twice the paper's for the same eps; pass step_lr = 2 * eps to reproduce it.
    """
    if rule not in ("ncsn", "seed"):
        raise UserError(f"unknown Langevin step rule '{rule}': use ncsn or seed")
    s = sigmas.double().cpu()
    if rule == "ncsn":
        return step_lr * (s / s[-1]) ** 2
    return step_lr * s**2


def init_noise(
    shape: tuple[int, ...],
    rule: Literal["ncsn", "seed"] = "ncsn",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Starting point of annealed Langevin dynamics: U[0, 1] for "ncsn" (data in [0, 1], as in NCSN's code),
    N(0, I) for "seed" (data in [-1, 1], the seed code). Drawn from ``generator`` when given."""
    gen_device = generator.device if generator is not None else device
    if rule == "ncsn":
        x = torch.rand(shape, generator=generator, device=gen_device, dtype=dtype)
    elif rule == "seed":
        x = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    else:
        raise UserError(f"unknown Langevin step rule '{rule}': use ncsn or seed")
    return x.to(device)


def init_prior(
    n: int,
    mean: torch.Tensor,
    sigma_1: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Starting point N(mean, sigma_1^2 I) for ``n`` samples: the Gaussian that matches the data's first two moments
    at noise level sigma_1 (``mean``: the per-pixel mean of the training data, (C, H, W), in the data's scale).

    NCSN starts from U[0, 1], which carries about four times MNIST's ink (pixel mean 0.5 against 0.13). With sigma_1
    only 1 the first level cannot remove it in tens of steps and the samples keep thick, blobby strokes: on one
    trained network (benchmarks/README.md s.8) this start took classifier-FID from 398 to 78 and IS from 3.5 to 6.3.
    """
    gen_device = generator.device if generator is not None else device
    z = torch.randn((n, *mean.shape), generator=generator, device=gen_device, dtype=mean.dtype)
    return (mean.to(gen_device) + sigma_1 * z).to(device)


def anneal_langevin(
    score_fn: ScoreFn,
    x_init: torch.Tensor,
    sigmas: torch.Tensor,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    rule: Literal["ncsn", "seed"] = "ncsn",
    final_denoise: bool = False,
    clamp: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1), batched over x_init (B, C, H, W).

    For each level i = 1..L (sigmas decreasing) run ``n_steps_each`` steps of
        x <- x + alpha_i / 2 * s(x, sigma_i) + sqrt(alpha_i) * z,   z ~ N(0, I)
    with alpha_i from ``step_sizes(sigmas, step_lr, rule)``. With ``final_denoise`` (NCSNv2, Tweedie's formula)
    the result is x + sigma_L^2 * s(x, sigma_L), the posterior mean of the clean image, which removes the
    sigma_L noise left by the last level. ``clamp`` (lo, hi) is applied once to the returned samples.
    ``score_fn(x, sigma)`` receives sigma as a (B,) tensor; no gradients are recorded. ``on_step(done, total)``
    runs after each Langevin step (progress, cancellation: it may raise to stop).
    """
    alphas = step_sizes(sigmas, step_lr, rule)
    x = x_init.clone()
    b = x.shape[0]
    # updated in place: one noise buffer and one sigma tensor for the whole run, no temporaries per step
    # (benchmarks/README.md, NCSN sampling)
    z, sigma = torch.empty_like(x), torch.empty((b,), device=x.device, dtype=x.dtype)
    draw_here = generator is None or generator.device == x.device
    total, done = len(alphas) * n_steps_each, 0
    with torch.inference_mode():
        for sigma_i, alpha_i in zip(sigmas.tolist(), alphas.tolist(), strict=True):
            sigma.fill_(sigma_i)
            for _ in range(n_steps_each):
                if draw_here:
                    z.normal_(generator=generator)
                else:  # e.g. a CPU generator for CUDA samples (same numbers on any device)
                    z.copy_(_randn(x.shape, x, generator))
                x.add_(score_fn(x, sigma).to(x.dtype), alpha=alpha_i / 2).add_(z, alpha=math.sqrt(alpha_i))
                if on_step is not None:
                    done += 1
                    on_step(done, total)
        if final_denoise:
            sigma_last = float(sigmas[-1])
            sigma = torch.full((b,), sigma_last, device=x.device, dtype=x.dtype)
            x = x + sigma_last**2 * score_fn(x, sigma).to(x.dtype)
        if clamp is not None:
            x = x.clamp(clamp[0], clamp[1])
    return x


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers, so parameter names match."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class EMA:
    """Exponential moving average of a model's parameters (NCSNv2 technique 5): after every optimiser step
    theta_ema <- decay * theta_ema + (1 - decay) * theta. Buffers (e.g. norm statistics) are copied as-is.

    Samples are drawn from the averaged weights: ``copy_to(model)`` overwrites a model's parameters with them.
    The shadow copy stays on the model's device and dtype; state_dict() is checkpointable.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        # with ``warmup`` the k-th update uses min(decay, (1 + k) / (10 + k)): a short run's average is not
        # dominated by the random initial weights (0.999 ** 1000 = 0.37 of them would remain after 1,000 steps)
        self.warmup, self.num_updates = warmup, 0
        model = _unwrap(model)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        self.buffers: dict[str, torch.Tensor] = {
            name: b.detach().clone() for name, b in model.named_buffers()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the average (call after ``optimizer.step()``)."""
        model = _unwrap(model)
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates)) if self.warmup else self.decay
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), 1.0 - decay)
        for name, b in model.named_buffers():
            self.buffers[name] = b.detach().clone()

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the averaged ones (in place)."""
        model = _unwrap(model)
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])
        for name, b in model.named_buffers():
            if name in self.buffers:
                b.copy_(self.buffers[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": dict(self.shadow), "buffers": dict(self.buffers),
                "warmup": self.warmup, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        self.decay = float(state["decay"])
        self.warmup, self.num_updates = bool(state.get("warmup", False)), int(state.get("num_updates", 0))
        for name, t in state["shadow"].items():
            if name in self.shadow:
                self.shadow[name] = t.to(
                    device=self.shadow[name].device, dtype=self.shadow[name].dtype
                ).clone()
        for name, t in state.get("buffers", {}).items():
            self.buffers[name] = t.clone()
