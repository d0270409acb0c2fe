"""Read side of the results DB: what `status`, `jobs`, `results` and `metrics` print. Bound parameters only."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

import kinds
from shared import constants as C
from shared.db import ensure_schema, session_scope
from shared.errors import UserError
from shared.models import Artifact, Checkpoint, Item, Job, Lineage, Metric, Shard
from shared.settings import Settings
from shared.status import JobState, ShardState


def _job_or_error(s, job_id: str) -> Job:
    job = s.get(Job, job_id)
    if job is None:
        raise UserError(f"no job '{job_id}': list jobs with `orchestrator jobs`")
    return job


def job_status(settings: Settings, job_id: str) -> dict[str, Any]:
    ensure_schema(settings)
    with session_scope(settings) as s:
        job = _job_or_error(s, job_id)
        counts = dict(
            s.execute(
                select(Shard.state, func.count()).where(Shard.job_id == job_id).group_by(Shard.state)
            ).all()
        )
        running = s.execute(
            select(Shard.index, Shard.worker, Shard.progress, Shard.attempts)
            .where(Shard.job_id == job_id, Shard.state == ShardState.RUNNING)
            .order_by(Shard.index)
            .limit(50)
        ).all()
        lineage = s.execute(select(Lineage.input_kind, Lineage.input_ref, Lineage.role)
                            .where(Lineage.job_id == job_id)).all()
        return {
            "job_id": job.id,
            "kind": job.kind,
            "state": job.state,
            "shards_total": job.shards_total,
            "shards_done": job.shards_done,
            "shards_failed": job.shards_failed,
            "shards_by_state": {str(k): v for k, v in counts.items()},
            "running": [
                {"shard": i, "worker": w, "progress": p, "attempts": a} for i, w, p, a in running
            ],
            "created_at": job.created_at.isoformat() if job.created_at else None,
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "error": job.error,
            "lineage": [{"kind": k, "ref": r, "role": role} for k, r, role in lineage],
            "spec": job.spec,
        }


def list_jobs(settings: Settings, kind: str | None = None, state: str | None = None, limit: int = 50) -> list[dict]:
    ensure_schema(settings)
    q = select(Job.id, Job.kind, Job.state, Job.shards_done, Job.shards_total, Job.created_at).order_by(
        Job.created_at.desc()
    )
    if kind:
        q = q.where(Job.kind == kind)
    if state:
        q = q.where(Job.state == state)
    with session_scope(settings) as s:
        rows = s.execute(q.limit(limit)).all()
    return [
        {"job_id": r[0], "kind": r[1], "state": r[2], "shards_done": r[3], "shards_total": r[4],
         "created_at": r[5].isoformat() if r[5] else None}
        for r in rows
    ]


def results(settings: Settings, job_id: str, limit: int | None = None, offset: int = 0,
            after: str | None = None) -> list[dict[str, Any]]:
    """One record per result of the job: pairs for invert, checkpoints for training, per-item metrics for
    evaluations, artifacts otherwise.

    Pages: ``limit`` and ``offset``, or ``after`` (keyset: the records after this pair id / item, in order), which
    costs the same on the last page as on the first (an offset makes the database walk past every earlier row).
    """
    ensure_schema(settings)
    with session_scope(settings) as s:
        job = _job_or_error(s, job_id)
        results = getattr(kinds.find(job.kind), "results", "item_metrics")
        if results == "pairs":
            q = (
                select(Item.pair_id, Item.split, Item.shard_index, Item.position, Artifact.uri, Artifact.sha256)
                .outerjoin(Artifact, Artifact.id == Item.artifact_id)
                .where(Item.job_id == job_id)
                .order_by(Item.pair_id)
                .offset(offset)
            )
            if after is not None:
                q = q.where(Item.pair_id > after)
            if limit:
                q = q.limit(limit)
            return [
                {"pair_id": p, "split": sp, "shard": sh, "position": pos, "artifact": uri, "sha256": sha}
                for p, sp, sh, pos, uri, sha in s.execute(q).all()
            ]
        if results == "checkpoints":
            q = (
                select(Checkpoint.id, Checkpoint.step, Checkpoint.epoch, Checkpoint.reason, Artifact.uri,
                       Artifact.sha256, Artifact.bytes)
                .join(Artifact, Artifact.id == Checkpoint.artifact_id)
                .where(Checkpoint.job_id == job_id)
                .order_by(Checkpoint.step)
            )
            return [
                {"checkpoint_id": c, "step": st, "epoch": ep, "reason": r, "artifact": u, "sha256": h, "bytes": b}
                for c, st, ep, r, u, h, b in s.execute(q).all()
            ]
        # per-item metrics (evaluations): a page of items in SQL, then their metrics (ix_metrics_job_step_item)
        # ordered by item so that the planner walks ix_metrics_job_step_item: with a bare LIMIT 1 it may pick a
        # sequential scan, which is quick when the job's rows happen to be early in the table and slow when not
        has_items = s.execute(
            select(Metric.item).where(Metric.job_id == job_id, Metric.step == C.SUMMARY_STEP, Metric.item > C.NO_ITEM)
            .order_by(Metric.item).limit(1)
        ).first()
        if has_items:
            page = (
                select(Metric.item)
                .where(Metric.job_id == job_id, Metric.step == C.SUMMARY_STEP, Metric.item > (after or C.NO_ITEM))
                .group_by(Metric.item).order_by(Metric.item).offset(offset)
            )
            if limit:
                page = page.limit(limit)
            page = page.subquery()
            rows: dict[str, dict[str, Any]] = {}
            for item, name, value in s.execute(
                select(Metric.item, Metric.name, Metric.value)
                .where(Metric.job_id == job_id, Metric.step == C.SUMMARY_STEP, Metric.item.in_(select(page.c.item)))
                .order_by(Metric.item, Metric.name)
            ).all():
                rows.setdefault(item, {"item": item})[name] = value
            return list(rows.values())
        q = select(Artifact.id, Artifact.kind, Artifact.shard_index, Artifact.uri, Artifact.sha256, Artifact.bytes).where(
            Artifact.job_id == job_id
        ).order_by(Artifact.shard_index, Artifact.id)
        return [
            {"artifact_id": a, "kind": k, "shard": sh, "artifact": u, "sha256": h, "bytes": b}
            for a, k, sh, u, h, b in s.execute(q).all()
        ]


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
    ensure_schema(settings)
    with session_scope(settings) as s:
        job = _job_or_error(s, job_id)
        rows = s.execute(
            select(Metric.name, Metric.value)
            .where(Metric.job_id == job_id, Metric.step == C.SUMMARY_STEP, Metric.item == C.NO_ITEM)
            .order_by(Metric.name)
        ).all()
        out: dict[str, Any] = {n: as_count(n, v) for n, v in rows}
        kind = kinds.find(job.kind)
        if out and kind is not None and kind.summary_extra is not None:
            out.update(kind.summary_extra(s, job))
    return out


def metric_history(settings: Settings, job_id: str, name: str) -> list[tuple[int, float]]:
    with session_scope(settings) as s:
        return [
            (st, v)
            for st, v in s.execute(
                select(Metric.step, Metric.value)
                .where(Metric.job_id == job_id, Metric.name == name, Metric.step >= 0, Metric.item == C.NO_ITEM)
                .order_by(Metric.step)
            ).all()
        ]


def finished(state: str) -> bool:
    return JobState(state).finished
