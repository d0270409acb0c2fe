"""Reads of the results DB that both sides need: a job by id, the training job and file of a checkpoint.

Plain entities come back detached from their session, so callers never hold a session open.
"""

from __future__ import annotations

from sqlalchemy import select

from shared.db import ensure_schema, session_scope
from shared.errors import UserError
from shared.models import Artifact, Checkpoint, Job
from shared.settings import Settings


def get_job(settings: Settings, job_id: str) -> Job:
    """The job row (detached); UserError naming `orchestrator jobs` when there is none."""
    ensure_schema(settings)
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise UserError(f"no job '{job_id}': list jobs with `orchestrator jobs`")
        s.expunge(job)
        return job


def job_of_checkpoint(settings: Settings, checkpoint_id: int) -> tuple[Job, str]:
    """(training job (detached), checkpoint file URI) of a checkpoint id."""
    ensure_schema(settings)
    with session_scope(settings) as s:
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
