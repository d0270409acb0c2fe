"""Shared, process-cached MNIST helpers for the ML tests (plain functions, so every test module reuses one
trained classifier instead of pytest building a fixture per module)."""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from tests.threads import torch_threads
from workers.ml.classifier import MnistClassifier, accuracy, train_classifier
from workers.ml.mnist import EMBEDDED, load_mnist

CLASSIFIER_EPOCHS = 6  # ~1 s per epoch on one CPU core; reaches ~0.96-0.97 on the 1,000 held-out digits


@functools.lru_cache(maxsize=2)
def embedded(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The embedded real digits of one split (read-only views: copy before modifying)."""
    images, labels = load_mnist(EMBEDDED, split)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=1)
def trained_classifier() -> tuple[MnistClassifier, list[dict[str, float]], float]:
    """(model, history, test accuracy) of an MnistClassifier trained on the 4,000 embedded train digits."""
    images, labels = embedded("train")
    with one_thread():
        model, history = train_classifier(
            images, labels, epochs=CLASSIFIER_EPOCHS, batch_size=64, lr=2e-3, seed=0
        )
    test_images, test_labels = embedded("test")
    return model, history, accuracy(model, test_images, test_labels)


def one_thread() -> contextlib.AbstractContextManager[None]:
    """Run torch on one intra-op thread: on a shared CPU, OpenMP threads spinning against other processes
    make small ops tens of times slower than a single thread."""
    return torch_threads(1)
