"""eval-fid: FID and IS of a sample job's digits against reference digits (Inception or classifier features)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kinds._common import check_mnist, checkpoint_of, finished_job
from kinds.base import Kind, Plan, fmt, option
from shared import constants as C


@dataclass(frozen=True)
class EvalFidOptions:
    samples: str = option(None, "id of a succeeded sample job", required=True)
    reference: str = option("mnist:embedded")
    reference_split: str = option("test", choices=("train", "test"))
    n_real: int | None = option(None, "use the first N reference digits", type=int)
    features: str = option("mnist-classifier", choices=("inception", "mnist-classifier"))
    inception_weights: str | None = option(None, "local pt_inception-2015-12-05 weights file")
    classifier: int | None = option(None, "checkpoint id of a train-classifier job", type=int)
    is_splits: int = option(10, type=int)
    seed: int = option(0, type=int)


def plan(settings, o: EvalFidOptions) -> Plan:
    from shared.errors import UserError

    samples = finished_job(settings, o.samples, "sample", "--samples")
    reference = check_mnist(o.reference, "--reference")
    spec: dict[str, Any] = {"samples": samples.id, "reference": reference, "reference_split": o.reference_split,
                            "features": o.features, "is_splits": o.is_splits, "seed": o.seed,
                            "n_fake": samples.spec["n"]}
    if o.n_real:
        spec["n_real"] = o.n_real
    if o.is_splits < 1 or o.is_splits > samples.spec["n"]:
        raise UserError(f"--is-splits must be between 1 and the {samples.spec['n']} samples (got {o.is_splits})")
    lineage = [("job", samples.id, "samples"), ("data", reference, "reference")]
    if o.features == "inception":
        from workers.ml.fid import resolve_inception_weights

        spec["inception_weights"] = str(resolve_inception_weights(o.inception_weights))
        spec["feature_extractor"] = "inception-v3-2048"
        lineage.append(("model", spec["inception_weights"], "features"))
    else:
        if o.classifier is None:
            raise UserError("--features mnist-classifier needs --classifier CKPT_ID (from a train-classifier job)")
        _job, uri = checkpoint_of(settings, o.classifier, "train-classifier", "a classifier")
        spec["classifier_uri"] = uri
        spec["feature_extractor"] = f"mnist-classifier (checkpoint {o.classifier})"
        lineage.append(("checkpoint", str(o.classifier), "features"))
    return Plan(spec, 1, (), lineage)


def describe(data: Any) -> str:
    sp, m = data.job.get("spec") or {}, data.summary
    return (f"Compared the {sp.get('n_fake')} samples of job {sp.get('samples')} with {sp.get('reference')} "
            f"({sp.get('reference_split')} split) using {m.get('feature_extractor', sp.get('feature_extractor'))}"
            f" features: FID {fmt(m.get('fid'))}, IS {fmt(m.get('is_mean'))} +/- {fmt(m.get('is_std'))}.")


def summary_extra(s, job) -> dict[str, Any]:
    """FIDs from different extractors are not comparable: the summary names the one that was used."""
    from shared.store import Store

    result = Store.shard_result(s, job.id, 0)
    return {"feature_extractor": (result or {}).get("feature_extractor", job.spec.get("feature_extractor"))}


KIND = Kind(
    name="eval-fid",
    help="FID and IS of a sample job against reference digits",
    options=EvalFidOptions, plan=plan, describe=describe, summary_extra=summary_extra,
    queue=C.QUEUE_GPU, task="eval_fid.run", work="workers.tasks.ncsn:eval_fid_work",
    results="item_metrics", pictures=("fid_table", "images"),
)
