"""sample: annealed Langevin sampling from an NCSN checkpoint, sharded over GPU workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kinds._common import checkpoint_of, given
from kinds.base import Kind, Plan, option
from shared import constants as C


@dataclass(frozen=True)
class SampleOptions:
    checkpoint: int = option(None, required=True, type=int)
    n: int = option(10000, type=int)
    shards: int = option(8, type=int)
    batch_size: int = option(1000, type=int)
    steps_each: int | None = option(None, "default: the checkpoint's preset (100)", type=int)
    seed: int = option(0, type=int)


def plan(settings, o: SampleOptions) -> Plan:
    from kinds.checks import check_positive, check_shards

    train_job, uri = checkpoint_of(settings, o.checkpoint, "train-ncsn", "an NCSN")
    check_positive("--n", o.n)
    check_shards(o.shards, o.n, "samples")
    check_positive("--batch-size", o.batch_size)
    check_positive("--steps-each", o.steps_each)
    spec = given(checkpoint_id=o.checkpoint, checkpoint_uri=uri, train_job=train_job.id, n=o.n, shards=o.shards,
                 seed=o.seed, batch_size=o.batch_size, n_steps_each=o.steps_each)
    lineage = [("checkpoint", str(o.checkpoint), "score-model"), ("job", train_job.id, "training")]
    return Plan(spec, o.shards, (), lineage)


def describe(data: Any) -> str:
    sp, n = data.job.get("spec") or {}, data.job["shards_total"]
    return (f"Drew {sp.get('n')} digits by annealed Langevin dynamics from NCSN checkpoint "
            f"{sp.get('checkpoint_id')} (job {sp.get('train_job')}), seed {sp.get('seed', 0)}, in {n} shards.")


KIND = Kind(
    name="sample",
    help="annealed Langevin sampling from an NCSN checkpoint, sharded",
    options=SampleOptions, plan=plan, describe=describe,
    queue=C.QUEUE_GPU, task="sample.shard",
    work="workers.tasks.ncsn:sample_work", finalize="workers.tasks.ncsn:finalize_sample",
    results="item_metrics", pictures=("sample_grids",),
)
