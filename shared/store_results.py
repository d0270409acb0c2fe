"""The Store's statements about what jobs produced: result pages and summary metrics (orchestrator/queries.py),
everything a report shows (orchestrator/report.py, orchestrator/report_pictures.py) and the pairs of an invert job
that the plans of later jobs read (kinds/). Part of shared/store.py.

How a kind's results are listed and which extra summary fields it has are the kind's (kinds/); the callers pass them
in, so this module stays below kinds/."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from shared import constants as C
from shared.models import Artifact, Checkpoint, Item, Job, Lineage, Metric, Shard

if TYPE_CHECKING:
    from shared.store import Store


@dataclass
class ReportRows:
    """What a report reads of a job, as dicts: the job, its shards, metric curves and per-item values, artifacts,
    checkpoints, its inputs (with a word on each) and the jobs that used it or its checkpoints."""

    job: dict[str, Any]
    shards: list[dict[str, Any]]
    curves: dict[str, list[tuple[int, float]]]
    per_item: dict[str, dict[str, float]]
    artifacts: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    inputs: list[dict[str, Any]]
    used_by: list[dict[str, Any]]


class ResultStatements:
    def results(self: Store, job_id: str, shape_of: Callable[[str], str], limit: int | None = None, offset: int = 0,
                after: str | None = None) -> list[dict[str, Any]]:
        """One record per result of the job, as `shape_of(job kind)` says: "pairs" (invert), "checkpoints"
        (training), "item_metrics" (per-item metrics of evaluations; artifacts when there are none).

        Pages: ``limit`` and ``offset``, or ``after`` (keyset: the records after this pair id / item, in order), which
        costs the same on the last page as on the first (an offset makes the database walk past every earlier row).
        """
        with self.session() as s:
            shape = shape_of(self._job_in(s, job_id).kind)
            if shape == "pairs":
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
            if shape == "checkpoints":
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
                select(Metric.item)
                .where(Metric.job_id == job_id, Metric.step == C.SUMMARY_STEP, Metric.item > C.NO_ITEM)
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
                    .where(Metric.job_id == job_id, Metric.step == C.SUMMARY_STEP,
                           Metric.item.in_(select(page.c.item)))
                    .order_by(Metric.item, Metric.name)
                ).all():
                    rows.setdefault(item, {"item": item})[name] = value
                return list(rows.values())
            q = select(Artifact.id, Artifact.kind, Artifact.shard_index, Artifact.uri, Artifact.sha256,
                       Artifact.bytes).where(Artifact.job_id == job_id).order_by(Artifact.shard_index, Artifact.id)
            return [
                {"artifact_id": a, "kind": k, "shard": sh, "artifact": u, "sha256": h, "bytes": b}
                for a, k, sh, u, h, b in s.execute(q).all()
            ]

    def summary_metrics(self: Store, job_id: str, extra: Callable[[Session, Job], dict[str, Any]] | None = None
                        ) -> tuple[dict[str, float], dict[str, Any]]:
        """({name: value} of the job's summary metrics, by name; what `extra(session, job)` adds, read in the same
        session and only when the job has summary metrics); UserError when there is no such job."""
        with self.session() as s:
            job = self._job_in(s, job_id)
            rows = dict(s.execute(
                select(Metric.name, Metric.value)
                .where(Metric.job_id == job_id, Metric.step == C.SUMMARY_STEP, Metric.item == C.NO_ITEM)
                .order_by(Metric.name)
            ).all())
            more = extra(s, job) if rows and extra is not None else None
        return rows, dict(more or {})

    def metric_history(self: Store, job_id: str, name: str) -> list[tuple[int, float]]:
        """(step, value) of a metric logged per step, in step order."""
        with self.session() as s:
            return [
                (st, v)
                for st, v in s.execute(
                    select(Metric.step, Metric.value)
                    .where(Metric.job_id == job_id, Metric.name == name, Metric.step >= 0, Metric.item == C.NO_ITEM)
                    .order_by(Metric.step)
                ).all()
            ]

    def report_rows(self: Store, job_id: str) -> ReportRows:
        """Everything a report reads of a job, in one session; UserError when there is no such job."""
        with self.session() as s:
            job = self._job_in(s, job_id).to_dict()
            shards = [r.to_dict() for r in s.execute(select(Shard).where(Shard.job_id == job_id)
                                                     .order_by(Shard.index)).scalars()]
            curves: dict[str, list[tuple[int, float]]] = {}
            per_item: dict[str, dict[str, float]] = {}
            for name, value, step, item in s.execute(
                select(Metric.name, Metric.value, Metric.step, Metric.item).where(Metric.job_id == job_id)
                .order_by(Metric.name, Metric.step)
            ).all():
                if item != C.NO_ITEM:
                    per_item.setdefault(name, {})[item] = value
                elif step >= 0:
                    curves.setdefault(name, []).append((step, value))
            artifacts = [a.to_dict() for a in s.execute(select(Artifact).where(Artifact.job_id == job_id)
                                                        .order_by(Artifact.shard_index, Artifact.id)).scalars()]
            checkpoints = [c.to_dict() for c in s.execute(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                                          .order_by(Checkpoint.step)).scalars()]
            inputs = []
            for kind, ref, role in s.execute(select(Lineage.input_kind, Lineage.input_ref, Lineage.role)
                                             .where(Lineage.job_id == job_id).order_by(Lineage.id)).all():
                row = {"kind": kind, "ref": ref, "role": role, "detail": ""}
                if kind == "job":
                    other = s.get(Job, ref)
                    row["detail"] = f"{other.kind}, {other.state}" if other else "not in this DB"
                elif kind == "checkpoint" and ref.isdigit():
                    ck = s.get(Checkpoint, int(ref))
                    row["detail"] = f"step {ck.step} of job {ck.job_id}" if ck else "not in this DB"
                inputs.append(row)
            my_ckpts = [str(c["id"]) for c in checkpoints]
            conds = [(Lineage.input_kind == "job") & (Lineage.input_ref == job_id)]
            if my_ckpts:
                conds.append((Lineage.input_kind == "checkpoint") & Lineage.input_ref.in_(my_ckpts))
            used_by = [{"job_id": j, "kind": k, "state": st, "role": role, "via": f"{ik} {ref}"}
                       for j, k, st, role, ik, ref in s.execute(
                           select(Job.id, Job.kind, Job.state, Lineage.role, Lineage.input_kind, Lineage.input_ref)
                           .join(Lineage, Lineage.job_id == Job.id).where(or_(*conds)).order_by(Job.created_at)).all()]
        return ReportRows(job, shards, curves, per_item, artifacts, checkpoints, inputs, used_by)

    def first_pairs(self: Store, job_id: str, n: int) -> list[tuple[str, str, str, int, str]]:
        """(pair id, RGB path, IR path, position in its latents file, that file's URI) of an invert job's first `n`
        recorded pairs, in shard order."""
        with self.session() as s:
            return [tuple(r) for r in s.execute(
                select(Item.pair_id, Item.rgb_path, Item.ir_path, Item.position, Artifact.uri)
                .join(Artifact, Artifact.id == Item.artifact_id)
                .where(Item.job_id == job_id).order_by(Item.shard_index, Item.position)
                .limit(n)).all()]

    # -- what plans read (kinds/) ---------------------------------------------------------------------------------------

    def split_pairs(self: Store, job_id: str, split: str) -> list[tuple[str, str, str]]:
        """(pair id, RGB path, IR path) of one split of an invert job's pairs, by pair id."""
        with self.session() as s:
            return [tuple(r) for r in s.execute(
                select(Item.pair_id, Item.rgb_path, Item.ir_path)
                .where(Item.job_id == job_id, Item.split == split).order_by(Item.pair_id)).all()]

    def kept_pairs(self: Store, job_id: str) -> list[tuple[str, str, str, str]]:
        """(pair id, split, RGB path, IR path) of the pairs an invert job kept (it recorded their latents), by pair
        id."""
        with self.session() as s:
            return [tuple(r) for r in s.execute(
                select(Item.pair_id, Item.split, Item.rgb_path, Item.ir_path)
                .where(Item.job_id == job_id, Item.artifact_id.is_not(None)).order_by(Item.pair_id)).all()]

    def count_pairs(self: Store, job_id: str, split: str) -> int:
        """How many of an invert job's pairs are in `split`."""
        with self.session() as s:
            return s.execute(select(func.count()).select_from(Item)
                             .where(Item.job_id == job_id, Item.split == split)).scalar_one()

    @staticmethod
    def shard_result(s: Session, job_id: str, index: int) -> dict[str, Any] | None:
        """The recorded result of one shard, read in the caller's session (a summary's `extra`)."""
        return s.execute(select(Shard.result).where(Shard.job_id == job_id, Shard.index == index)).scalar_one_or_none()
