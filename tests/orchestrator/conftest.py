from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from orchestrator import jobs
from orchestrator import submit as submit_mod
from tests.conftest import embedded_settings


def invert_args(data: Path, model: Path, shards: int = 4, **kw) -> argparse.Namespace:
    base = dict(data=str(data), model=str(model), shards=shards, t=None, steps=None, size=64, batch_size=8,
                preset="readme", split_seed=42, test_fraction=0.2, precision="auto", seed=0)
    base.update(kw)
    return argparse.Namespace(**base)


def create_only(submit_fn, settings, args) -> str:
    """Run a `submit_*` function but only create the rows (nothing is published): the test process is the worker."""
    orig = submit_mod.jobs.submit
    submit_mod.jobs.submit = lambda *a, **k: jobs.create_job(*a, **k)
    try:
        return submit_fn(settings, args)
    finally:
        submit_mod.jobs.submit = orig


def run_invert_inline(settings, data: Path, model: Path, shards: int = 4, **kw) -> str:
    """A finished invert job, computed in this process (the test is the worker): fast set-up for later stages."""
    from tests.threads import torch_threads
    from workers.runner import run_shard
    from workers.tasks.invert import invert_work

    job_id = create_only(submit_mod.submitter("invert"), settings, invert_args(data, model, shards, **kw))
    with torch_threads(1):  # as in the workers: the latents a test compares with theirs are the same bytes
        for i in range(shards):
            run_shard(settings, job_id, i, invert_work)
    assert jobs.get_job(settings, job_id).state == "succeeded"
    return job_id


@pytest.fixture
def fast_lease(tmp_path):
    """Embedded settings with a 4 s lease, so worker loss is detected quickly."""
    s = embedded_settings(tmp_path / "orch", lease_seconds=4.0)
    s.ensure_local_folders()
    return s


@pytest.fixture
def home(tmp_path, monkeypatch):
    """ORCH_HOME for CLI tests that call `orchestrator.cli.main` in-process: the embedded default, no server URLs."""
    h = tmp_path / "orch"
    monkeypatch.setenv("ORCH_HOME", str(h))
    for var in ("ORCH_BROKER_URL", "ORCH_DATABASE_URL", "ORCH_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    return h
