"""States of jobs and shards: one enum each, shared by the DB (CheckConstraint), the workers and the CLI.

`str` enums serialise as their value in JSON, SQL and terminal output alike (the rq habit).
"""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    QUEUED = "queued"  # rows exist, shards are being (or about to be) enqueued
    RUNNING = "running"  # at least one shard enqueued; the last shard to finish decides the end state
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    def __str__(self) -> str:
        return self.value


class ShardState(str, Enum):
    PENDING = "pending"  # row created, no message published yet
    QUEUED = "queued"  # message published
    RUNNING = "running"  # a worker holds the lease
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (ShardState.DONE, ShardState.FAILED, ShardState.CANCELLED)

    def __str__(self) -> str:
        return self.value


UNFINISHED_SHARD_STATES = (ShardState.PENDING, ShardState.QUEUED, ShardState.RUNNING)
