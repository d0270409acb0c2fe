"""LatentUNet: shapes at real and awkward latent sizes, and that it can fit a small fixed batch."""

import pytest
import torch

from workers.ml.translator import TRANSLATOR_PRESETS, LatentUNet

pytestmark = pytest.mark.usefixtures("one_thread")  # from tests/workers/ml/conftest.py


@pytest.mark.parametrize(
    ("h", "w", "depth"),
    [(8, 8, 2), (16, 16, 3), (32, 32, 3), (7, 9, 2), (13, 5, 3), (1, 1, 3), (10, 6, 0)],
)
def test_shape_is_preserved(h: int, w: int, depth: int) -> None:
    model = LatentUNet(base_channels=8, depth=depth)
    z = torch.randn(2, 4, h, w)
    assert model(z).shape == (2, 4, h, w)


def test_real_latent_size_with_seed_architecture() -> None:
    # 256 px images -> 32x32 latents, the seed code's setting; base 64 and 3 downsamples
    model = LatentUNet(base_channels=64, depth=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 32, 32))
    assert out.shape == (1, 4, 32, 32)
    assert torch.isfinite(out).all()


def test_non_divisible_sizes_keep_dtype_and_size() -> None:
    model = LatentUNet(base_channels=8, depth=2).double()
    z = torch.randn(1, 4, 6, 10, dtype=torch.float64)
    out = model(z)
    assert out.dtype == torch.float64 and out.shape == z.shape


def test_overfits_a_tiny_fixed_batch() -> None:
    torch.manual_seed(0)
    model = LatentUNet(base_channels=8, depth=2)
    z_rgb = torch.randn(4, 4, 8, 8)
    # a nonlinear but learnable target map
    z_ir = torch.tanh(z_rgb.flip(1)) + 0.5 * z_rgb.roll(1, dims=-1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(model(z_rgb), z_ir)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.1 * first


def test_presets_match_the_seed_protocols() -> None:
    readme, code = TRANSLATOR_PRESETS["readme"], TRANSLATOR_PRESETS["seed-code"]
    assert (readme["lr"], readme["epochs"], readme["base_channels"], readme["depth"]) == (1e-4, 25, 64, 3)
    assert (code["lr"], code["weight_decay"], code["batch_size"], code["epochs"]) == (2e-4, 1e-4, 8, 25)
    assert code["amp"] is True
