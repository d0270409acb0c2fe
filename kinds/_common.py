"""Checks that several kinds' plans share: a finished input job, a checkpoint of the right kind, MNIST sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.errors import UserError
from shared.settings import Settings


def given(**kw: Any) -> dict[str, Any]:
    """Only the options the user gave: the rest comes from the preset inside the worker."""
    return {k: v for k, v in kw.items() if v is not None}


def finished_job(settings: Settings, job_id: str, kind: str, flag: str):
    """The job `job_id`, which must be a succeeded `kind` job (UserError naming `flag` otherwise)."""
    from shared.store import get_job

    job = get_job(settings, job_id)
    if job.kind != kind:
        raise UserError(f"{flag} {job_id} is a {job.kind} job: give the id of a {kind} job")
    if job.state != "succeeded":
        raise UserError(f"{flag} {job_id} is {job.state}: wait for it to succeed (or resume it) first")
    return job


def checkpoint_of(settings: Settings, checkpoint_id: int, kind: str, what: str):
    """(training job, checkpoint URI) of a checkpoint that a `kind` job wrote; UserError naming `what` otherwise."""
    from shared.store import job_of_checkpoint

    job, uri = job_of_checkpoint(settings, checkpoint_id)
    if job.kind != kind:
        raise UserError(f"checkpoint {checkpoint_id} belongs to a {job.kind} job: give {what} checkpoint")
    return job, uri


def check_mnist(source: str, flag: str = "--data") -> str:
    """A usable MNIST source: "mnist:embedded" or a resolved folder of IDX files."""
    from shared.paths import check_input_path
    from workers.ml.mnist import EMBEDDED, check_source

    if source != EMBEDDED:
        check_input_path(flag, source)
        source = str(Path(source).expanduser().resolve())
    check_source(source)
    return source


def check_positives(o: Any, names: tuple[str, ...], zero_ok: tuple[str, ...] = ()) -> None:
    """Each named option, when given, is > 0 (or >= 0 for those in `zero_ok`)."""
    from kinds.checks import check_positive

    for name in names:
        v = getattr(o, name, None)
        if name in zero_ok and v == 0:
            continue
        check_positive("--" + name.replace("_", "-"), v)


def train_describe(what: str):
    """The report sentence of a training kind: `what` was trained, steps, checkpoints, last loss."""
    from kinds.base import fmt

    def describe(data: Any) -> str:
        sp, m = data.job.get("spec") or {}, data.summary
        loss = data.curves.get("loss", [])
        tail = f", last logged loss {fmt(loss[-1][1])}" if loss else ""
        return (f"Trained {what.format(**{k: sp.get(k, '?') for k in ('data', 'train_pairs', 'latents')})} with "
                f"{sp.get('gpus', 1)} DDP process(es): {fmt(m.get('steps'))} steps, "
                f"{len(data.checkpoints)} checkpoint(s){tail}.")

    return describe
