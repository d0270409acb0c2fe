"""Train the MNIST classifier whose features give MNIST-specific FID/IS, with DDP, then measure test accuracy.

    torchrun --standalone --nproc_per_node=G -m workers.train.classifier --config CONFIG.json
    python -m workers.train.classifier --config CONFIG.json        # one process, no DDP

CONFIG.json holds the common keys of ``workers.train.common`` plus
    "data": "mnist:embedded" or an MNIST IDX folder (train split to train, test split to evaluate)
    "max_train_samples", "max_test_samples": optional caps (first N digits of each split)
Defaults (``CLASSIFIER_DEFAULTS``): Adam lr 2e-3, batch 64, 5 epochs, as ``workers.ml.classifier``.
Besides the common events it logs the metrics "accuracy_epoch" (train) and "test_accuracy", and writes
``run_dir/classifier.pt`` in ``save_classifier`` format (what the FID/IS code loads), announced by an
"artifact" event {"kind": "classifier", "path", "sha256", "bytes"}.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from workers.ml.classifier import MnistClassifier, save_classifier
from workers.ml.mnist import load_mnist, to_tensor
from workers.train.common import (
    StopFlag,
    Trainer,
    all_reduce_,
    read_config,
    setup_distributed,
    sha256_file,
    teardown_distributed,
)
from workers.train.runtime import exit_rank

CLASSIFIER_DEFAULTS = {"lr": 2e-3, "weight_decay": 0.0, "batch_size": 64, "epochs": 5}
"""Config defaults: the settings of ``workers.ml.classifier.train_classifier`` (Adam, cross-entropy)."""


def load_split(cfg: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, 1, 28, 28) float32 in [0, 1], y (N,) int64) of one split, capped by max_<split>_samples."""
    images, labels = load_mnist(cfg["data"], split)
    cap = cfg.get(f"max_{split}_samples")
    if cap:
        images, labels = images[: int(cap)], labels[: int(cap)]
    return to_tensor(images, "zero_one"), torch.from_numpy(labels)


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, trainer: Trainer) -> float:
    """Collective: each rank scores every world_size-th test digit; correct/total summed over ranks."""
    info = trainer.info
    model.eval()
    xs, ys = x[info.rank :: info.world_size], y[info.rank :: info.world_size]
    correct = torch.zeros((), dtype=torch.float64, device=info.device)
    for start in range(0, len(xs), 1000):
        logits = model(xs[start : start + 1000].to(info.device))
        correct += (logits.argmax(1) == ys[start : start + 1000].to(info.device)).sum()
    counts = all_reduce_(torch.stack([correct, torch.tensor(float(len(xs)), dtype=torch.float64,
                                                                device=info.device)]), info)
    return float(counts[0] / counts[1].clamp(min=1))


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag.install()  # first: a cancel during start-up is honoured at the first step boundary
    cfg, checkpoint = read_config(argv, "Train the MNIST feature classifier.", lambda given: CLASSIFIER_DEFAULTS)
    info = setup_distributed(cfg["device"])

    x_train, y_train = load_split(cfg, "train")  # (N, 1, 28, 28), (N,)
    x_train, y_train = x_train.to(info.device), y_train.to(info.device)

    torch.manual_seed(int(cfg["seed"]))  # same initial weights on every rank
    model = MnistClassifier().to(info.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    trainer = Trainer(cfg, info, model, optimizer, stop=stop, checkpoint=checkpoint)

    def step_fn(model: torch.nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        idx = idx.to(info.device)
        logits = model(x_train[idx])  # (B, 10)
        accuracy = (logits.argmax(1) == y_train[idx]).float().mean()
        return F.cross_entropy(logits.float(), y_train[idx]), {"accuracy": accuracy}

    def on_end(trainer: Trainer) -> dict[str, float]:
        x_test, y_test = load_split(cfg, "test")
        acc = evaluate_accuracy(trainer.raw_model, x_test, y_test, trainer)
        if info.is_main:
            path = os.path.abspath(os.path.join(cfg["run_dir"], "classifier.pt"))
            meta = {"data": cfg["data"], "test_accuracy": acc, "n_test": len(x_test), "step": trainer.step}
            tmp = f"{path}.tmp-{os.getpid()}"  # written aside then renamed: readers never see half a file
            save_classifier(trainer.raw_model, tmp, meta)  # type: ignore[arg-type]
            os.replace(tmp, path)
            trainer.events.emit("artifact", kind="classifier", path=path, sha256=sha256_file(path),
                                bytes=os.path.getsize(path))
        return {"test_accuracy": acc}

    trainer.fit(x_train.shape[0], step_fn, on_end=on_end)
    teardown_distributed(info)
    return 0


if __name__ == "__main__":
    exit_rank(main())  # an exception still exits 1 with its traceback
