"""Noise levels, the DSM loss, annealed Langevin dynamics on a known Gaussian, EMA, and the presets."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from shared.errors import UserError
from tests.workers.ml._mnist_fixtures import one_thread
from workers.ml.ncsn import ScoreUNet
from workers.ml.score import (
    EMA,
    NCSN_PRESETS,
    anneal_langevin,
    dsm_loss,
    get_preset,
    get_sigmas,
    init_noise,
    step_sizes,
)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------- sigmas


def test_geometric_sigmas() -> None:
    s = get_sigmas("geometric", 1.0, 0.01, 10)
    assert s.shape == (10,) and s.dtype == torch.float32
    assert s[0].item() == pytest.approx(1.0) and s[-1].item() == pytest.approx(0.01)
    ratios = s[1:] / s[:-1]
    torch.testing.assert_close(ratios, torch.full((9,), 0.01 ** (1 / 9)))
    assert s[4].item() == pytest.approx(10 ** (-8 / 9), rel=1e-6)


def test_linear_sigmas() -> None:
    s = get_sigmas("linear", 1.0, 0.01, 10)
    torch.testing.assert_close(s, torch.tensor([1.0 - 0.11 * i for i in range(10)]))
    assert (s[1:] < s[:-1]).all()


@pytest.mark.parametrize(
    ("kind", "smax", "smin", "n"),
    [("cosine", 1, 0.01, 10), ("linear", 0.01, 1, 10), ("linear", 1, 0, 10), ("geometric", 1, 0.1, 1)],
)
def test_bad_sigma_settings(kind: str, smax: float, smin: float, n: int) -> None:
    with pytest.raises(UserError):
        get_sigmas(kind, smax, smin, n)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- DSM loss


class _LinearScore(nn.Module):
    """s(x, sigma) = w * x + b / sigma: simple enough to compute by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(-0.7))
        self.b = nn.Parameter(torch.tensor(0.2))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.w * x + self.b / sigma[:, None, None, None]


def test_dsm_loss_matches_hand_computation() -> None:
    model = _LinearScore()
    x = torch.tensor([[[[0.1, 0.9], [0.5, 0.0]]], [[[1.0, 0.3], [0.2, 0.7]]]])  # (2, 1, 2, 2)
    sigmas = torch.tensor([1.0, 0.5, 0.1])
    labels = torch.tensor([2, 0])
    out = dsm_loss(model, x, sigmas, generator=torch.Generator().manual_seed(3), labels=labels)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))  # the same draw

    expected, expected_seed = 0.0, 0.0
    for n in range(2):
        sigma = sigmas[labels[n]].item()
        x_tilde = x[n] + sigma * z[n]
        s = -0.7 * x_tilde + 0.2 / sigma
        target = -(x_tilde - x[n]) / sigma**2
        expected += sigma**2 / 2 * ((s - target) ** 2).sum().item() / 2
        expected_seed += sigma**2 * ((s - target) ** 2).mean().item() / 2
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss_seed_units"].item() == pytest.approx(expected_seed, rel=1e-5)
    assert out["labels"].tolist() == [2, 0]
    # per-level mean of the NCSN loss; level 1 unused
    assert math.isnan(out["per_level"][1].item())
    assert out["per_level"][[0, 2]].sum().item() == pytest.approx(2 * expected, rel=1e-5)
    # explicit noise gives the same number, and the loss backpropagates to the model
    again = dsm_loss(model, x, sigmas, labels=labels, noise=z)
    assert again["loss"].item() == pytest.approx(expected, rel=1e-6)
    again["loss"].backward()
    assert model.w.grad is not None and model.w.grad != 0


def test_seed_units_are_ncsn_units_times_2_over_d() -> None:
    # MNIST: D = 784, so the README/NCSN loss is 392x the seed code's number (0.0466 -> ~18.3)
    torch.manual_seed(0)
    model = ScoreUNet(base_channels=8)
    x = torch.rand(6, 1, 28, 28)
    out = dsm_loss(model, x, get_sigmas(), generator=torch.Generator().manual_seed(0))
    assert out["loss"].item() == pytest.approx(392 * out["loss_seed_units"].item(), rel=1e-5)


def test_levels_are_drawn_uniformly() -> None:
    sigmas = get_sigmas()
    x = torch.zeros(5000, 1, 1, 1)
    out = dsm_loss(lambda x, s: torch.zeros_like(x), x, sigmas, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out["labels"], minlength=10).float()
    assert counts.min() > 400 and counts.max() < 600
    # a zero score leaves the target: sigma^2/2 * ||z / sigma||^2 = ||z||^2 / 2, 0.5 per dim on average
    assert out["loss"].item() == pytest.approx(0.5, rel=0.05)


def test_dsm_is_minimised_by_the_true_score() -> None:
    # data ~ N(mu, s^2 I) on 1x4x4 images; the noised density is N(mu, (s^2 + sigma^2) I) whose score is
    # -(x - mu) / (s^2 + sigma^2). Training a tiny ScoreUNet on DSM alone must move it towards that score.
    torch.manual_seed(0)
    mu = torch.linspace(0.2, 0.8, 16).reshape(1, 1, 4, 4)
    s = 0.15
    sigmas = get_sigmas("geometric", 1.0, 0.01, 10)
    gen = torch.Generator().manual_seed(1)
    x_eval = mu + s * torch.randn(2000, 1, 4, 4, generator=gen)
    sig_eval = sigmas[torch.arange(2000) % 10]
    x_tilde = x_eval + sig_eval[:, None, None, None] * torch.randn(x_eval.shape, generator=gen)
    true_score = -(x_tilde - mu) / (s**2 + sig_eval[:, None, None, None] ** 2)

    def fisher(model: nn.Module) -> float:
        """sigma^2-weighted squared distance to the true score (the DSM loss minus its constant)."""
        with torch.no_grad():
            d = model(x_tilde, sig_eval) - true_score
        return (sig_eval**2 * d.pow(2).flatten(1).sum(1)).mean().item()

    model = ScoreUNet(base_channels=8, channel_mults=(1, 2), scale_by_sigma=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = fisher(model)
    for _ in range(200):
        loss = dsm_loss(model, mu + s * torch.randn(64, 1, 4, 4), sigmas)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fisher(model)
    assert after < 0.1 * before, (before, after)
    # relative error of the learned score at a mid level is small
    mid = sig_eval == sigmas[4]
    with torch.no_grad():
        learned = model(x_tilde[mid], sig_eval[mid])
    rel = (learned - true_score[mid]).norm() / true_score[mid].norm()
    assert rel < 0.35, rel.item()


# ----------------------------------------------------------------------------------------------- Langevin


def _gaussian_score(mu: torch.Tensor, s: float):
    def score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return -(x - mu) / (s**2 + sigma[:, None, None, None] ** 2)

    return score


def test_step_sizes() -> None:
    sig = get_sigmas()
    a = step_sizes(sig, 2e-5, "ncsn")
    assert a[-1].item() == pytest.approx(2e-5) and a[0].item() == pytest.approx(2e-5 * 1e4, rel=1e-5)
    torch.testing.assert_close(step_sizes(sig, 0.1, "seed"), 0.1 * sig.double() ** 2)
    with pytest.raises(UserError):
        step_sizes(sig, 0.1, "ddpm")  # type: ignore[arg-type]


def test_ncsn_langevin_samples_a_known_gaussian() -> None:
    # the analytic score of the perturbed N(mu, s^2 I): NCSN's schedule from U[0, 1] recovers mean and std
    gen = torch.Generator().manual_seed(0)
    mu = torch.linspace(0.2, 0.8, 16).reshape(1, 1, 4, 4)
    s = 0.15
    sigmas = get_sigmas("geometric", 1.0, 0.01, 10)
    for final_denoise in (False, True):
        x0 = init_noise((4000, 1, 4, 4), "ncsn", gen)
        x = anneal_langevin(
            _gaussian_score(mu, s), x0, sigmas, 100, 2e-5, "ncsn", final_denoise, generator=gen
        )
        assert (x.mean(0) - mu).abs().max() < 0.02
        std = x.std(0)
        assert (std / s - 1).abs().max() < 0.1, std
        assert not torch.is_inference(x0)


def test_seed_langevin_gets_the_mean_but_inflates_the_variance() -> None:
    # the seed's alpha_i = 0.1 sigma_i^2 takes steps ~1e-5 at sigma = 0.01: the chain stops contracting
    # around the middle levels, so the mean is right but the std is ~10-15% too large (documented behaviour)
    gen = torch.Generator().manual_seed(0)
    mu = torch.linspace(-0.6, 0.6, 16).reshape(1, 1, 4, 4)
    s = 0.3
    sigmas = get_sigmas("linear", 1.0, 0.01, 10)
    x0 = init_noise((4000, 1, 4, 4), "seed", gen)
    assert x0.mean().abs() < 0.05 and (x0.std() - 1).abs() < 0.05
    x = anneal_langevin(_gaussian_score(mu, s), x0, sigmas, 100, 0.1, "seed", generator=gen)
    assert (x.mean(0) - mu).abs().max() < 0.03
    ratio = x.std(0).mean() / s
    assert 1.03 < ratio < 1.25, ratio


def test_final_denoise_and_clamp() -> None:
    # one level, zero steps: only the Tweedie step x + sigma^2 s(x) runs, then the clamp
    x0 = torch.tensor([[[[2.0, -3.0]]]])
    sigmas = torch.tensor([0.5])
    x = anneal_langevin(lambda x, s: -x / s[:, None, None, None] ** 2, x0, sigmas, 0, final_denoise=True)
    torch.testing.assert_close(x, torch.zeros_like(x0))
    x = anneal_langevin(lambda x, s: torch.zeros_like(x), x0, sigmas, 0, clamp=(-1.0, 1.0))
    torch.testing.assert_close(x, torch.tensor([[[[1.0, -1.0]]]]))


def test_langevin_is_reproducible_and_drives_a_model() -> None:
    model = ScoreUNet(base_channels=8, channel_mults=(1, 2)).eval()
    sigmas = get_sigmas(num_levels=3)
    x0 = init_noise((2, 1, 8, 8), "ncsn", torch.Generator().manual_seed(0))
    a = anneal_langevin(model, x0, sigmas, 2, generator=torch.Generator().manual_seed(5), clamp=(0.0, 1.0))
    b = anneal_langevin(model, x0, sigmas, 2, generator=torch.Generator().manual_seed(5), clamp=(0.0, 1.0))
    torch.testing.assert_close(a, b)
    assert a.shape == x0.shape and a.min() >= 0 and a.max() <= 1


def test_init_noise() -> None:
    u = init_noise((1000,), "ncsn", torch.Generator().manual_seed(0))
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.05
    with pytest.raises(UserError):
        init_noise((2,), "uniform")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- EMA


def test_ema_math_and_state_dict() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 0.9 * 1.2 + 0.1 * 3))
    torch.testing.assert_close(ema.shadow["bias"], torch.tensor([0.9 * 0.1 + 0.1]))

    restored = EMA(nn.Linear(2, 1), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9
    target = nn.Linear(2, 1)
    restored.copy_to(target)
    torch.testing.assert_close(target.weight, ema.shadow["weight"])
    # the live model is untouched by the average
    assert model.weight[0, 0].item() == 3.0


def test_ema_follows_a_ddp_style_wrapper() -> None:
    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    inner = nn.Linear(2, 2)
    ema = EMA(Wrapper(inner), decay=0.0)  # decay 0: the average is the latest weights
    assert set(ema.shadow) == {"weight", "bias"}
    with torch.no_grad():
        inner.weight.add_(1.0)
    ema.update(Wrapper(inner))
    torch.testing.assert_close(ema.shadow["weight"], inner.weight.detach())


# ----------------------------------------------------------------------------------------------- presets

PRESET_KEYS = {
    "sigma_kind",
    "sigma_max",
    "sigma_min",
    "num_levels",
    "data_scale",
    "lr",
    "batch_size",
    "epochs",
    "step_lr",
    "n_steps_each",
    "rule",
    "final_denoise",
    "clamp",
    "ema_decay",
    "base_channels",
}


def test_presets_follow_the_reference() -> None:
    for preset in NCSN_PRESETS.values():
        assert PRESET_KEYS <= set(preset)
        get_sigmas(preset["sigma_kind"], preset["sigma_max"], preset["sigma_min"], preset["num_levels"])
    ncsn, seed = NCSN_PRESETS["ncsn"], NCSN_PRESETS["seed-code"]
    assert (ncsn["sigma_kind"], ncsn["num_levels"], ncsn["step_lr"], ncsn["n_steps_each"]) == (
        "geometric",
        10,
        2e-5,
        100,
    )
    assert ncsn["data_scale"] == "zero_one" and ncsn["ema_decay"] == 0.999 and ncsn["rule"] == "ncsn"
    assert (seed["sigma_kind"], seed["data_scale"], seed["lr"], seed["batch_size"], seed["epochs"]) == (
        "linear",
        "minus_one_one",
        2e-4,
        256,
        250,
    )
    assert (seed["rule"], seed["step_lr"], seed["final_denoise"], seed["clamp"], seed["ema_decay"]) == (
        "seed",
        0.1,
        False,
        (-1.0, 1.0),
        None,
    )
    copy = get_preset("ncsn")
    copy["lr"] = 1.0
    assert NCSN_PRESETS["ncsn"]["lr"] == 1e-3
    with pytest.raises(UserError, match="ncsn, seed-code"):
        get_preset("ddpm")


def test_lr_factor_warms_up_then_follows_the_schedule() -> None:
    from workers.ml.score import lr_factor

    assert lr_factor(0, 1000, warmup=100) == pytest.approx(0.01)
    assert lr_factor(99, 1000, warmup=100) == 1.0 and lr_factor(999, 1000, warmup=100) == 1.0
    assert lr_factor(500, 1000, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(1000, 1000, schedule="cosine") == pytest.approx(0.0)
    assert lr_factor(0, 1000, warmup=100, schedule="cosine") == pytest.approx(0.01)
    with pytest.raises(UserError, match="lr schedule 'step'"):
        lr_factor(0, 10, schedule="step")


def test_init_prior_draws_the_gaussian_around_the_data_mean() -> None:
    from workers.ml.score import init_prior

    mean = torch.linspace(0.0, 1.0, 28 * 28).reshape(1, 28, 28)
    x = init_prior(4000, mean, 0.5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4000, 1, 28, 28)
    assert (x.mean(dim=0) - mean).abs().max() < 0.05  # 4 standard errors of 0.5 / sqrt(4000)
    assert x.std(dim=0).mean() == pytest.approx(0.5, rel=0.01)
