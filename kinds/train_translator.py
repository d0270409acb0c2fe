"""train-translator: the latent U-Net z_rgb_t -> z_ir_t, one DDP training run on the train pairs of an invert job."""

from __future__ import annotations

from dataclasses import dataclass

from kinds._common import check_positives, finished_job, given, train_describe
from kinds.base import Kind, Plan, option
from shared import constants as C


@dataclass(frozen=True)
class TrainTranslatorOptions:
    latents: str = option(None, "id of a succeeded invert job", required=True)
    preset: str = option("readme", choices=("readme", "seed-code"))
    epochs: int | None = option(None, "default: the preset's (25)", type=int)
    lr: float | None = option(None, type=float)
    weight_decay: float | None = option(None, type=float)
    batch_size: int | None = option(None, "per process", type=int)
    gpus: int = option(1, "DDP processes (GPUs; gloo processes on CPU)", type=int)
    base_channels: int | None = option(None, type=int)
    depth: int | None = option(None, "number of downsamples", type=int)
    amp: bool = option(False, "bf16/fp16 autocast on GPU", flag=True)
    checkpoint_every: int | None = option(None, "steps (0: epoch ends only)", type=int)
    max_steps: int | None = option(None, type=int)
    log_every: int | None = option(None, type=int)
    seed: int | None = option(None, type=int)


def plan(settings, o: TrainTranslatorOptions) -> Plan:
    from shared.errors import UserError
    from shared.store import store

    inv = finished_job(settings, o.latents, "invert", "--latents")
    n_train = store(settings).count_pairs(inv.id, "train")
    if n_train == 0:
        raise UserError(f"invert job {inv.id} has no train pairs: re-run it with a smaller --test-fraction")
    check_positives(o, ("epochs", "lr", "batch_size", "gpus", "base_channels", "depth", "checkpoint_every",
                        "max_steps"), zero_ok=("checkpoint_every",))
    model = given(base_channels=o.base_channels, depth=o.depth)
    spec = given(latents=inv.id, preset=o.preset, epochs=o.epochs, lr=o.lr, batch_size=o.batch_size,
                 weight_decay=o.weight_decay, seed=o.seed, checkpoint_every=o.checkpoint_every,
                 max_steps=o.max_steps, log_every=o.log_every)
    if model:
        spec["model"] = model
    spec.update(gpus=o.gpus, amp=bool(o.amp), train_pairs=n_train)
    return Plan(spec, lineage=[("job", inv.id, "latents")])


KIND = Kind(
    name="train-translator",
    help="train the latent U-Net z_rgb_t -> z_ir_t with DDP",
    options=TrainTranslatorOptions, plan=plan,
    describe=train_describe("the latent U-Net translator z_rgb_t -> z_ir_t on the {train_pairs} train pairs of "
                            "job {latents}"),
    queue=C.QUEUE_TRAIN, task="train.run", work="workers.tasks.train:train_work",
    training=True, entry_point="workers.train.translator",
    results="checkpoints", pictures=("loss", "images"),
)
