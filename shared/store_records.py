"""The Store's statements of a shard's work: what a worker reads to run a shard (its pairs, its input files, a
training run's data and checkpoints) and the idempotent writes of what it produced (artifacts, metrics, checkpoints,
refused input). Part of shared/store.py.

Statements that run inside a transaction the caller already has (a shard's `record` and a kind's finaliser run in
the completing transaction of workers/bookkeeping.py, a summary's `extra` in the summary's) are static methods that
take its session, `s`; `Store.run` runs one of them in a transaction of its own. Every write is an upsert or a
conditional UPDATE keyed by what the shard produced, so a redelivered shard rewrites the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from shared import constants as C
from shared.db import upsert
from shared.models import Artifact, Checkpoint, Item, Metric, Rejection, Shard, utcnow

if TYPE_CHECKING:
    from shared.storage import StoredFile
    from shared.store import Store


@dataclass(frozen=True)
class ShardPairs:
    """The pairs of an invert shard, (pair id, RGB path, IR path) by pair id, and how many of the job's items lie
    in earlier shards (which decides whether the shard writes preview pictures)."""

    pairs: list[tuple[str, str, str]]
    before: int


class RecordStatements:
    # -- writes in the caller's transaction ---------------------------------------------------------------------------

    @staticmethod
    def record_artifact(s: Session, job_id: str, shard_index: int | None, kind: str, stored: StoredFile,
                        meta: dict[str, Any] | None = None) -> int:
        """Upsert an artifact row keyed by its URI and return its id (a re-run rewrites the same row)."""
        upsert(s, Artifact,
               [{"job_id": job_id, "shard_index": shard_index, "kind": kind, "uri": stored.uri,
                 "sha256": stored.sha256, "bytes": stored.bytes, "meta": meta, "created_at": utcnow()}],
               key=["uri"], update=["sha256", "bytes", "meta", "kind", "job_id", "shard_index"])
        return s.execute(select(Artifact.id).where(Artifact.uri == stored.uri)).scalar_one()

    @staticmethod
    def record_metrics(s: Session, job_id: str, values: Mapping[str, float] | Iterable[tuple[str, float, int, str]],
                       shard_index: int | None = None) -> None:
        """Upsert metrics: a mapping is a job summary; tuples are (name, value, step, item)."""
        if isinstance(values, Mapping):
            rows = [(k, float(v), C.SUMMARY_STEP, C.NO_ITEM) for k, v in values.items()]
        else:
            rows = [(n, float(v), int(st), str(it)) for n, v, st, it in values]
        now = utcnow()
        upsert(s, Metric,
               [{"job_id": job_id, "name": n, "value": v, "step": st, "item": it, "shard_index": shard_index,
                 "created_at": now} for n, v, st, it in rows],
               key=["job_id", "name", "step", "item"], update=["value", "shard_index"])

    @staticmethod
    def record_item_means(s: Session, job_id: str, count_name: str = "pairs") -> None:
        """The job's summary: the mean over items of every per-item metric, and the number of items as
        `count_name`."""
        rows = s.execute(
            select(Metric.name, func.avg(Metric.value), func.count())
            .where(Metric.job_id == job_id, Metric.item != C.NO_ITEM)
            .group_by(Metric.name)
        ).all()
        values = {name: float(avg) for name, avg, _ in rows}
        if rows:
            values[count_name] = float(rows[0][2])
        RecordStatements.record_metrics(s, job_id, values)

    @staticmethod
    def record_checkpoint_row(s: Session, job_id: str, artifact_id: int, step: int, epoch: int,
                              reason: str) -> None:
        """Upsert the checkpoint of `step` (a re-run's checkpoint of the same step replaces the row's file)."""
        upsert(s, Checkpoint, [{"job_id": job_id, "artifact_id": artifact_id, "step": int(step),
                                "epoch": int(epoch), "reason": reason, "created_at": utcnow()}],
               key=["job_id", "step"], update=["artifact_id", "epoch", "reason"])

    @staticmethod
    def place_pairs(s: Session, job_id: str, artifact_id: int, pair_ids: Sequence[str]) -> None:
        """Point each pair at its latents file and its position there (an invert shard's output)."""
        for pos, pid in enumerate(pair_ids):
            s.execute(update(Item).where(Item.job_id == job_id, Item.pair_id == pid)
                      .values(artifact_id=artifact_id, position=pos))

    @staticmethod
    def replace_skipped(s: Session, job_id: str, owner: str, skipped: Sequence[tuple[str, str, str]]) -> None:
        """Record a shard's skipped inputs, (pair id, file, why), replacing what an earlier run of it recorded for
        the same files (they belong to no other shard) instead of adding to it."""
        files = [f for _, f, _ in skipped]
        if files:
            s.execute(delete(Rejection).where(Rejection.job_id == job_id, Rejection.kind == "skipped_input",
                                              Rejection.ref.in_(files)))
        for _pid, f, why in skipped:
            s.add(Rejection(job_id=job_id, kind="skipped_input", ref=f, reason=why, worker=owner))

    # -- reads in the caller's transaction ----------------------------------------------------------------------------

    @staticmethod
    def shard_results(s: Session, job_id: str) -> list[dict[str, Any] | None]:
        """The recorded result of each of the job's shards (None for a shard without one)."""
        return list(s.execute(select(Shard.result).where(Shard.job_id == job_id)).scalars().all())

    @staticmethod
    def pair_counts(s: Session, job_id: str) -> tuple[int, int, int]:
        """(pairs kept, of them in the train split, inputs skipped) of an invert job."""
        kept = s.execute(select(func.count()).select_from(Item)
                         .where(Item.job_id == job_id, Item.artifact_id.is_not(None))).scalar_one()
        skipped = s.execute(select(func.count()).select_from(Rejection)
                            .where(Rejection.job_id == job_id, Rejection.kind == "skipped_input")).scalar_one()
        train = s.execute(select(func.count()).select_from(Item)
                          .where(Item.job_id == job_id, Item.split == "train", Item.artifact_id.is_not(None))
                          ).scalar_one()
        return kept, train, skipped

    @staticmethod
    def final_checkpoint_id(s: Session, job_id: str) -> int | None:
        """The id of the job's checkpoint of the highest step, if any."""
        return s.execute(
            select(Checkpoint.id).join(Artifact, Artifact.id == Checkpoint.artifact_id)
            .where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).limit(1)
        ).scalar_one_or_none()

    @staticmethod
    def sample_uris(s: Session, job_id: str) -> list[str]:
        """The sample files of a sample job, in shard order."""
        return list(s.execute(
            select(Artifact.uri).where(Artifact.job_id == job_id, Artifact.kind == C.ARTIFACT_SAMPLES)
            .order_by(Artifact.shard_index)
        ).scalars().all())

    # -- transactions of their own ------------------------------------------------------------------------------------

    def record_checkpoint(self: Store, job_id: str, stored: StoredFile, step: int, epoch: int, reason: str,
                          meta: dict[str, Any], fence: tuple[int, str, float] | None = None) -> bool:
        """Record a training run's checkpoint file and row in one transaction. With `fence`, (shard id, owner,
        lease seconds), only while that owner holds the shard's lease (`hold_lease`, shared/store_leases.py):
        False, and nothing written, when it does not."""
        with self.session() as s:
            if fence is not None and not self.hold_lease(s, *fence):
                return False
            art = self.record_artifact(s, job_id, 0, C.ARTIFACT_CHECKPOINT, stored, meta)
            self.record_checkpoint_row(s, job_id, art, step, epoch, reason)
        return True

    def add_rejection(self: Store, kind: str, ref: str, reason: str, job_id: str | None = None,
                      worker: str | None = None) -> None:
        """Record refused input (a skipped image, a malformed message) in its own transaction."""
        with self.session() as s:
            s.add(Rejection(job_id=None if job_id is None else str(job_id)[:255], kind=kind, ref=str(ref)[:1024],
                            reason=str(reason)[:4000], worker=worker))

    def shard_pairs(self: Store, job_id: str, index: int) -> ShardPairs:
        """The pairs of shard `index` of an invert job, and how many items earlier shards have."""
        with self.session() as s:
            pairs = s.execute(select(Item.pair_id, Item.rgb_path, Item.ir_path)
                              .where(Item.job_id == job_id, Item.shard_index == index)
                              .order_by(Item.pair_id)).all()
            before = s.execute(select(func.count()).select_from(Item)
                               .where(Item.job_id == job_id, Item.shard_index < index)).scalar_one()
        return ShardPairs([tuple(r) for r in pairs], int(before))

    def latent_rows(self: Store, latents_job: str, job_id: str, index: int) -> list[tuple[str, str, str, str, int]]:
        """(pair, RGB path, IR path, latents URI, position in that file) of the pairs of shard `index` of a job whose
        items are pairs of the invert job `latents_job`, by pair id."""
        with self.session() as s:
            return [tuple(r) for r in s.execute(
                select(Item.pair_id, Item.rgb_path, Item.ir_path, Artifact.uri, Item.position)
                .join(Artifact, Artifact.id == Item.artifact_id)
                .where(Item.job_id == latents_job,
                       Item.pair_id.in_(select(Item.pair_id).where(Item.job_id == job_id, Item.shard_index == index)))
                .order_by(Item.pair_id)
            ).all()]

    def split_rows(self: Store, invert_job: str, split: str) -> list[tuple[int, str]]:
        """(position, latents URI) of the pairs of one split of an invert job, by pair id."""
        with self.session() as s:
            return [tuple(r) for r in s.execute(
                select(Item.position, Artifact.uri).join(Artifact, Artifact.id == Item.artifact_id)
                .where(Item.job_id == invert_job, Item.split == split).order_by(Item.pair_id)
            ).all()]

    def checkpoints_newest_first(self: Store, job_id: str) -> list[tuple[int, str, str]]:
        """(step, file URI, sha256) of the job's recorded checkpoints, the highest step first."""
        with self.session() as s:
            return [tuple(r) for r in s.execute(
                select(Checkpoint.step, Artifact.uri, Artifact.sha256)
                .join(Artifact, Artifact.id == Checkpoint.artifact_id)
                .where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc())
            ).all()]
