"""The results database behind one object: engine, schema check, sessions and the statements of the control plane.

`store(settings)` is this process's Store for the settings' database URL. The schema is checked (the embedded SQLite
DB created or upgraded, a server DB required to be migrated) once per process and URL, on first use, so no caller
checks it itself. Reads return plain entities: ORM rows detached from their session, small dataclasses, dicts; no
caller holds a session open. The statements are grouped by what they serve, in the parts a Store is made of:
jobs (shared/store_jobs.py), results (shared/store_results.py), the lease protocol (shared/store_leases.py) and a
shard's work (shared/store_records.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from shared import db
from shared.errors import UserError
from shared.models import Artifact, Checkpoint, Job
from shared.settings import Settings
from shared.store_jobs import JobRow, JobStatements, JobStatus, RunningShard
from shared.store_leases import Claim, LeaseStatements
from shared.store_records import RecordStatements, ShardPairs
from shared.store_results import ReportRows, ResultStatements

__all__ = ["Claim", "JobRow", "JobStatus", "ReportRows", "RunningShard", "ShardPairs", "Store", "get_job",
           "job_of_checkpoint", "store"]

T = TypeVar("T")


def no_job(job_id: str) -> UserError:
    return UserError(f"no job '{job_id}': list jobs with `orchestrator jobs`")


class Store(JobStatements, ResultStatements, LeaseStatements, RecordStatements):
    """One results database: its engine and sessions in this process, its schema check, and its statements.

    Only the database URL of `settings` matters (and whether it is SQLite): one Store serves every Settings that
    names the same database, so nothing else of them (a lease length, say) is read from here.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.database_url
        self._pid: int | None = None
        self._engine = None
        self._factory = None
        self._checked = False
        self._lock = threading.Lock()

    def check_schema(self) -> None:
        """Create or upgrade the embedded DB, or check that a server DB was migrated: once (a failure is retried)."""
        if self._checked:
            return
        with self._lock:
            if not self._checked:
                db.ensure_schema(self.settings)
                self._checked = True

    def _bind(self) -> None:
        pid = os.getpid()
        if self._pid != pid:  # engines are not fork-safe (shared/db.py): a forked child binds its own
            self._engine = db.get_engine(self.url)
            self._factory = db.session_factory(self.url)
            self._pid = pid

    @property
    def engine(self):
        self._bind()
        return self._engine

    def _ready(self) -> None:
        """Schema checked (once) and engine bound to this process (again after a fork)."""
        if not self._checked:
            self.check_schema()
        if self._pid != os.getpid():
            self._bind()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session that commits on success, rolls back on error, and always closes."""
        self._ready()
        with db.scoped(self._factory) as session:
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A Core connection in a transaction (commit on success, rollback on error): for prebuilt statements."""
        self._ready()
        with self._engine.begin() as conn:
            yield conn

    def run(self, statement: Callable[..., T], *args, **kwargs) -> T:
        """Run one of the statements that take the caller's session (`record_metrics`, say) in a transaction of its
        own."""
        with self.session() as s:
            return statement(s, *args, **kwargs)

    # -- one job ------------------------------------------------------------------------------------------------------

    @staticmethod
    def _job_in(s: Session, job_id: str) -> Job:
        job = s.get(Job, job_id)
        if job is None:
            raise no_job(job_id)
        return job

    def get_job(self, job_id: str) -> Job:
        """The job row (detached); UserError naming `orchestrator jobs` when there is none."""
        with self.session() as s:
            job = self._job_in(s, job_id)
            s.expunge(job)
            return job

    def job_of_checkpoint(self, checkpoint_id: int) -> tuple[Job, str]:
        """(training job (detached), checkpoint file URI) of a checkpoint id."""
        with self.session() as s:
            row = s.execute(
                select(Job, Artifact.uri)
                .join(Checkpoint, Checkpoint.job_id == Job.id)
                .join(Artifact, Artifact.id == Checkpoint.artifact_id)
                .where(Checkpoint.id == checkpoint_id)
            ).first()
            if row is None:
                raise UserError(f"no checkpoint {checkpoint_id}: list them with `orchestrator results TRAIN_JOB`")
            s.expunge(row[0])
            return row[0], row[1]


_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


def store(settings: Settings) -> Store:
    """This process's Store for the database of `settings` (one per URL)."""
    st = _stores.get(settings.database_url)
    if st is None:
        with _stores_lock:
            st = _stores.get(settings.database_url)
            if st is None:
                st = _stores[settings.database_url] = Store(settings)
    return st


def get_job(settings: Settings, job_id: str) -> Job:
    """The job row (detached); UserError naming `orchestrator jobs` when there is none."""
    return store(settings).get_job(job_id)


def job_of_checkpoint(settings: Settings, checkpoint_id: int) -> tuple[Job, str]:
    """(training job (detached), checkpoint file URI) of a checkpoint id."""
    return store(settings).job_of_checkpoint(checkpoint_id)
