"""ScoreUNet: shapes, sigma conditioning, NCSNv2 output scaling, and speed of tiny configs."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from tests.workers.ml._mnist_fixtures import one_thread
from workers.ml.ncsn import ScoreUNet, sigma_embedding


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.mark.parametrize(
    ("shape", "mults", "blocks"),
    [
        ((2, 1, 28, 28), (1, 2, 2), 1),
        ((3, 3, 16, 16), (1, 2, 2), 2),
        ((1, 2, 8, 12), (1, 2), 1),
        ((2, 1, 4, 4), (1,), 1),
    ],
)
def test_output_has_input_shape(shape: tuple[int, ...], mults: tuple[int, ...], blocks: int) -> None:
    model = ScoreUNet(in_channels=shape[1], base_channels=8, channel_mults=mults, num_res_blocks=blocks)
    out = model(torch.randn(shape), torch.rand(shape[0]) + 0.01)
    assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_rejects_sizes_not_divisible_by_the_downsampling() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        ScoreUNet(base_channels=8)(torch.randn(1, 1, 30, 30), torch.tensor([0.1]))


def test_output_depends_on_sigma_and_scalar_sigma_broadcasts() -> None:
    torch.manual_seed(0)
    model = ScoreUNet(base_channels=8).eval()
    x = torch.randn(2, 1, 28, 28)
    a = model(x, torch.tensor([1.0, 1.0]))
    b = model(x, torch.tensor([0.01, 0.01]))
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()
    torch.testing.assert_close(model(x, 1.0), a)
    # each example is conditioned on its own sigma
    mixed = model(x, torch.tensor([1.0, 0.01]))
    torch.testing.assert_close(mixed[0], a[0])
    torch.testing.assert_close(mixed[1], b[1])


def test_scale_by_sigma_divides_the_output() -> None:
    torch.manual_seed(0)
    plain = ScoreUNet(base_channels=8)
    scaled = ScoreUNet(base_channels=8, scale_by_sigma=True)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(3, 1, 28, 28)
    sigma = torch.tensor([1.0, 0.1, 0.01])
    torch.testing.assert_close(scaled(x, sigma), plain(x, sigma) / sigma[:, None, None, None])


def test_sigma_embedding_separates_ncsn_levels() -> None:
    sigmas = torch.exp(torch.linspace(0.0, torch.log(torch.tensor(0.01)).item(), 10))
    emb = sigma_embedding(sigmas, 64)
    assert emb.shape == (10, 64)
    dist = torch.cdist(emb, emb) + torch.eye(10) * 1e9
    assert dist.min() > 0.5


def test_gradients_reach_every_parameter() -> None:
    model = ScoreUNet(base_channels=8)
    model(torch.randn(2, 1, 28, 28), torch.tensor([0.5, 0.05])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_float64_and_tiny_config_speed() -> None:
    model = ScoreUNet(base_channels=8).double().eval()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    assert model(x, torch.full((4,), 0.3, dtype=torch.float64)).dtype == torch.float64
    model = ScoreUNet(base_channels=8).eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        model(x, torch.full((8,), 0.3))
        t0 = time.perf_counter()
        model(x, torch.full((8,), 0.3))
        elapsed = time.perf_counter() - t0
    assert elapsed < 0.5  # milliseconds when the CPU is free; generous for a shared machine


def test_default_width_matches_the_seed_description() -> None:
    model = ScoreUNet()
    assert model.conv_in.out_channels == 64
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 1e7
