"""NCSN submissions with bad input: one clear line, exit 2, and no new rows (sample with --steps-each 0, a
checkpoint of the wrong kind, eval-fid of a sample job that has not succeeded)."""

from __future__ import annotations

import argparse

from sqlalchemy import select

from orchestrator import submit as submit_mod
from shared.db import ensure_schema, session_scope
from shared.models import Checkpoint
from shared.storage import Storage
from tests.conftest import embedded_settings
from tests.orchestrator.conftest import create_only
from tests.orchestrator.test_bad_input import n_rows, refused
from workers.tasks.train import record_checkpoint


def _with_checkpoint(settings, job_id: str) -> int:
    """Record a checkpoint row for a created (never run) training job; only its kind matters to the checks."""
    f = Storage(settings.storage).path(f"jobs/{job_id}/run/step-1.pt")
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"not read by submit")
    record_checkpoint(settings, Storage(settings.storage), job_id, "test",
                      {"path": str(f), "step": 1, "epoch": 0, "reason": "final"})
    with session_scope(settings) as s:
        return s.execute(select(Checkpoint.id).where(Checkpoint.job_id == job_id)).scalar_one()


def test_ncsn_bad_input_is_one_line_exit_2_and_no_rows(home, capsys):
    s = embedded_settings(home)
    ensure_schema(s)
    ns = argparse.Namespace
    ncsn = create_only(submit_mod.submitter("train-ncsn"), s, ns(
        data="mnist:embedded", preset="ncsn", epochs=1, batch_size=8, lr=None, gpus=1, base_channels=8,
        max_train_samples=64, steps_each=None, amp=False, checkpoint_every=0, max_steps=None, log_every=1, seed=0))
    clf = create_only(submit_mod.submitter("train-classifier"), s, ns(
        data="mnist:embedded", epochs=1, batch_size=8, lr=None, gpus=1, max_train_samples=64, log_every=1, seed=0))
    ncsn_ckpt, clf_ckpt = _with_checkpoint(s, ncsn), _with_checkpoint(s, clf)
    queued = create_only(submit_mod.submitter("sample"), s, ns(checkpoint=ncsn_ckpt, n=8, shards=1, batch_size=8,
                                                          steps_each=2, seed=0))
    before = n_rows(home)

    refused(capsys, ["submit", "sample", "--checkpoint", str(ncsn_ckpt), "--steps-each", "0"], "--steps-each")
    refused(capsys, ["submit", "sample", "--checkpoint", str(clf_ckpt)], "train-classifier", "NCSN checkpoint")
    refused(capsys, ["submit", "sample", "--checkpoint", "999"], "no checkpoint 999")
    refused(capsys, ["submit", "eval-fid", "--samples", queued, "--classifier", str(clf_ckpt)], queued, "queued",
            "wait for it to succeed")
    refused(capsys, ["submit", "eval-fid", "--samples", ncsn, "--classifier", str(clf_ckpt)], "a sample job")
    assert n_rows(home) == before
