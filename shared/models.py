"""ORM rows of the results database (the source of truth; Celery is only transport).

Constraint names are explicit so migrations stay stable across SQLite and PostgreSQL. Plain entities for callers
come from `to_dict()` and from the Store (shared/store.py), which returns rows detached from their session.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.status import JobState, ShardState

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _states(enum) -> str:
    return ", ".join(f"'{s.value}'" for s in enum)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for col in self.__table__.columns:
            v = getattr(self, col.key)
            out[col.key] = v.isoformat() if isinstance(v, datetime) else v
        return out


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    shards_total: Mapped[int] = mapped_column(Integer, default=0)
    shards_done: Mapped[int] = mapped_column(Integer, default=0)
    shards_failed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    __table_args__ = (
        CheckConstraint(f"state IN ({_states(JobState)})", name="state"),
        CheckConstraint("shards_done >= 0 AND shards_done <= shards_total", name="done_bounds"),
        Index("ix_jobs_kind_state_created", "kind", "state", "created_at"),
        Index("ix_jobs_created_at", "created_at"),
    )


class Shard(Base):
    __tablename__ = "shards"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=ShardState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    __table_args__ = (
        UniqueConstraint("job_id", "index", name="uq_shards_job_index"),
        CheckConstraint(f"state IN ({_states(ShardState)})", name="state"),
        Index("ix_shards_state_lease", "state", "lease_expires_at"),
    )


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    shard_index: Mapped[int | None] = mapped_column(Integer, default=None)
    kind: Mapped[str] = mapped_column(String(32))
    uri: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (
        UniqueConstraint("uri", name="uq_artifacts_uri"),
        Index("ix_artifacts_job_kind", "job_id", "kind"),
    )


class Item(Base):
    """One M3FD pair of an invert job: where its latents live."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    pair_id: Mapped[str] = mapped_column(String(255))
    split: Mapped[str] = mapped_column(String(8))
    rgb_path: Mapped[str] = mapped_column(String(1024))
    ir_path: Mapped[str] = mapped_column(String(1024))
    shard_index: Mapped[int] = mapped_column(Integer)
    artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id", ondelete="SET NULL"), default=None)
    position: Mapped[int | None] = mapped_column(Integer, default=None)
    __table_args__ = (
        UniqueConstraint("job_id", "pair_id", name="uq_items_job_pair"),
        CheckConstraint("split IN ('train', 'test')", name="split"),
        Index("ix_items_job_shard", "job_id", "shard_index"),
        Index("ix_items_job_split", "job_id", "split", "pair_id"),
    )


class Metric(Base):
    """A value of a job: a summary (step -1, item ''), a training curve point (step), or a per-item value (item)."""

    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    step: Mapped[int] = mapped_column(Integer, default=-1)
    item: Mapped[str] = mapped_column(String(255), default="")
    shard_index: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (
        UniqueConstraint("job_id", "name", "step", "item", name="uq_metrics_key"),
        # a job's summary (step -1, item '') and its per-item values (step -1, item > '') in item order
        Index("ix_metrics_job_step_item", "job_id", "step", "item", "name"),
    )


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),)


class Lineage(Base):
    """What a job consumed: another job, a checkpoint, a dataset or a model."""

    __tablename__ = "lineage"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    input_kind: Mapped[str] = mapped_column(String(16))
    input_ref: Mapped[str] = mapped_column(String(1024))
    role: Mapped[str] = mapped_column(String(32))
    __table_args__ = (
        UniqueConstraint("job_id", "input_kind", "input_ref", "role", name="uq_lineage_key"),
        CheckConstraint("input_kind IN ('job', 'checkpoint', 'data', 'model')", name="input_kind"),
        Index("ix_lineage_input", "input_kind", "input_ref"),
    )


class Rejection(Base):
    """Input the system refused without failing: a skipped bad image (--skip-bad) or a malformed task message.

    `job_id` is free text, not a foreign key: a malformed message may name a job that does not exist.
    """

    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(String(255), default=None)
    kind: Mapped[str] = mapped_column(String(32))
    ref: Mapped[str] = mapped_column(String(1024))
    reason: Mapped[str] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (
        CheckConstraint("kind IN ('skipped_input', 'bad_message')", name="kind"),
        Index("ix_rejections_job", "job_id", "kind"),
    )
