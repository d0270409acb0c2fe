"""A small MNIST CNN: the feature extractor for MNIST-specific FID/IS ("Frechet LeNet Distance").

Inception-v3 features (the seed's protocol) were learned on ImageNet photos; for 28x28 digits a classifier
trained on MNIST gives features that separate digit shapes. Scores computed with it are not comparable to
Inception FID/IS and are always labelled with the extractor (``workers/ml/fid.py``).

Architecture (LeNet-like, ~0.2M parameters): conv5x5(1->16) -> ReLU -> maxpool2 -> conv5x5(16->32) -> ReLU
-> maxpool2 -> flatten (32*7*7) -> linear 128 -> ReLU (= ``features``, d = 128) -> dropout -> linear 10.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserError

FEATURE_DIM = 128


class MnistClassifier(nn.Module):
    """x (B, 1, 28, 28) float in [0, 1] -> logits (B, 10); ``features(x)`` -> (B, 128) penultimate activations."""

    def __init__(self, feature_dim: int = FEATURE_DIM, dropout: float = 0.25) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.fc1 = nn.Linear(32 * 7 * 7, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (post-ReLU) activations, (B, feature_dim): the space FID is measured in."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 16, 14, 14)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 32, 7, 7)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))


def _as_input(images: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 1, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1] on ``device``."""
    # torch.tensor copies: the caller's array may be read-only (cached datasets) and is never modified
    x = images if isinstance(images, torch.Tensor) else torch.tensor(np.asarray(images))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.to(device=device, dtype=torch.float32) / 255.0


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 2e-3,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[MnistClassifier, list[dict[str, float]]]:
    """Train ``MnistClassifier`` with Adam and cross-entropy on uint8 images (N, 28, 28) and labels (N,).

    A plain single-process loop (deterministic for a given seed on CPU). Returns the model in eval mode and
    one history row per epoch: {"epoch", "loss" (mean train cross-entropy), "train_accuracy", "seconds"}.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many images as labels (>0), got {len(images)} and {len(labels)}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MnistClassifier().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_all = _as_input(images, "cpu")
    y_all = torch.tensor(np.asarray(labels), dtype=torch.long)
    n = len(x_all)
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        total_loss, correct = 0.0, 0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        history.append(
            {
                "epoch": epoch + 1,
                "loss": total_loss / n,
                "train_accuracy": correct / n,
                "seconds": time.perf_counter() - t0,
            }
        )
    return model.eval(), history


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Predicted classes (N,) int64 for uint8 images (N, 28, 28), in eval mode on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = [
        model(_as_input(images[i : i + batch_size], device)).argmax(1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    model.train(was_training)
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of uint8 images (N, 28, 28) whose predicted class equals ``labels`` (N,)."""
    if len(images) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((predict(model, images) == np.asarray(labels)).mean())


def save_classifier(model: MnistClassifier, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Save weights plus ``meta`` (e.g. data source, test accuracy) so FID reports can name the extractor."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": model.state_dict(), "feature_dim": model.feature_dim, "meta": dict(meta or {})}, path
    )
    return path


def load_classifier(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[MnistClassifier, dict[str, Any]]:
    """Load a checkpoint written by ``save_classifier``; UserError (one line) if missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"MNIST classifier checkpoint {path} not found: train one first or pass the right --classifier path"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = MnistClassifier(feature_dim=int(ckpt["feature_dim"]))
        model.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # any unpickling/shape problem means "not our checkpoint"
        raise UserError(
            f"{path} is not an MNIST classifier checkpoint ({type(exc).__name__}): pass one written by the classifier training"
        ) from exc
    return model.to(device).eval(), dict(ckpt.get("meta", {}))
