"""train-ncsn: a noise conditional score network on MNIST, one DDP training run."""

from __future__ import annotations

from dataclasses import dataclass

from kinds._common import check_mnist, check_positives, given, train_describe
from kinds.base import Kind, Plan, option
from shared import constants as C


@dataclass(frozen=True)
class TrainNcsnOptions:
    data: str = option("mnist:embedded", "mnist:embedded or a folder of MNIST IDX files")
    preset: str = option("ncsn", choices=("ncsn", "seed-code"))
    epochs: int | None = option(None, type=int)
    batch_size: int | None = option(None, type=int)
    lr: float | None = option(None, type=float)
    gpus: int = option(1, type=int)
    base_channels: int | None = option(None, type=int)
    max_train_samples: int | None = option(None, type=int)
    steps_each: int | None = option(None, "Langevin steps per noise level when sampling", type=int)
    amp: bool = option(False, flag=True)
    checkpoint_every: int | None = option(None, type=int)
    max_steps: int | None = option(None, type=int)
    log_every: int | None = option(None, type=int)
    seed: int | None = option(None, type=int)


def plan(settings, o: TrainNcsnOptions) -> Plan:
    from workers.ml.score import get_preset

    data = check_mnist(o.data)
    get_preset(o.preset)  # UserError for an unknown preset
    check_positives(o, ("epochs", "batch_size", "lr", "gpus", "base_channels", "max_steps", "max_train_samples"))
    spec = given(data=data, preset=o.preset, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr, seed=o.seed,
                 checkpoint_every=o.checkpoint_every, max_steps=o.max_steps, base_channels=o.base_channels,
                 max_train_samples=o.max_train_samples, n_steps_each=o.steps_each, log_every=o.log_every)
    spec.update(gpus=o.gpus, amp=bool(o.amp))
    return Plan(spec, lineage=[("data", data, "train")])


KIND = Kind(
    name="train-ncsn",
    help="train a noise conditional score network on MNIST with DDP",
    options=TrainNcsnOptions, plan=plan,
    describe=train_describe("a noise conditional score network on MNIST ({data})"),
    queue=C.QUEUE_TRAIN, task="train.run", work="workers.tasks.train:train_work",
    training=True, entry_point="workers.train.ncsn",
    results="checkpoints", pictures=("loss", "images"),
)
