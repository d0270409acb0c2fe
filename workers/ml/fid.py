"""FID and Inception Score of generated digits, with Inception-v3 or MNIST-classifier features.

Both scores come from torchmetrics' ``FrechetInceptionDistance`` and ``InceptionScore`` so the numbers use
the same formulas as the seed project (docs/background.md s.1, s.5). Each image goes once through the extractor,
which returns FID features and IS logits together; the metrics receive them through an identity
``feature=`` module (torchmetrics' custom-extractor path).

- ``features="inception"`` (the seed's protocol): grayscale digits are repeated to 3 channels as uint8 and
  fed to torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's Inception-v3, antialiased resize to 299):
  pool3 2048-d features for FID, unbiased 1008-way logits for IS, exactly what ``FrechetInceptionDistance(
  feature=2048)`` and ``InceptionScore()`` use. Nothing can be downloaded here, so the weights come from a
  local copy of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (``inception_weights``; the
  torch hub cache is tried when it is None).
- ``features="mnist-classifier"``: penultimate 128-d activations (FID) and 10-way logits (IS) of a trained
  ``MnistClassifier`` (a "Frechet LeNet Distance"). IS is then bounded by 10 (the class count), not 1008.

The two families are NOT comparable; every result carries ``feature_extractor`` naming which was used.
The extractor runs in float32 and the feature statistics and metrics in float64 (``set_dtype``) by default,
and the IS split shuffle is seeded without disturbing the global RNG.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from shared.errors import UserError

INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def images_to_uint8(x: torch.Tensor, scale: Literal["zero_one", "minus_one_one"] = "zero_one") -> np.ndarray:
    """Samples (N, C, H, W) in the data range -> uint8 numpy, (N, H, W) for C = 1 else (N, H, W, C).

    ``scale`` is the data range the model was trained in ([0, 1] or [-1, 1]); values outside it are clipped,
    and pixels are rounded to the nearest of 256 levels (the inverse of ``mnist.to_tensor``).
    """
    if scale not in ("zero_one", "minus_one_one"):
        raise UserError(f"unknown data scale '{scale}': use zero_one or minus_one_one")
    x = x.detach().float().cpu()
    if scale == "minus_one_one":
        x = (x + 1.0) / 2.0
    out = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    out = out[:, 0] if out.shape[1] == 1 else out.permute(0, 2, 3, 1)
    return out.contiguous().numpy()


def resolve_inception_weights(path: str | None) -> Path:
    """The local Inception weights file: ``path`` if given, else torch-fidelity's file in the torch hub cache.

    UserError (one line) when there is none, saying where to get it: nothing is downloaded.
    """
    if path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        if cached.is_file():
            return cached
        raise UserError(
            f"Inception FID/IS needs local weights: download torch-fidelity's {INCEPTION_WEIGHTS_FILE} "
            f"(pt_inception-2015-12-05) from {INCEPTION_WEIGHTS_URL} and pass --inception-weights PATH"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"Inception weights file '{path}' not found: download {INCEPTION_WEIGHTS_FILE} "
            f"(pt_inception-2015-12-05) from {INCEPTION_WEIGHTS_URL} and pass --inception-weights PATH"
        )
    return p


def _to_nchw_uint8(images: np.ndarray, what: str) -> torch.Tensor:
    """uint8 (N, H, W), (N, H, W, 1) or (N, H, W, 3) -> uint8 tensor (N, C, H, W) with C = 1 or 3."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise UserError(
            f"{what} images must be uint8 (0..255), got {arr.dtype}: convert with images_to_uint8"
        )
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise UserError(f"{what} images must have shape (N, H, W) or (N, H, W, 3), got {arr.shape}")
    if arr.shape[0] < 2:
        raise UserError(f"FID needs at least 2 {what} images, got {arr.shape[0]}")
    return torch.tensor(arr).permute(0, 3, 1, 2)  # a copy: the caller's array may be read-only


class _Precomputed(nn.Module):
    """Identity "extractor" handed to the torchmetrics metrics: they receive features already extracted.

    Extracting once per image and feeding both metrics saves a second Inception pass over the fake images
    (a third of the work in the seed's 10,240 real / 5,120 fake protocol).
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # lets FID size its statistics without a dummy forward

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


class _InceptionExtractor(nn.Module):
    """uint8 (B, 3, H, W) -> (pool3 features (B, 2048), unbiased logits (B, 1008)) in one Inception pass."""

    def __init__(self, weights: Path, dtype: torch.dtype) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        from workers.ml.weights import force_weights_only

        force_weights_only()  # torch-fidelity loads the weights file with weights_only=False: overridden here
        # torchmetrics' subclass of torch-fidelity's network: same resizing (antialiased bilinear to 299)
        # and input scaling as FrechetInceptionDistance(feature=2048) and InceptionScore() use
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(weights),
        ).to(dtype)
        self.net._dtype = dtype  # the cast torchmetrics' FID.set_dtype applies to its input

    def forward(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if imgs.shape[1] == 1:
            imgs = imgs.expand(-1, 3, -1, -1)  # grey digits repeated to 3 channels, as the seed did
        feats, logits = self.net._torch_fidelity_forward(imgs)
        return feats.reshape(imgs.shape[0], -1), logits.reshape(imgs.shape[0], -1)


class _ClassifierExtractor(nn.Module):
    """uint8 (B, C, H, W) -> (penultimate features (B, d), logits (B, 10)) of an MNIST classifier.

    Pixels become float [0, 1] in the extractor's dtype; colour is averaged to grey and other sizes are
    resized to 28x28. The classifier is copied, so casting to float64 never touches the caller's model.
    """

    def __init__(self, classifier: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        if not hasattr(classifier, "features"):
            raise UserError("the MNIST classifier must have a features(x) method: pass an MnistClassifier")
        self.classifier = copy.deepcopy(classifier).eval().to(dtype)
        self.dtype = dtype

    def forward(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = imgs.to(self.dtype) / 255.0
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = nn.functional.interpolate(
                x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False
            )
        return self.classifier.features(x).flatten(1), self.classifier(x)


def compute_fid_is(
    real: np.ndarray,
    fake: np.ndarray,
    features: Literal["inception", "mnist-classifier"] = "inception",
    inception_weights: str | None = None,
    classifier: nn.Module | None = None,
    is_splits: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    dtype: torch.dtype = torch.float64,
    extractor_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """FID between ``real`` and ``fake`` and the Inception Score of ``fake``.

    real, fake: uint8 (N, 28, 28) digits (or (N, H, W, 3) colour images), N >= 2 each. ``features`` picks the
    extractor (see the module docstring); "inception" needs ``inception_weights`` (a local file), and
    "mnist-classifier" needs ``classifier`` (a trained ``MnistClassifier``, not modified). ``dtype`` is the
    precision of the feature statistics and both metrics (``set_dtype``, float64 by default: the covariance
    square root is where precision is lost); ``extractor_dtype`` is the network's (float32, as torch-fidelity
    runs it by default; float64 convolutions are ~10x slower on a CPU).
    ``seed`` fixes the IS shuffle into ``is_splits`` splits.

    Returns {"fid", "is_mean", "is_std" (floats), "n_real", "n_fake", "feature_extractor" (what was used)}.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    real_t = _to_nchw_uint8(real, "real")
    fake_t = _to_nchw_uint8(fake, "fake")
    if not 1 <= is_splits <= fake_t.shape[0]:
        raise UserError(f"IS splits must be between 1 and the {fake_t.shape[0]} fake images, got {is_splits}")

    extractor: nn.Module
    if features == "inception":
        weights = resolve_inception_weights(inception_weights)
        extractor = _InceptionExtractor(weights, extractor_dtype)
        description = f"inception-v3-2048 (torch-fidelity, weights {weights.name})"
    elif features == "mnist-classifier":
        if classifier is None:
            raise UserError(
                "features 'mnist-classifier' needs a trained MNIST classifier: pass --classifier CHECKPOINT"
            )
        extractor = _ClassifierExtractor(classifier, extractor_dtype)
        description = f"mnist-classifier penultimate-{getattr(classifier, 'feature_dim', '?')}"
    else:
        raise UserError(f"unknown FID feature extractor '{features}': use inception or mnist-classifier")
    extractor = extractor.to(device).eval()

    fid: FrechetInceptionDistance | None = None
    with warnings.catch_warnings():
        # "will save all extracted features in buffer": it keeps only the logits (5,120 x 1008 x 8 B = 41 MB)
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        inception_score = (
            InceptionScore(feature=_Precomputed(0), splits=is_splits).set_dtype(dtype).to(device)
        )
    with torch.no_grad():
        for is_real, images in ((True, real_t), (False, fake_t)):
            for start in range(0, images.shape[0], batch_size):
                feats, logits = extractor(images[start : start + batch_size].to(device))
                if fid is None:  # sized from the first batch: 2048 for Inception, d for a classifier
                    fid = (
                        FrechetInceptionDistance(feature=_Precomputed(feats.shape[1]))
                        .set_dtype(dtype)
                        .to(device)
                    )
                fid.update(feats.to(dtype), real=is_real)
                if not is_real:
                    inception_score.update(logits.to(dtype))
        assert fid is not None
        fid_value = float(fid.compute())
        # InceptionScore shuffles with the global RNG (torch.randperm on CPU): seed it in a private fork
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)
            warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # std over a single split
            is_mean, is_std = inception_score.compute()

    return {
        "fid": fid_value,
        "is_mean": float(is_mean),
        "is_std": float(is_std) if is_splits > 1 else 0.0,  # one split has no spread (torch.std gives NaN)
        "n_real": int(real_t.shape[0]),
        "n_fake": int(fake_t.shape[0]),
        "feature_extractor": description,
    }
