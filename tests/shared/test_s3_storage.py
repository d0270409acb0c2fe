"""Object storage against a real S3 server (SeaweedFS): atomic, content-addressed, never-overwriting writes."""

from __future__ import annotations

import hashlib
import os

import pytest

from shared import s3
from shared.storage import Storage, StorageError


@pytest.fixture
def st(s3_root, tmp_path) -> s3.S3Storage:
    return Storage(s3_root, cache_dir=tmp_path / "cache")


def test_key_carries_the_content_hash_and_a_duplicate_write_is_the_same_object(st):
    a = st.write_bytes("jobs/j/latents/shard-00001.safetensors", b"one")
    assert a.uri == st.uri(f"jobs/j/latents/shard-00001.{a.sha256[:16]}.safetensors")
    again = st.write_bytes("jobs/j/latents/shard-00001.safetensors", b"one")
    other = st.write_bytes("jobs/j/latents/shard-00001.safetensors", b"two")  # a late writer with other bytes
    assert again == a and other.uri != a.uri
    assert st.resolve(a.uri).read_bytes() == b"one"  # the recorded object kept its bytes
    head = st.fs.call_s3("head_object", Bucket=st.bucket, Key=s3.split_uri(a.uri)[1])
    assert head["Metadata"]["sha256"] == a.sha256 and head["ContentLength"] == 3


def test_an_object_with_other_bytes_under_the_key_is_never_replaced(st):
    """Check-then-refuse: even if a key held other bytes (a hash collision, a foreign writer), a write keeps them."""
    data = b"ours"
    key = s3.content_key("jobs/j/x.bin", hashlib.sha256(data).hexdigest())
    full = f"{st.prefix}/{key}"
    st.fs.call_s3("put_object", Bucket=st.bucket, Key=full, Body=b"theirs", Metadata={"sha256": "f" * 64})
    with pytest.raises(StorageError, match="exists with other bytes"):
        st.write_bytes("jobs/j/x.bin", data)
    assert st.fs.cat_file(f"{st.bucket}/{full}") == b"theirs"


def test_large_files_go_up_in_parts_and_are_checked_the_same_way(st, monkeypatch):
    monkeypatch.setattr(s3, "PART", 5 << 20)  # S3's smallest part size
    data = os.urandom((11 << 20) + 123)
    f = st.write_bytes("jobs/j/big.bin", data)
    assert f.sha256 == hashlib.sha256(data).hexdigest() and f.bytes == len(data)
    assert st.write_bytes("jobs/j/big.bin", data) == f
    assert st.resolve(f.uri).read_bytes() == data
    uploads = st.fs.call_s3("list_multipart_uploads", Bucket=st.bucket, Prefix=st.prefix).get("Uploads", [])
    assert uploads == []  # nothing left half-uploaded


def test_a_read_that_does_not_match_the_recorded_hash_is_refused(st):
    f = st.write_bytes("jobs/j/c.bin", b"good")
    full = s3.split_uri(f.uri)[1]
    # someone with write access replaces the bytes behind our back (the metadata still says "good")
    st.fs.call_s3("put_object", Bucket=st.bucket, Key=full, Body=b"evil", Metadata={"sha256": f.sha256})
    with pytest.raises(StorageError, match="sha256 mismatch"):
        st.resolve(f.uri)


def test_cached_reads_survive_a_lost_server_connection(st, tmp_path):
    f = st.write_bytes("jobs/j/d.bin", b"cached")
    path = st.resolve(f.uri)
    assert path.is_relative_to(tmp_path / "cache") and st.resolve(f.uri) == path


def test_object_inputs_list_and_read_like_folders(s3_server, s3_root, m3fd_small):
    from workers.ml import m3fd

    fs = s3_server.client()
    dest = s3_root.split("://", 1)[1] + "/m3fd"
    fs.put(str(m3fd_small) + "/", dest, recursive=True)
    local = m3fd.find_pairs(m3fd_small)
    remote = m3fd.find_pairs(f"s3://{dest}")
    assert [p.pair_id for p in remote] == [p.pair_id for p in local]
    assert str(remote[0].rgb) == f"s3://{dest}/Vis/{local[0].rgb.name}"
    a, b = m3fd.load_image_pair(local[0], 32), m3fd.load_image_pair(remote[0], 32)
    assert all(bool((x == y).all()) for x, y in zip(a, b, strict=True))


def test_wrong_secret_or_no_server_is_a_clear_error_without_the_secret(s3_root, tmp_path, monkeypatch):
    from tests.s3server import free_port

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    with pytest.raises(StorageError, match="cannot write artifact s3://") as e:
        Storage(s3_root, cache_dir=tmp_path / "c1").write_bytes("jobs/j/e.bin", b"x")
    assert "wrong-secret-0123456789" not in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries of a refused connection take minutes
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(StorageError, match="cannot write artifact s3://"):
        Storage(s3_root, cache_dir=tmp_path / "c2").write_bytes("jobs/j/e.bin", b"x")


def test_a_shard_fails_clearly_while_the_server_is_unreachable_and_a_retry_completes(
        s3_server, s3_root, tmp_path, monkeypatch, tiny_sd, m3fd_small):
    """The storage fault on object storage: writes fail -> the shard fails with a one-line StorageError naming the
    URI, nothing is recorded; with the server back, re-running the shard records one complete object."""
    from dataclasses import replace

    from sqlalchemy import select

    from orchestrator import jobs
    from orchestrator.submit import submitter
    submit_invert = submitter("invert")
    from shared.db import session_scope
    from shared.models import Artifact, Shard
    from tests.conftest import embedded_settings
    from tests.orchestrator.conftest import create_only, invert_args
    from tests.s3server import free_port
    from workers.runner import run_shard
    from workers.tasks.invert import invert_work

    settings = replace(embedded_settings(tmp_path / "orch"), storage=s3_root)
    settings.ensure_local_folders()
    job_id = create_only(submit_invert, settings, invert_args(m3fd_small, tiny_sd, shards=2))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries of a refused connection take minutes
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError):
        run_shard(settings, job_id, 0, invert_work)
    with session_scope(settings) as s:
        state, error = s.execute(select(Shard.state, Shard.error).where(Shard.job_id == job_id,
                                                                        Shard.index == 0)).one()
        assert s.execute(select(Artifact).where(Artifact.job_id == job_id)).first() is None
    assert state == "failed" and error.startswith("cannot write artifact s3://") and "\n" not in error
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert jobs.resume(settings, job_id, failed_only=True) >= 1  # what `orchestrator retry JOB --failed` does
    for i in (0, 1):
        run_shard(settings, job_id, i, invert_work)
    assert jobs.get_job(settings, job_id).state == "succeeded"
    with session_scope(settings) as s:
        arts = s.execute(select(Artifact.uri, Artifact.sha256, Artifact.kind).where(Artifact.job_id == job_id)).all()
    fs = s3_server.client()
    # one latents object per shard, plus the preview pictures of the job's first pairs (workers/previews.py)
    assert sorted(k for _, _, k in arts if k != "image") == ["latents", "latents"]
    assert all(hashlib.sha256(fs.cat_file(u)).hexdigest() == h for u, h, _ in arts)
