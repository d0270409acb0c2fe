"""Idempotent writes of a shard's outputs (artifacts, metrics, checkpoints), used inside the completing transaction.

The statements are the Store's (shared/store_records.py); these names are what a shard's `record` and a kind's
finaliser call with the session they are given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy.orm import Session

from shared.storage import StoredFile
from shared.store import Store, store


def record_artifact(
    s: Session,
    job_id: str,
    shard_index: int | None,
    kind: str,
    stored: StoredFile,
    meta: dict[str, Any] | None = None,
) -> int:
    """Upsert an artifact row keyed by its URI and return its id (a re-run rewrites the same row)."""
    return Store.record_artifact(s, job_id, shard_index, kind, stored, meta)


def record_metrics(
    s: Session,
    job_id: str,
    values: Mapping[str, float] | Iterable[tuple[str, float, int, str]],
    shard_index: int | None = None,
) -> None:
    """Upsert metrics: a mapping is a job summary; tuples are (name, value, step, item)."""
    Store.record_metrics(s, job_id, values, shard_index)


def record_item_means(s: Session, job_id: str, count_name: str = "pairs") -> None:
    """The job's summary: the mean over items of every per-item metric, and the number of items as `count_name`
    (an evaluation's finaliser; per item, then averaged, as the seed project averaged per-image values)."""
    Store.record_item_means(s, job_id, count_name)


def record_rejection(settings, kind: str, ref: str, reason: str, job_id: str | None = None,
                     worker: str | None = None) -> None:
    """Record refused input (a skipped image, a malformed message) in its own transaction."""
    store(settings).add_rejection(kind, ref, reason, job_id, worker)
