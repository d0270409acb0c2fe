"""MnistClassifier: trained briefly on the 4,000 embedded digits it classifies the 1,000 held-out ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.errors import UserError
from tests.workers.ml._mnist_fixtures import embedded, one_thread, trained_classifier
from workers.ml.classifier import (
    MnistClassifier,
    accuracy,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def test_shapes() -> None:
    model = MnistClassifier().eval()
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, 128)
    assert (model.features(x) >= 0).all()  # post-ReLU


def test_brief_training_reaches_high_held_out_accuracy() -> None:
    model, history, test_acc = trained_classifier()
    assert len(history) == 6 and history[-1]["loss"] < history[0]["loss"]
    assert test_acc >= 0.95, test_acc
    assert not model.training
    # an untrained network is at chance level, so the accuracy comes from training
    test_x, test_y = embedded("test")
    assert accuracy(MnistClassifier(), test_x, test_y) < 0.3


def test_training_is_deterministic_for_a_seed() -> None:
    x, y = embedded("train")
    a, ha = train_classifier(x[:200], y[:200], epochs=1, batch_size=50, seed=3)
    b, hb = train_classifier(x[:200], y[:200], epochs=1, batch_size=50, seed=3)
    assert ha[0]["loss"] == hb[0]["loss"]
    torch.testing.assert_close(a.fc2.weight, b.fc2.weight)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model, _, test_acc = trained_classifier()
    path = save_classifier(model, tmp_path / "clf.pt", meta={"test_accuracy": test_acc})
    loaded, meta = load_classifier(path)
    assert meta == {"test_accuracy": test_acc}
    test_x, _ = embedded("test")
    np.testing.assert_array_equal(predict(loaded, test_x[:100]), predict(model, test_x[:100]))


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_classifier(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not an MNIST classifier checkpoint") as err:
        load_classifier(tmp_path / "junk.pt")
    assert "\n" not in str(err.value)
