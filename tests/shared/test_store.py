"""The Store (shared/store.py): one per database URL, the schema checked once per process and URL, plain entities
that outlive their session, and the same errors as the CLI printed before, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from orchestrator import queries
from orchestrator.jobs import create_job
from shared import db
from shared import store as store_mod
from shared.errors import UserError
from shared.models import Artifact, Checkpoint, Job
from shared.status import JobState
from shared.store import JobStatus, store
from tests.conftest import embedded_settings


@pytest.fixture
def counted(monkeypatch):
    """A fresh cache of stores, and {database URL: schema checks} from here on."""
    calls: dict[str, int] = {}
    real = db.ensure_schema

    def ensure_schema(settings):
        calls[settings.database_url] = calls.get(settings.database_url, 0) + 1
        real(settings)

    monkeypatch.setattr(store_mod, "_stores", {})
    monkeypatch.setattr(db, "ensure_schema", ensure_schema)
    return calls


def test_one_store_and_one_schema_check_per_url(tmp_path, counted):
    a = embedded_settings(tmp_path / "a")
    a_short_lease = embedded_settings(tmp_path / "a", lease_seconds=5.0)  # another Settings, the same database
    b = embedded_settings(tmp_path / "b")
    assert store(a) is store(a_short_lease) is store(a)
    assert store(a) is not store(b)
    assert counted == {}  # nothing is checked before the first use
    job = create_job(a, "protocol-test", {}, 2)
    for _ in range(3):
        store(a).get_job(job)
        store(a_short_lease).job_status(job)
        queries.list_jobs(a)
        queries.summary_metrics(a, job)
    with store(a).transaction() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM shards").scalar() == 2
    queries.list_jobs(b)
    assert counted == {a.database_url: 1, b.database_url: 1}


def test_a_failed_schema_check_is_tried_again(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "_stores", {})
    real, calls = db.ensure_schema, []

    def flaky(settings):
        calls.append(settings.database_url)
        if len(calls) == 1:
            raise UserError("the results database has no tables: run `orchestrator db upgrade` first")
        real(settings)

    monkeypatch.setattr(db, "ensure_schema", flaky)
    s = embedded_settings(tmp_path / "orch")
    with pytest.raises(UserError, match="no tables"):
        queries.list_jobs(s)
    assert queries.list_jobs(s) == [] and queries.list_jobs(s) == []
    assert len(calls) == 2


def test_entities_are_detached_and_usable_after_the_session(backend):
    job_id = create_job(backend, "protocol-test", {"lr": 0.1, "nested": {"a": [1, 2]}}, 3)
    st = store(backend)
    job = st.get_job(job_id)
    assert inspect(job).detached
    assert (job.kind, job.spec["nested"]["a"], job.shards_total, job.state) == \
        ("protocol-test", [1, 2], 3, JobState.QUEUED.value)
    assert job.to_dict()["id"] == job_id

    status = st.job_status(job_id)
    assert isinstance(status, JobStatus) and inspect(status.job).detached
    assert status.by_state == {"pending": 3} and status.running == [] and status.lineage == []
    [row] = [r for r in st.list_jobs() if r.id == job_id]
    assert (row.kind, row.shards_done, row.shards_total) == ("protocol-test", 0, 3)

    with st.session() as s:
        art = Artifact(job_id=job_id, shard_index=0, kind="checkpoint", uri="file:///ckpt/step-10.pt",
                       sha256="0" * 64, bytes=1)
        s.add(art)
        s.flush()
        ck = Checkpoint(job_id=job_id, step=10, epoch=0, reason="periodic", artifact_id=art.id)
        s.add(ck)
        s.flush()
        ck_id = ck.id
    owner, uri = st.job_of_checkpoint(ck_id)
    assert inspect(owner).detached and owner.id == job_id and owner.spec["lr"] == 0.1
    assert uri == "file:///ckpt/step-10.pt"


def test_a_session_commits_or_rolls_back(backend):
    job_id = create_job(backend, "protocol-test", {}, 1)
    st = store(backend)
    with pytest.raises(RuntimeError), st.session() as s:
        s.get(Job, job_id).error = "not kept"
        raise RuntimeError
    assert st.get_job(job_id).error is None
    with st.session() as s:
        s.get(Job, job_id).error = "kept"
    assert st.get_job(job_id).error == "kept"


def test_an_unknown_job_is_the_same_one_line_user_error(backend):
    message = "no job 'nope-0123456789ab': list jobs with `orchestrator jobs`"
    st = store(backend)
    reads = [lambda: st.get_job("nope-0123456789ab"), lambda: st.job_status("nope-0123456789ab"),
             lambda: st.report_rows("nope-0123456789ab"),
             lambda: queries.job_status(backend, "nope-0123456789ab"),
             lambda: queries.results(backend, "nope-0123456789ab"),
             lambda: queries.summary_metrics(backend, "nope-0123456789ab")]
    for read in reads:
        with pytest.raises(UserError) as e:
            read()
        assert str(e.value) == message
    with pytest.raises(UserError, match=r"^no checkpoint 987654: list them with `orchestrator results TRAIN_JOB`$"):
        st.job_of_checkpoint(987654)


def _child_reads(settings, job_id, parent_engine_id, out) -> None:
    st = store(settings)
    out.put(st.get_job(job_id).id == job_id and id(st.engine) != parent_engine_id)


def test_a_store_serves_a_process_after_fork(tmp_path):
    """Engines are per process: a forked child that inherited a bound Store binds its own engine."""
    import multiprocessing

    s = embedded_settings(tmp_path / "orch")
    job_id = create_job(s, "protocol-test", {}, 1)
    parent_engine = store(s).engine
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(s, job_id, id(parent_engine), out))
    child.start()
    try:
        assert out.get(timeout=60) is True
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert store(s).engine is parent_engine
