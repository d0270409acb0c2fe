"""eval-translator: PSNR/SSIM of a translator checkpoint on the test pairs of its invert job, sharded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kinds._common import checkpoint_of, finished_job
from kinds.base import Kind, Plan, fmt, option
from shared import constants as C


@dataclass(frozen=True)
class EvalTranslatorOptions:
    checkpoint: int = option(None, "checkpoint id (orchestrator results TRAIN_JOB)", required=True, type=int)
    shards: int = option(4, type=int)
    batch_size: int = option(8, type=int)


def plan(settings, o: EvalTranslatorOptions) -> Plan:
    from kinds.checks import check_positive, check_shards, plan_contiguous
    from shared.errors import UserError
    from shared.store import store

    train_job, uri = checkpoint_of(settings, o.checkpoint, "train-translator", "a translator")
    inv = finished_job(settings, train_job.spec["latents"], "invert", "latents job")
    test = store(settings).split_pairs(inv.id, "test")
    if not test:
        raise UserError(f"invert job {inv.id} has no test pairs: re-run it with a larger --test-fraction")
    check_shards(o.shards, len(test), "test pairs")
    check_positive("--batch-size", o.batch_size)
    items = []
    for shard, (a, b) in enumerate(plan_contiguous(len(test), o.shards)):
        for pid, rgb, ir in test[a:b]:
            items.append({"pair_id": pid, "split": "test", "rgb_path": rgb, "ir_path": ir, "shard_index": shard})
    spec = {
        "checkpoint_id": o.checkpoint, "checkpoint_uri": uri, "train_job": train_job.id, "latents": inv.id,
        "model": inv.spec["model"], "inversion": inv.spec["inversion"],
        "precision": inv.spec.get("precision", "auto"), "batch_size": o.batch_size, "test_pairs": len(test),
    }
    lineage = [("checkpoint", str(o.checkpoint), "translator"), ("job", train_job.id, "training"),
               ("job", inv.id, "latents")]
    return Plan(spec, o.shards, items, lineage)


def describe(data: Any) -> str:
    sp, m, n = data.job.get("spec") or {}, data.summary, data.job["shards_total"]
    return (f"Evaluated translator checkpoint {sp.get('checkpoint_id')} (job {sp.get('train_job')}) on "
            f"{fmt(m.get('pairs', sp.get('test_pairs')))} test pairs of job {sp.get('latents')} in {n} shards: "
            f"PSNR {fmt(m.get('psnr'))} dB, SSIM {fmt(m.get('ssim'))} (identity baseline PSNR "
            f"{fmt(m.get('psnr_baseline'))} dB, SSIM {fmt(m.get('ssim_baseline'))}).")


KIND = Kind(
    name="eval-translator",
    help="PSNR/SSIM of a translator checkpoint on the test pairs",
    options=EvalTranslatorOptions, plan=plan, describe=describe,
    queue=C.QUEUE_GPU, task="eval_translator.shard",
    work="workers.tasks.evaluate:eval_translator_work", finalize="workers.tasks.evaluate:finalize_eval_translator",
    results="item_metrics", pictures=("eval_grids",),
)
