"""Idempotent writes of a shard's outputs (artifacts, metrics, checkpoints), used inside the completing transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared import constants as C
from shared.db import upsert
from shared.models import Artifact, Metric
from shared.storage import StoredFile
from workers.bookkeeping import utcnow


def record_artifact(
    s: Session,
    job_id: str,
    shard_index: int | None,
    kind: str,
    stored: StoredFile,
    meta: dict[str, Any] | None = None,
) -> int:
    """Upsert an artifact row keyed by its URI and return its id (a re-run rewrites the same row)."""
    upsert(
        s,
        Artifact,
        [
            {
                "job_id": job_id,
                "shard_index": shard_index,
                "kind": kind,
                "uri": stored.uri,
                "sha256": stored.sha256,
                "bytes": stored.bytes,
                "meta": meta,
                "created_at": utcnow(),
            }
        ],
        key=["uri"],
        update=["sha256", "bytes", "meta", "kind", "job_id", "shard_index"],
    )
    return s.execute(select(Artifact.id).where(Artifact.uri == stored.uri)).scalar_one()


def record_metrics(
    s: Session,
    job_id: str,
    values: Mapping[str, float] | Iterable[tuple[str, float, int, str]],
    shard_index: int | None = None,
) -> None:
    """Upsert metrics: a mapping is a job summary; tuples are (name, value, step, item)."""
    if isinstance(values, Mapping):
        rows = [(k, float(v), C.SUMMARY_STEP, C.NO_ITEM) for k, v in values.items()]
    else:
        rows = [(n, float(v), int(st), str(it)) for n, v, st, it in values]
    now = utcnow()
    upsert(
        s,
        Metric,
        [
            {"job_id": job_id, "name": n, "value": v, "step": st, "item": it, "shard_index": shard_index,
             "created_at": now}
            for n, v, st, it in rows
        ],
        key=["job_id", "name", "step", "item"],
        update=["value", "shard_index"],
    )


def record_item_means(s: Session, job_id: str, count_name: str = "pairs") -> None:
    """The job's summary: the mean over items of every per-item metric, and the number of items as `count_name`
    (an evaluation's finaliser; per item, then averaged, as the seed project averaged per-image values)."""
    rows = s.execute(
        select(Metric.name, func.avg(Metric.value), func.count())
        .where(Metric.job_id == job_id, Metric.item != C.NO_ITEM)
        .group_by(Metric.name)
    ).all()
    values = {name: float(avg) for name, avg, _ in rows}
    if rows:
        values[count_name] = float(rows[0][2])
    record_metrics(s, job_id, values)


def record_rejection(settings, kind: str, ref: str, reason: str, job_id: str | None = None,
                     worker: str | None = None) -> None:
    """Record refused input (a skipped image, a malformed message) in its own transaction."""
    from shared.db import session_scope
    from shared.models import Rejection

    with session_scope(settings) as s:
        s.add(Rejection(job_id=None if job_id is None else str(job_id)[:255], kind=kind, ref=str(ref)[:1024],
                        reason=str(reason)[:4000], worker=worker))
