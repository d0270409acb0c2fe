"""Classifier training entry point, single process: trains, checkpoints, reports test accuracy, exports."""

from __future__ import annotations

import json

import pytest
import torch

from workers.ml.classifier import MnistClassifier, load_classifier
from workers.ml.mnist import load_mnist
from workers.train import classifier
from workers.train.common import sha256_file


def test_trains_and_reports_test_accuracy(tmp_path, in_process) -> None:
    run_dir = tmp_path / "run"
    cfg = {"run_dir": str(run_dir), "events": str(run_dir / "events.jsonl"), "epochs": 2, "batch_size": 32,
           "seed": 0, "log_every": 4, "device": "cpu", "data": "mnist:embedded", "max_train_samples": 600,
           "max_test_samples": 300}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert classifier.main(["--config", str(tmp_path / "c.json")]) == 0
    events = [json.loads(line) for line in open(run_dir / "events.jsonl")]
    names = [e["name"] for e in events if e["event"] == "metric"]
    assert names.count("loss_epoch") == 2 and names.count("accuracy_epoch") == 2
    losses = [e["value"] for e in events if e["event"] == "metric" and e["name"] == "loss_epoch"]
    assert losses[1] < losses[0]
    acc = next(e for e in events if e["event"] == "metric" and e["name"] == "test_accuracy")["value"]
    assert 0.5 < acc <= 1.0  # chance is 0.1; 600 real digits and 2 epochs get well past it
    assert events[-1]["event"] == "done" and events[-1]["metrics"]["test_accuracy"] == acc
    assert [e["reason"] for e in events if e["event"] == "checkpoint"] == ["epoch", "final"]

    artifact = next(e for e in events if e["event"] == "artifact")
    assert artifact["kind"] == "classifier" and artifact["sha256"] == sha256_file(artifact["path"])
    model, meta = load_classifier(artifact["path"])
    assert isinstance(model, MnistClassifier) and meta["test_accuracy"] == acc and meta["n_test"] == 300
    # the exported weights reproduce the reported accuracy
    images, labels = load_mnist("mnist:embedded", "test")
    x = torch.from_numpy(images[:300]).float().div(255).unsqueeze(1)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    assert (pred == labels[:300]).mean() == pytest.approx(acc)
