"""Read side of the results DB: what `status`, `jobs`, `results` and `metrics` print, from the reads of the Store
(shared/store.py)."""

from __future__ import annotations

from typing import Any

import kinds
from shared.settings import Settings
from shared.status import JobState
from shared.store import store


def _iso(dt) -> str | None:
    return dt.isoformat() if dt else None


def job_status(settings: Settings, job_id: str) -> dict[str, Any]:
    st = store(settings).job_status(job_id, running_limit=50)
    job = st.job
    return {
        "job_id": job.id,
        "kind": job.kind,
        "state": job.state,
        "shards_total": job.shards_total,
        "shards_done": job.shards_done,
        "shards_failed": job.shards_failed,
        "shards_by_state": st.by_state,
        "running": [
            {"shard": r.index, "worker": r.worker, "progress": r.progress, "attempts": r.attempts} for r in st.running
        ],
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "error": job.error,
        "lineage": [{"kind": k, "ref": r, "role": role} for k, r, role in st.lineage],
        "spec": job.spec,
    }


def list_jobs(settings: Settings, kind: str | None = None, state: str | None = None, limit: int = 50) -> list[dict]:
    return [
        {"job_id": r.id, "kind": r.kind, "state": r.state, "shards_done": r.shards_done,
         "shards_total": r.shards_total, "created_at": _iso(r.created_at)}
        for r in store(settings).list_jobs(kind, state, limit)
    ]


def _results_shape(kind: str) -> str:
    return getattr(kinds.find(kind), "results", "item_metrics")


def results(settings: Settings, job_id: str, limit: int | None = None, offset: int = 0,
            after: str | None = None) -> list[dict[str, Any]]:
    """One record per result of the job: pairs for invert, checkpoints for training, per-item metrics for
    evaluations, artifacts otherwise (the kind's `results`, kinds/base.py).

    Pages: ``limit`` and ``offset``, or ``after`` (keyset: the records after this pair id / item, in order), which
    costs the same on the last page as on the first (an offset makes the database walk past every earlier row).
    """
    return store(settings).results(job_id, _results_shape, limit=limit, offset=offset, after=after)


#: Summary metrics that count things (stored as floats like every metric, shown as integers).
COUNT_METRICS = frozenset({"pairs", "pairs_train", "pairs_test", "pairs_skipped", "samples", "shards", "steps",
                           "world_size", "epochs"})


def as_count(name: str, value: float) -> Any:
    """`value` as an int when `name` is a count (or an id: final_checkpoint_id, n_real) and it is whole."""
    is_count = name in COUNT_METRICS or name.startswith("n_") or name.endswith("_id")
    if is_count and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def summary_metrics(settings: Settings, job_id: str) -> dict[str, Any]:
    """Flat {name: value} of the job's summary metrics. FID/IS also name their feature extractor, because FIDs
    from different extractors are not comparable."""
    metrics, extra = store(settings).summary_metrics(job_id, _summary_extra)
    out: dict[str, Any] = {n: as_count(n, v) for n, v in metrics.items()}
    out.update(extra)
    return out


def _summary_extra(s, job) -> dict[str, Any]:
    kind = kinds.find(job.kind)
    return kind.summary_extra(s, job) if kind is not None and kind.summary_extra is not None else {}


def metric_history(settings: Settings, job_id: str, name: str) -> list[tuple[int, float]]:
    return store(settings).metric_history(job_id, name)


def finished(state: str) -> bool:
    return JobState(state).finished
