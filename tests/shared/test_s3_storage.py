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
