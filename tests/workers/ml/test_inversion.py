"""DDIM inversion: against an independent loop of the DDIM equations, round trips, timesteps, configuration."""

import math

import pytest
import torch

from shared.errors import UserError
from workers.ml.inversion import (
    PRESETS,
    InversionConfig,
    alphas_cumprod,
    decode,
    denoise,
    encode,
    inversion_timesteps,
    invert,
    invert_pairs,
    make_config,
    make_ddim_scheduler,
    make_inverse_scheduler,
)
from workers.ml.sd import SDParts, encode_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


def _z0(seed: int = 0, b: int = 2) -> torch.Tensor:
    # Unit-variance latents, like SD's scaled VAE latents at 64 px (8x8).
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _reference_alpha_bar(config: dict) -> torch.Tensor:
    betas = (
        torch.linspace(
            math.sqrt(config["beta_start"]), math.sqrt(config["beta_end"]), 1000, dtype=torch.float64
        )
        ** 2
    )
    return torch.cumprod(1.0 - betas, dim=0)


def test_matches_an_independent_ddim_loop(tiny_sd: SDParts) -> None:
    cfg = make_config("readme", size=64, steps=20, t_end=400)  # stride 50: U-Net at 50, 100, ..., 400
    z0 = _z0()
    ab = _reference_alpha_bar(tiny_sd.scheduler_config)
    emb = encode_prompt(tiny_sd, "a photo").expand(2, -1, -1)

    def eps(z: torch.Tensor, t: int) -> torch.Tensor:
        with torch.inference_mode():
            return tiny_sd.unet(z.float(), t, encoder_hidden_states=emb).sample.double()

    z = z0.double()
    for t in range(50, 401, 50):  # DDIM eq. 12 (sigma = 0) from level t - 50 to t, eps evaluated at t
        s = t - 50
        e = eps(z, t)
        x0 = (z - (1 - ab[s]).sqrt() * e) / ab[s].sqrt()
        z = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * e
    z_t = invert(tiny_sd, z0, "a photo", cfg)
    assert torch.allclose(z_t.double(), z, atol=1e-4, rtol=1e-4)

    for t in range(400, 0, -50):  # and back: from t to t - 50 with eps evaluated at t
        s = t - 50
        e = eps(z, t)
        x0 = (z - (1 - ab[t]).sqrt() * e) / ab[t].sqrt()
        z = ab[s].sqrt() * x0 + (1 - ab[s]).sqrt() * e
    assert torch.allclose(denoise(tiny_sd, z_t, "a photo", cfg).double(), z, atol=1e-4, rtol=1e-4)


def test_round_trip_error_shrinks_with_more_steps(tiny_sd: SDParts) -> None:
    z0 = _z0(1)
    errors = []
    for steps in (10, 50, 200):  # strides 100, 20, 5 to t = 100: 1, 5, 20 U-Net calls each way
        cfg = make_config("readme", size=64, steps=steps, t_end=100)
        z_t = invert(tiny_sd, z0, "", cfg)
        assert (z_t - z0).norm() > 0.05 * z0.norm()  # it really moved
        errors.append(float((denoise(tiny_sd, z_t, "", cfg) - z0).norm() / z0.norm()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def test_timesteps_end_exactly_at_t_end(tiny_sd: SDParts) -> None:
    config = tiny_sd.scheduler_config
    assert config["steps_offset"] == 1  # SD's own grid would be 1, 21, ..., 401
    assert inversion_timesteps(config, PRESETS["readme"]) == list(range(20, 401, 20))
    assert inversion_timesteps(config, PRESETS["seed-code"]) == list(range(1, 400))
    assert inversion_timesteps(config, make_config("readme", steps=25))[-2:] == [360, 400]
    # an SD scheduler config made by diffusers' DDIMScheduler with steps_offset 1 still ends at t_end
    sched = make_inverse_scheduler(config)
    assert sched.config.steps_offset == 0


def test_clip_sample_is_off_whatever_the_config_says(tiny_sd: SDParts) -> None:
    config = dict(tiny_sd.scheduler_config, clip_sample=True, set_alpha_to_one=True)
    for sched in (make_inverse_scheduler(config), make_ddim_scheduler(config)):
        assert sched.config.clip_sample is False
        assert sched.config.set_alpha_to_one is False
    # config keys of other scheduler classes (SD 1.x ships PNDM, sd-turbo Euler) are tolerated
    pndm = dict(tiny_sd.scheduler_config, _class_name="PNDMScheduler", skip_prk_steps=True)
    assert make_inverse_scheduler(pndm).config.beta_schedule == "scaled_linear"


def test_alpha_bar_at_400_matches_sd(tiny_sd: SDParts) -> None:
    ab = alphas_cumprod(tiny_sd.scheduler_config)
    assert ab[400].item() == pytest.approx(0.4245, abs=1e-4)
    assert math.sqrt(ab[400]) == pytest.approx(0.6515, abs=1e-4)
    assert math.sqrt(1 - ab[400]) == pytest.approx(0.7586, abs=1e-4)
    assert torch.allclose(ab.double(), _reference_alpha_bar(tiny_sd.scheduler_config), atol=1e-6)


def test_presets_match_the_two_protocols() -> None:
    r, s = PRESETS["readme"], PRESETS["seed-code"]
    assert (r.size, r.resize_to, r.latent, r.t_end, r.stride, r.prompt_rgb, r.prompt_ir) == (
        512,
        None,
        "mean",
        400,
        20,
        "",
        "",
    )
    assert (s.size, s.resize_to, s.latent, s.t_end, s.stride) == (512, 256, "sample", 399, 1)
    assert (s.prompt_rgb, s.prompt_ir, s.image_size) == ("a photo", "infrared photo", 256)
    assert make_config("seed-code").to_dict()["t_end"] == 399
    assert InversionConfig.from_dict(s.to_dict()) == s
    assert make_config("readme", t_end=200, steps=10) == InversionConfig(t_end=200, steps=10)


@pytest.mark.parametrize(
    ("preset", "overrides", "fragment"),
    [
        ("readme", {"t_end": 410}, "multiple of the stride 20"),
        ("readme", {"t_end": 1000}, "t_end 1000"),
        ("readme", {"t_end": 0}, "t_end 0"),
        ("readme", {"steps": 0}, "steps 0"),
        ("readme", {"steps": 1001}, "steps 1001"),
        ("readme", {"latent": "median"}, "mean, sample"),
        ("readme", {"guidance": 7.5}, "guidance 7.5"),
        ("readme", {"size": 500}, "multiple of 8"),
        ("readme", {"resize_to": 4}, "resize_to 4"),
        ("readme", {"cfg_scale": 2}, "unknown inversion setting"),
        ("readme", {"t_end": "400"}, "must be of type int"),
        ("readme", {"resize_to": 256.0}, "resize_to=256.0"),
        ("paper", {}, "readme, seed-code"),
    ],
)
def test_bad_settings_are_refused(preset: str, overrides: dict, fragment: str) -> None:
    with pytest.raises(UserError) as err:
        make_config(preset, **overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_invert_pairs_batches_both_modalities(tiny_sd: SDParts) -> None:
    cfg = make_config("seed-code", size=64, resize_to=None, steps=10, t_end=200)  # different prompts, 2 calls
    g = torch.Generator().manual_seed(3)
    rgb, ir = torch.rand(2, 2, 3, 64, 64, generator=g) * 2 - 1
    out = invert_pairs(tiny_sd, rgb, ir, cfg, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"z_rgb_0", "z_ir_0", "z_rgb_t", "z_ir_t"}
    for v in out.values():
        assert v.shape == (2, 4, 8, 8) and v.dtype == torch.float32 and v.device.type == "cpu"
        assert v.is_contiguous() and not v.is_inference()
    # the one batched call equals inverting each modality alone with its own prompt
    assert torch.allclose(out["z_rgb_t"], invert(tiny_sd, out["z_rgb_0"], "a photo", cfg), atol=1e-5)
    assert torch.allclose(out["z_ir_t"], invert(tiny_sd, out["z_ir_0"], "infrared photo", cfg), atol=1e-5)
    # posterior draws are reproducible from the generator and differ from the mean
    again = invert_pairs(tiny_sd, rgb, ir, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["z_rgb_0"], out["z_rgb_0"])
    mean = encode(tiny_sd, rgb, "mean")
    assert not torch.allclose(out["z_rgb_0"], mean)
    readme = make_config("readme", size=64, steps=10, t_end=200)
    assert torch.allclose(invert_pairs(tiny_sd, rgb, ir, readme)["z_rgb_0"], mean)


def test_encode_decode_shapes(tiny_sd: SDParts) -> None:
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    z = encode(tiny_sd, x, "mean")
    assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    with torch.inference_mode():
        raw = tiny_sd.vae.encode(x).latent_dist.mean
    assert torch.allclose(z, raw * tiny_sd.scaling_factor)
    img = decode(tiny_sd, z, max_batch=2)
    assert img.shape == (3, 3, 64, 64) and img.min() >= 0 and img.max() <= 1
    assert torch.allclose(img, decode(tiny_sd, z), atol=1e-5)
