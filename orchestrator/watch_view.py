"""What `orchestrator watch` and `status` show of a job: one reading of it from the Store (`snapshot`), as a JobView
with its running shards' progress (orchestrator/watch.py draws it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from shared.settings import Settings
from shared.status import JobState


@dataclass
class ShardView:
    """A running shard as the DB last saw it (progress is as of its last heartbeat)."""

    index: int
    worker: str | None
    progress: dict[str, Any]
    started_at: datetime | None
    attempts: int

    @property
    def done(self) -> float:
        return float(self.progress.get("done") or 0)

    @property
    def total(self) -> float:
        return float(self.progress.get("total") or 0)

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0


@dataclass
class JobView:
    """One reading of a job for display."""

    job_id: str
    kind: str
    state: str
    shards_total: int
    shards_done: int
    shards_failed: int
    by_state: dict[str, int]
    running: list[ShardView]
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def finished(self) -> bool:
        return JobState(self.state).finished

    @property
    def training(self) -> bool:
        import kinds  # a training kind's single shard is a run whose progress counts optimiser steps

        kind = kinds.find(self.kind)
        return kind is not None and kind.training

    @property
    def fraction(self) -> float:
        """Finished work over all work: done shards plus the running shards' own fractions."""
        if self.state == JobState.SUCCEEDED:
            return 1.0
        if not self.shards_total:
            return 0.0
        return min(1.0, (self.shards_done + sum(r.fraction for r in self.running)) / self.shards_total)

    @property
    def elapsed(self) -> float:
        start = _aware(self.started_at) or _aware(self.created_at)
        end = _aware(self.finished_at) if self.finished and self.finished_at else self.now
        return max(0.0, (end - start).total_seconds()) if start else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the average pace so far (None until something finished)."""
        f = self.fraction
        if self.finished or f <= 0.0 or self.elapsed <= 0.0:
            return None
        return self.elapsed * (1.0 - f) / f


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=timezone.utc)  # SQLite hands back naive datetimes; everything stored is UTC


def snapshot(settings: Settings, job_id: str) -> JobView:
    """Read the job, its shard counts by state and its running shards."""
    from shared.store import store

    st = store(settings).job_status(job_id, lineage=False)
    job = st.job
    return JobView(job.id, job.kind, job.state, job.shards_total, job.shards_done, job.shards_failed, st.by_state,
                   [ShardView(r.index, r.worker, dict(r.progress or {}), _aware(r.started_at), r.attempts)
                    for r in st.running],
                   _aware(job.created_at), _aware(job.started_at), _aware(job.finished_at), job.error)
