"""Train a Noise Conditional Score Network on MNIST with denoising score matching, with DDP.

    torchrun --standalone --nproc_per_node=G -m workers.train.ncsn --config CONFIG.json
    python -m workers.train.ncsn --config CONFIG.json        # one process, no DDP

CONFIG.json holds the common keys of ``workers.train.common`` plus
    "data": "mnist:embedded" or an MNIST IDX folder (the train split is used)
    "max_train_samples": optional cap (the first N digits of the split; embedded prefixes are class-balanced)
    "preset": "ncsn" | "seed-code" (default "ncsn"), whose ``NCSN_PRESETS`` keys are the defaults for the
      noise levels (sigma_kind, sigma_max, sigma_min, num_levels), data_scale, optimizer, lr, warmup_steps,
      lr_schedule ("constant" or "cosine" to 0 at the run's last step: epochs or max_steps), weight_decay,
      batch_size, epochs, amp, ema_decay and the network (base_channels, channel_mults, scale_by_sigma);
      any of them given in the file wins.
The loss backpropagated is NCSN's (sigma^2 / 2 * sum, batch mean); the seed code's units (sigma^2 * mean) are
logged beside it as the metric "loss_seed_units_epoch". EMA weights, when ema_decay is set, live in the
checkpoint under extra["ema"]; ``load_score_model`` returns them ready for sampling. extra["data_mean"] holds the
training digits' per-pixel mean, the centre of the sampler's start when the preset's "init" is "prior".
"""

from __future__ import annotations

import torch

from shared.errors import UserError
from workers.ml.mnist import load_mnist, to_tensor
from workers.ml.ncsn import ScoreUNet
from workers.ml.score import EMA, dsm_loss, get_preset, get_sigmas, lr_factor
from workers.train.common import (
    StopFlag,
    Trainer,
    load_checkpoint,
    read_config,
    setup_distributed,
    teardown_distributed,
)
from workers.train.runtime import exit_rank


def preset_defaults(given: dict) -> dict:
    """Defaults from the named NCSN preset ("ncsn" when none is named; a dict is laid over "ncsn")."""
    preset = given.get("preset", "ncsn")
    if isinstance(preset, dict):
        return {**get_preset("ncsn"), **preset}
    return get_preset(preset)


def build_model(cfg: dict) -> ScoreUNet:
    """The score network described by a run config (MNIST: one channel, 28x28)."""
    return ScoreUNet(
        in_channels=1,
        base_channels=int(cfg["base_channels"]),
        channel_mults=tuple(cfg["channel_mults"]),
        scale_by_sigma=bool(cfg["scale_by_sigma"]),
    )


def build_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam or AdamW as the config's "optimizer" says (NCSN used Adam, the seed code AdamW)."""
    name = cfg.get("optimizer", "adamw")
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in kinds:
        raise UserError(f"unknown optimizer {name!r}: use adam or adamw")
    return kinds[name](model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))


class DataMean:
    """The training digits' per-pixel mean (1, 28, 28), kept in the checkpoint for the sampler's start
    (``init_prior``: N(mean, sigma_1^2))."""

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean.detach().cpu().clone()

    def state_dict(self) -> dict:
        return {"mean": self.mean}

    def load_state_dict(self, state: dict) -> None:
        self.mean = state["mean"].clone()


def load_score_model(
    path: str, device: torch.device | str = "cpu", use_ema: bool = True
) -> tuple[ScoreUNet, torch.Tensor, dict]:
    """Rebuild a trained score network from a training checkpoint, for sampling.

    Returns (model in eval mode on ``device`` with the EMA weights when the run kept an EMA and ``use_ema``,
    sigmas (L,) float32, config). The config carries "data_mean" (a tensor) when the checkpoint holds it.
    """
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    if use_ema and ckpt["extra"].get("ema") is not None:
        ema = EMA(model, decay=float(ckpt["extra"]["ema"]["decay"]))
        ema.load_state_dict(ckpt["extra"]["ema"])
        ema.copy_to(model)
    if ckpt["extra"].get("data_mean") is not None:
        cfg = {**cfg, "data_mean": ckpt["extra"]["data_mean"]["mean"]}
    sigmas = get_sigmas(cfg["sigma_kind"], cfg["sigma_max"], cfg["sigma_min"], int(cfg["num_levels"]))
    return model.to(device).eval(), sigmas, cfg


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag.install()  # first: a cancel during start-up is honoured at the first step boundary
    cfg, checkpoint = read_config(argv, "Train an NCSN score model on MNIST.", preset_defaults)
    info = setup_distributed(cfg["device"])
    if cfg.get("num_threads"):  # intra-op threads per rank (the worker's OMP_NUM_THREADS otherwise)
        torch.set_num_threads(int(cfg["num_threads"]))

    images, _ = load_mnist(cfg["data"], "train")  # (N, 28, 28) uint8
    if cfg.get("max_train_samples"):
        images = images[: int(cfg["max_train_samples"])]
    x_all = to_tensor(images, cfg["data_scale"]).to(info.device)  # (N, 1, 28, 28)
    sigmas = get_sigmas(cfg["sigma_kind"], cfg["sigma_max"], cfg["sigma_min"], int(cfg["num_levels"]))
    sigmas = sigmas.to(info.device)  # (L,)

    torch.manual_seed(int(cfg["seed"]))  # same initial weights on every rank
    model = build_model(cfg).to(info.device)
    optimizer = build_optimizer(cfg, model)
    ema = EMA(model, float(cfg["ema_decay"]), bool(cfg.get("ema_warmup"))) if cfg.get("ema_decay") else None
    extra: dict = {"data_mean": DataMean(x_all.mean(dim=0))}
    if checkpoint is not None:  # a checkpoint written before the mean was kept: the same data gives the same mean
        checkpoint["extra"].setdefault("data_mean", extra["data_mean"].state_dict())
    if ema is not None:
        extra["ema"] = ema
    trainer = Trainer(
        cfg, info, model, optimizer, stop=stop, checkpoint=checkpoint, extra_state=extra,
        after_step=(lambda: ema.update(model)) if ema is not None else None,
    )

    warmup, base_lr = int(cfg.get("warmup_steps") or 0), float(cfg["lr"])
    schedule = str(cfg.get("lr_schedule") or "constant")

    def step_fn(model: torch.nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if warmup or schedule != "constant":  # trainer.step counts the steps already taken (restored on resume)
            factor = lr_factor(trainer.step, trainer.total_steps, warmup, schedule)
            for group in optimizer.param_groups:
                group["lr"] = base_lr * factor
        # each rank draws its own levels and noise from its own RNG (seeded seed + rank, restored on resume)
        out = dsm_loss(model, x_all[idx.to(info.device)], sigmas)
        return out["loss"], {"loss_seed_units": out["loss_seed_units"]}

    trainer.fit(x_all.shape[0], step_fn)
    teardown_distributed(info)
    return 0


if __name__ == "__main__":
    exit_rank(main())  # an exception still exits 1 with its traceback
