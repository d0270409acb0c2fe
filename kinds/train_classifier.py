"""train-classifier: the small MNIST classifier whose features the offline FID/IS use."""

from __future__ import annotations

from dataclasses import dataclass

from kinds._common import check_mnist, check_positives, given, train_describe
from kinds.base import Kind, Plan, option
from shared import constants as C


@dataclass(frozen=True)
class TrainClassifierOptions:
    data: str = option("mnist:embedded")
    epochs: int | None = option(None, type=int)
    batch_size: int | None = option(None, type=int)
    lr: float | None = option(None, type=float)
    gpus: int = option(1, type=int)
    max_train_samples: int | None = option(None, type=int)
    log_every: int | None = option(None, type=int)
    seed: int | None = option(None, type=int)


def plan(settings, o: TrainClassifierOptions) -> Plan:
    data = check_mnist(o.data)
    check_positives(o, ("epochs", "batch_size", "lr", "gpus", "max_train_samples"))
    spec = given(data=data, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr, seed=o.seed,
                 max_train_samples=o.max_train_samples, log_every=o.log_every)
    spec["gpus"] = o.gpus
    return Plan(spec, lineage=[("data", data, "train")])


KIND = Kind(
    name="train-classifier",
    help="train the MNIST classifier used as an offline feature extractor",
    options=TrainClassifierOptions, plan=plan,
    describe=train_describe("the MNIST feature classifier ({data})"),
    queue=C.QUEUE_TRAIN, task="train.run", work="workers.tasks.train:train_work",
    training=True, entry_point="workers.train.classifier",
    results="checkpoints", pictures=("loss", "images"),
)
