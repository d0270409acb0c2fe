"""Deterministic DDIM inversion of Stable Diffusion VAE latents (z_0 -> z_t) and its inverse, DDIM sampling (z_t -> z_0).

Notation (DDIM, Song et al. 2021, eq. 12 with sigma = 0): alpha_bar_t is the cumulative product of (1 - beta) of
the model's training schedule (SD 1.x: scaled_linear 0.00085..0.012 over 1000 steps; alpha_bar_400 = 0.4245).
One inversion step from level s to level t > s, with the U-Net's noise prediction eps = eps_theta(z_s, t, c):

    x0_hat = (z_s - sqrt(1 - alpha_bar_s) * eps) / sqrt(alpha_bar_s)          (1)
    z_t    = sqrt(alpha_bar_t) * x0_hat + sqrt(1 - alpha_bar_t) * eps          (2)

which is diffusers' ``DDIMInverseScheduler.step(eps, t, z_s)`` ("moves z from t - stride to t using the prediction
made at the destination t"). The denoising step t -> s is the same pair of equations with the roles swapped and
eps = eps_theta(z_t, t, c) (``DDIMScheduler.step`` with eta = 0). Because the inversion evaluates the U-Net at z_s
instead of z_t, invert-then-denoise is exact only as the stride goes to 0; the error shrinks with the stride.

Timesteps. ``steps`` sets the schedule granularity over the 1000 training steps (stride = 1000 // steps, spacing
"leading", steps_offset 0, so the grid is 0, stride, 2*stride, ...). The clean latent z_0 sits at level 0
(alpha_bar_0 = 0.99915, i.e. set_alpha_to_one=False, as in SD's training); the U-Net is called at every grid point
in (0, t_end], so the chain ends exactly at t_end. (SD's own steps_offset=1 would give 1, 21, ..., 401 instead:
docs/background.md s.3.) ``clip_sample`` is forced off: clamping x0_hat to [-1, 1] damages SD latents.

Presets (docs/background.md s.1):

- ``readme``: 512 px centre crop, posterior mean, empty prompts, stride 20 to t = 400: U-Net at 20, 40, ..., 400
  (20 calls).
- ``seed-code``: what the seed's q1.py ran: CenterCrop(512) then Resize(256) (32x32 latents),
  ``latent_dist.sample()``, prompts "a photo" (RGB) / "infrared photo" (IR), stride 1. Its loop called the U-Net
  at t = 0, 1, ..., 399 (400 calls). With set_alpha_to_one=False (SD's and sd-turbo's scheduler configs) the call
  at t = 0 moves from alpha_bar_0 to alpha_bar_0, an exact identity, so this preset calls the U-Net at
  t = 1, ..., 399 (399 calls): the same trajectory, ending at t_end = 399, one step short of the README's 400.
  (Had the seed's scheduler used set_alpha_to_one=True, its first call would have added the 0.00085 noise level
  of t = 0 to a latent taken as clean; this preset treats z_0 as already at that level.)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shared.errors import UserError
from workers.ml.sd import SDParts, encode_prompt

#: Called after each U-Net call with (calls done, calls in the batch); it may raise to stop the work (a cancel).
StepCallback = Callable[[int, int], None]

#: Length of the training noise schedule every preset assumes (SD 1.x and 2.x, sd-turbo).
NUM_TRAIN_TIMESTEPS = 1000
LATENT_MODES = ("mean", "sample")


@dataclass(frozen=True)
class InversionConfig:
    """Everything that fixes the inverted latents of an image pair (recorded with the job)."""

    #: Side in px of the centre square crop of each image.
    size: int = 512
    #: Side in px the crop is resized to before encoding (None: keep ``size``). Latents are (resize_to or size) / 8.
    resize_to: int | None = None
    #: "mean": the VAE posterior mean (deterministic); "sample": a draw from latent_dist (the seed's code).
    latent: str = "mean"
    #: Last timestep of the inversion (a multiple of the stride, 0 < t_end < 1000).
    t_end: int = 400
    #: Schedule granularity: stride = 1000 // steps training steps per DDIM step (50 -> 20).
    steps: int = 50
    #: Text conditioning of the U-Net for RGB and IR latents (the empty prompt is a real CLIP embedding).
    prompt_rgb: str = ""
    prompt_ir: str = ""
    #: Classifier-free guidance scale; only 1.0 (no guidance): inversion with CFG > 1 reconstructs badly.
    guidance: float = 1.0
    #: Seed of the VAE posterior draws when latent == "sample" (callers derive per-shard generators from it).
    seed: int = 0

    @property
    def stride(self) -> int:
        """Training timesteps per DDIM step."""
        return NUM_TRAIN_TIMESTEPS // self.steps

    @property
    def image_size(self) -> int:
        """Side in px of the images the VAE sees."""
        return self.resize_to or self.size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (what the job records)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InversionConfig:
        """Rebuild and validate a recorded config; UserError on unknown or bad fields."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise UserError(
                f"unknown inversion setting(s) {', '.join(unknown)}: valid are {', '.join(sorted(fields))}"
            )
        return validate_config(cls(**data))


PRESETS: dict[str, InversionConfig] = {
    "readme": InversionConfig(
        size=512, resize_to=None, latent="mean", t_end=400, steps=50, prompt_rgb="", prompt_ir=""
    ),
    "seed-code": InversionConfig(
        size=512,
        resize_to=256,
        latent="sample",
        t_end=399,
        steps=NUM_TRAIN_TIMESTEPS,
        prompt_rgb="a photo",
        prompt_ir="infrared photo",
    ),
}


def validate_config(cfg: InversionConfig, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> InversionConfig:
    """Return ``cfg`` if every field is usable, else raise UserError naming the field and its valid values."""
    for name, kind in (
        ("size", int),
        ("t_end", int),
        ("steps", int),
        ("seed", int),
        ("prompt_rgb", str),
        ("prompt_ir", str),
    ):
        value = getattr(cfg, name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"inversion setting {name}={value!r} must be of type {kind.__name__}")
    if cfg.resize_to is not None and (not isinstance(cfg.resize_to, int) or isinstance(cfg.resize_to, bool)):
        raise UserError(f"inversion setting resize_to={cfg.resize_to!r} must be an int or none")
    if cfg.latent not in LATENT_MODES:
        raise UserError(f"latent '{cfg.latent}' is unknown: use one of {', '.join(LATENT_MODES)}")
    if cfg.size < 8 or cfg.size % 8:
        raise UserError(
            f"size {cfg.size} px is invalid: use a multiple of 8 (the VAE downsamples by 8), e.g. 512"
        )
    if cfg.resize_to is not None and (cfg.resize_to < 8 or cfg.resize_to % 8):
        raise UserError(f"resize_to {cfg.resize_to} px is invalid: use a multiple of 8, e.g. 256, or none")
    if not 1 <= cfg.steps <= num_train_timesteps:
        raise UserError(f"steps {cfg.steps} is invalid: use 1..{num_train_timesteps} (e.g. 50: stride 20)")
    stride = num_train_timesteps // cfg.steps
    if not 0 < cfg.t_end < num_train_timesteps or cfg.t_end % stride:
        top = (num_train_timesteps - 1) // stride * stride
        raise UserError(
            f"t_end {cfg.t_end} is not on the schedule of steps={cfg.steps}: use a multiple of the stride {stride} "
            f"in {stride}..{top} (e.g. 400)"
        )
    if cfg.guidance != 1.0:
        raise UserError(
            f"guidance {cfg.guidance} is not supported: inversion runs without guidance (use 1.0)"
        )
    return cfg


def make_config(preset: str, **overrides: Any) -> InversionConfig:
    """The preset ``preset`` ("readme" or "seed-code") with ``overrides`` applied and validated."""
    if preset not in PRESETS:
        raise UserError(f"inversion preset '{preset}' is unknown: use one of {', '.join(PRESETS)}")
    return InversionConfig.from_dict({**PRESETS[preset].to_dict(), **overrides})


# -- schedulers ------------------------------------------------------------------------------------------------------


def _scheduler_kwargs(cls: type, scheduler_config: dict) -> dict[str, Any]:
    """The model's schedule (betas, prediction type) with our grid: leading spacing, offset 0, no clipping."""
    accepted = set(inspect.signature(cls.__init__).parameters)
    # Keep only what ``cls`` accepts, so an Euler/PNDM config (sd-turbo, SD 1.x) loads without warnings.
    kw = {k: v for k, v in scheduler_config.items() if k in accepted and not k.startswith("_")}
    kw.update(clip_sample=False, set_alpha_to_one=False, steps_offset=0, timestep_spacing="leading")
    if "thresholding" in accepted:
        kw["thresholding"] = False
    return kw


def make_inverse_scheduler(scheduler_config: dict):
    """A DDIMInverseScheduler with the model's noise schedule, clip_sample=False, z_0 at alpha_bar_0, offset 0."""
    from diffusers import DDIMInverseScheduler

    sched = DDIMInverseScheduler.from_config(_scheduler_kwargs(DDIMInverseScheduler, scheduler_config))
    assert sched.config.clip_sample is False, "clip_sample must be off: clamping x0 damages SD latents"
    return sched


def make_ddim_scheduler(scheduler_config: dict):
    """The matching DDIMScheduler (same schedule and grid) for deterministic sampling back to z_0."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(_scheduler_kwargs(DDIMScheduler, scheduler_config))
    assert sched.config.clip_sample is False, "clip_sample must be off: clamping x0 damages SD latents"
    return sched


def _num_train(scheduler_config: dict) -> int:
    return int(scheduler_config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))


def inversion_timesteps(scheduler_config: dict, cfg: InversionConfig) -> list[int]:
    """The timesteps at which the U-Net is called, ascending; the last is exactly ``cfg.t_end``.

    readme: [20, 40, ..., 380, 400]; seed-code: [1, 2, ..., 399]. The chain starts from z_0 at level 0.
    """
    validate_config(cfg, _num_train(scheduler_config))
    sched = make_inverse_scheduler(scheduler_config)
    sched.set_timesteps(cfg.steps)
    ts = [int(t) for t in sched.timesteps if 0 < int(t) <= cfg.t_end]
    assert ts and ts[-1] == cfg.t_end, f"inversion grid {ts[-3:]} does not end at t_end={cfg.t_end}"
    return ts


def alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1 (float32, as the schedulers compute it)."""
    return make_inverse_scheduler(scheduler_config).alphas_cumprod.clone()


# -- VAE -------------------------------------------------------------------------------------------------------------


def encode(
    parts: SDParts, images: torch.Tensor, mode: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """VAE latents z_0 = latent_dist.{mean|sample} * scaling_factor: (B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8).

    Returns float32 on parts.device. ``generator`` (a CPU generator is fine on any device) drives "sample".
    """
    if mode not in LATENT_MODES:
        raise UserError(f"latent '{mode}' is unknown: use one of {', '.join(LATENT_MODES)}")
    shift = getattr(parts.vae.config, "shift_factor", None) or 0.0
    with torch.inference_mode():
        dist = parts.vae.encode(images.to(parts.device, parts.dtype)).latent_dist
        z = dist.mean if mode == "mean" else dist.sample(generator=generator)
        return ((z.float() - shift) * parts.scaling_factor).contiguous()


def decode(parts: SDParts, z0: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
    """Images from latents: (B, 4, h, w) -> (B, 3, 8h, 8w) float32 in [0, 1] on parts.device.

    ``max_batch`` bounds the decoder's batch (its activations at 512 px dominate GPU memory).
    """
    shift = getattr(parts.vae.config, "shift_factor", None) or 0.0
    chunks = z0.split(max_batch or z0.shape[0])
    out = []
    with torch.inference_mode():
        for z in chunks:
            z = z.to(parts.device, torch.float32) / parts.scaling_factor + shift
            x = parts.vae.decode(z.to(parts.dtype)).sample
            out.append(((x.float() + 1.0) / 2.0).clamp(0.0, 1.0))
    return torch.cat(out)


# -- DDIM ------------------------------------------------------------------------------------------------------------


def _eps(parts: SDParts, z: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
    """U-Net noise prediction at timestep t; latents stay float32 between steps, the U-Net runs in parts.dtype."""
    timestep = torch.tensor(t, device=parts.device)
    return parts.unet(z.to(parts.dtype), timestep, encoder_hidden_states=emb).sample.float()


def _embeddings(parts: SDParts, prompt: str, batch: int) -> torch.Tensor:
    return encode_prompt(parts, prompt).expand(batch, -1, -1)  # (B, 77, D)


def _invert(parts: SDParts, z0: torch.Tensor, emb: torch.Tensor, cfg: InversionConfig,
            on_step: StepCallback | None = None) -> torch.Tensor:
    sched = make_inverse_scheduler(parts.scheduler_config)
    sched.set_timesteps(cfg.steps)
    z = z0.to(parts.device, torch.float32)
    ts = inversion_timesteps(parts.scheduler_config, cfg)
    with torch.inference_mode():
        for k, t in enumerate(ts):
            z = sched.step(_eps(parts, z, t, emb), t, z).prev_sample  # eqs. (1)-(2): level t - stride -> t
            if on_step is not None:
                on_step(k + 1, len(ts))
    return z


def _denoise(parts: SDParts, zt: torch.Tensor, emb: torch.Tensor, cfg: InversionConfig) -> torch.Tensor:
    sched = make_ddim_scheduler(parts.scheduler_config)
    sched.set_timesteps(cfg.steps)
    z = zt.to(parts.device, torch.float32)
    with torch.inference_mode():
        for t in reversed(inversion_timesteps(parts.scheduler_config, cfg)):
            z = sched.step(_eps(parts, z, t, emb), t, z, eta=0.0).prev_sample  # level t -> t - stride
    return z


def invert(parts: SDParts, z0: torch.Tensor, prompt: str, cfg: InversionConfig) -> torch.Tensor:
    """Deterministic DDIM inversion z_0 -> z_{t_end}: (B, 4, h, w) -> (B, 4, h, w) float32 on parts.device.

    One batched U-Net call per timestep of ``inversion_timesteps``, conditioned on the CLIP embedding of
    ``prompt`` (no guidance).
    """
    validate_config(cfg, _num_train(parts.scheduler_config))
    return _invert(parts, z0, _embeddings(parts, prompt, z0.shape[0]), cfg)


def denoise(parts: SDParts, z_t: torch.Tensor, prompt: str, cfg: InversionConfig) -> torch.Tensor:
    """Deterministic DDIM sampling (eta = 0) z_{t_end} -> z_0 along the same timesteps: the inverse of ``invert``.

    (B, 4, h, w) -> (B, 4, h, w) float32 on parts.device.
    """
    validate_config(cfg, _num_train(parts.scheduler_config))
    return _denoise(parts, z_t, _embeddings(parts, prompt, z_t.shape[0]), cfg)


def invert_pairs(
    parts: SDParts,
    rgb: torch.Tensor,
    ir: torch.Tensor,
    cfg: InversionConfig,
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, torch.Tensor]:
    """Encode and invert a batch of pairs: rgb, ir (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8).

    RGB is conditioned on ``cfg.prompt_rgb`` and IR on ``cfg.prompt_ir``; both halves run as ONE batch of 2B
    (per-sample text embeddings), so each timestep costs one U-Net call. With latent == "sample" and no
    ``generator``, draws come from a generator seeded with ``cfg.seed`` (deterministic, so a redelivered shard
    writes the same latents; pass a per-shard generator so shards differ). ``on_step(done, total)`` runs after
    each U-Net call (progress, cancellation).

    Returns float32 CPU contiguous tensors: "z_rgb_0", "z_ir_0" (VAE latents) and "z_rgb_t", "z_ir_t" (at t_end).
    """
    validate_config(cfg, _num_train(parts.scheduler_config))
    if rgb.shape != ir.shape:
        raise ValueError(f"rgb {tuple(rgb.shape)} and ir {tuple(ir.shape)} batches differ in shape")
    b = rgb.shape[0]
    if cfg.latent == "sample" and generator is None:
        generator = torch.Generator().manual_seed(cfg.seed)
    z0 = encode(parts, torch.cat([rgb, ir]), cfg.latent, generator)  # (2B, 4, h, w)
    emb = torch.cat([_embeddings(parts, cfg.prompt_rgb, b), _embeddings(parts, cfg.prompt_ir, b)])
    zt = _invert(parts, z0, emb, cfg, on_step)

    def out(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        # A plain tensor (not an inference tensor), so callers may use it in autograd or modify it in place.
        return x.clone() if x.is_inference() else x

    return {"z_rgb_0": out(z0[:b]), "z_ir_0": out(z0[b:]), "z_rgb_t": out(zt[:b]), "z_ir_t": out(zt[b:])}
