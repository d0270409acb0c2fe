"""FID / IS: real digits against real, noise and degraded digits under MNIST-classifier features, and the
Inception code path with a local weights file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from shared.errors import UserError
from tests.workers.ml._mnist_fixtures import embedded, one_thread, trained_classifier
from workers.ml.fid import compute_fid_is, images_to_uint8, resolve_inception_weights
from workers.ml.mnist import to_tensor


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def test_classifier_fid_separates_real_from_noise() -> None:
    clf, _, _ = trained_classifier()
    train_x, _ = embedded("train")
    test_x, _ = embedded("test")
    real_vs_real = compute_fid_is(train_x[:1000], test_x, "mnist-classifier", classifier=clf)
    real_vs_noise = compute_fid_is(train_x[:1000], _noise(1000), "mnist-classifier", classifier=clf)
    # faint digits (half the ink) lie between the two
    faint = (train_x[1000:2000] // 2).astype(np.uint8)
    real_vs_faint = compute_fid_is(train_x[:1000], faint, "mnist-classifier", classifier=clf)

    assert real_vs_real["feature_extractor"] == "mnist-classifier penultimate-128"
    assert (real_vs_real["n_real"], real_vs_real["n_fake"]) == (1000, 1000)
    assert 0 <= real_vs_real["fid"] < 0.1 * real_vs_noise["fid"]
    assert real_vs_real["fid"] < real_vs_faint["fid"] < real_vs_noise["fid"]
    # IS of real, class-balanced digits approaches the class count; noise collapses onto few classes
    assert real_vs_real["is_mean"] > 7.0
    assert real_vs_noise["is_mean"] < 2.0
    assert real_vs_real["is_std"] >= 0
    # the caller's classifier is neither cast to float64 nor switched to train mode
    assert next(clf.parameters()).dtype == torch.float32 and not clf.training


def test_fid_of_identical_sets_is_zero_and_is_is_seeded() -> None:
    clf, _, _ = trained_classifier()
    x, _ = embedded("test")
    a = compute_fid_is(x[:300], x[:300], "mnist-classifier", classifier=clf, seed=1, is_splits=5)
    b = compute_fid_is(x[:300], x[:300], "mnist-classifier", classifier=clf, seed=1, is_splits=5)
    c = compute_fid_is(x[:300], x[:300], "mnist-classifier", classifier=clf, seed=2, is_splits=5)
    assert abs(a["fid"]) < 1e-6
    assert a["is_std"] == b["is_std"] and a["is_mean"] == b["is_mean"]
    assert a["is_std"] != c["is_std"]  # a different shuffle into splits
    # the global RNG is left alone
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    compute_fid_is(x[:50], x[50:100], "mnist-classifier", classifier=clf, is_splits=2)
    assert torch.rand(1) == expected


def test_rgb_and_float32_inputs() -> None:
    clf, _, _ = trained_classifier()
    x, _ = embedded("test")
    grey = compute_fid_is(x[:200], x[200:400], "mnist-classifier", classifier=clf, is_splits=2)
    rgb = np.repeat(x[..., None], 3, axis=-1)
    colour = compute_fid_is(rgb[:200], rgb[200:400], "mnist-classifier", classifier=clf, is_splits=2)
    assert colour["fid"] == pytest.approx(grey["fid"], rel=1e-6)
    precise = compute_fid_is(
        x[:200], x[200:400], "mnist-classifier", classifier=clf, is_splits=2, extractor_dtype=torch.float64
    )
    assert precise["fid"] == pytest.approx(grey["fid"], rel=1e-4)
    fast = compute_fid_is(
        x[:200], x[200:400], "mnist-classifier", classifier=clf, is_splits=2, dtype=torch.float32
    )
    assert fast["fid"] == pytest.approx(grey["fid"], rel=1e-3)


def test_input_errors() -> None:
    clf, _, _ = trained_classifier()
    x, _ = embedded("test")
    with pytest.raises(UserError, match="uint8"):
        compute_fid_is(x.astype(np.float32), x, "mnist-classifier", classifier=clf)
    with pytest.raises(UserError, match="at least 2 fake"):
        compute_fid_is(x, x[:1], "mnist-classifier", classifier=clf)
    with pytest.raises(UserError, match="--classifier"):
        compute_fid_is(x, x, "mnist-classifier")
    with pytest.raises(UserError, match="unknown FID feature extractor"):
        compute_fid_is(x, x, "lenet")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="IS splits"):
        compute_fid_is(x[:10], x[:10], "mnist-classifier", classifier=clf, is_splits=11)


def test_images_to_uint8_inverts_to_tensor() -> None:
    x, _ = embedded("test")
    for scale in ("zero_one", "minus_one_one"):
        back = images_to_uint8(to_tensor(x[:20], scale), scale)  # type: ignore[arg-type]
        np.testing.assert_array_equal(back, x[:20])
    clipped = images_to_uint8(torch.tensor([[[[-0.5, 1.7, 0.5]]]]), "zero_one")
    assert clipped.shape == (1, 1, 3) and clipped.tolist() == [[[0, 255, 128]]]
    rgb = images_to_uint8(torch.zeros(2, 3, 4, 4), "minus_one_one")
    assert rgb.shape == (2, 4, 4, 3) and (rgb == 128).all()


def test_missing_inception_weights_say_where_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, _ = embedded("test")
    with pytest.raises(UserError, match="--inception-weights") as err:
        compute_fid_is(
            x[:4], x[4:8], "inception", inception_weights=str(tmp_path / "missing.pth"), is_splits=2
        )
    message = str(err.value)
    assert "\n" not in message and "missing.pth" in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    with pytest.raises(UserError, match="pt_inception-2015-12-05"):
        resolve_inception_weights(None)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's Inception-v3 architecture with RANDOM weights, saved as its state_dict.

    The real file (weights-inception-2015-12-05-6726825d.pth) cannot be downloaded here; this one has the
    same keys and shapes, so loading and the whole Inception code path are real, but scores computed with it
    are meaningless.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    # build the architecture without fetching weights: skip the download and the load of the (empty) dict
    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None),
    ):
        torch.manual_seed(0)
        net = cls("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            # He init keeps activations alive through 90 random layers (default init fades them to ~0)
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_path_runs_with_a_local_weights_file(random_inception_weights: Path) -> None:
    # RANDOM weights: checks loading, 3-channel uint8 input, 299 px resize, 2048-d FID and 1008-way IS;
    # the values themselves mean nothing. 2 images a side keep this to seconds on a CPU.
    x, _ = embedded("test")
    result = compute_fid_is(
        x[:2], _noise(2), "inception", inception_weights=str(random_inception_weights), is_splits=1
    )
    assert result["feature_extractor"] == "inception-v3-2048 (torch-fidelity, weights random-inception.pth)"
    assert (result["n_real"], result["n_fake"]) == (2, 2)
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert 1.0 <= result["is_mean"] <= 1008 and result["is_std"] == 0.0  # one split: no spread
