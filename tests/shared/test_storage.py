"""Artifact storage: atomic writes, recorded hashes, and no escape from the root -- on a local path and on S3."""

from __future__ import annotations

import hashlib

import pytest

from shared.errors import UserError
from shared.storage import Storage, StorageError, storage_scheme


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    """A storage root of each backend: a local folder, and a fresh prefix on the session's SeaweedFS server."""
    if request.param == "local":
        return Storage(tmp_path / "root")
    return Storage(request.getfixturevalue("s3_root"), cache_dir=tmp_path / "cache")


def _listing(st: Storage, folder: str) -> list[str]:
    """Names under `folder` of the root, as a reader of the storage sees them (temporary files included)."""
    if storage_scheme(str(st.root)) == "file" and not hasattr(st, "bucket"):
        return sorted(p.name for p in st.path(folder).iterdir())
    return sorted(k.rsplit("/", 1)[-1] for k in st.fs.find(f"{st.bucket}/{st.prefix}/{folder}"))


def test_write_is_atomic_and_hashed(store):
    f = store.write_bytes("jobs/j/a.bin", b"hello")
    assert f.sha256 == hashlib.sha256(b"hello").hexdigest() and f.bytes == 5
    assert store.resolve(f.uri).read_bytes() == b"hello"

    def boom(path):
        path.write_bytes(b"half")
        raise RuntimeError("writer died")

    with pytest.raises(StorageError, match="b.bin.*writer died"):
        store.write("jobs/j/b.bin", boom)
    names = _listing(store, "jobs/j")
    assert len(names) == 1 and names[0].startswith("a.")  # no half file, no temp file


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "", "a/\x00b"])
def test_keys_cannot_escape_the_root(store, key):
    with pytest.raises(StorageError):
        store.write_bytes(key, b"x")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "", "a/\x00b"])
def test_local_keys_cannot_escape_the_root(tmp_path, key):
    with pytest.raises(StorageError):
        Storage(tmp_path / "root").path(key)


@pytest.mark.parametrize("uri", ["file:///etc/passwd", "file:///tmp/../etc/shadow", "http://example.org/x",
                                 "s3://bucket/x", "s3://orch-test/elsewhere/x", "s3://orch-test/../x"])
def test_recorded_uris_outside_the_root_are_refused(store, uri):
    with pytest.raises(StorageError):
        store.resolve(uri)


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to("/etc")
    with pytest.raises(StorageError):
        Storage(root).path("link/passwd")


def test_unwritable_storage_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    st = Storage(blocker)  # a root whose path is a regular file: nothing can be written under it (even as root)
    with pytest.raises(StorageError, match="cannot write"):
        st.write_bytes("jobs/x.bin", b"data")


def test_scratch_files_are_adopted_with_their_hash(store):
    run = store.scratch("jobs/j/run")
    (run / "checkpoints").mkdir(parents=True)
    ck = run / "checkpoints" / "step-00000002.pt"
    ck.write_bytes(b"weights")
    f = store.adopt(ck)
    assert f.sha256 == hashlib.sha256(b"weights").hexdigest() and f.bytes == 7
    assert store.resolve(f.uri).read_bytes() == b"weights"


@pytest.mark.parametrize("root,scheme", [("/data/artifacts", "file"), ("relative/dir", "file"),
                                         ("file:///data/a", "file"), ("s3://bucket/prefix", "s3"),
                                         ("s3://bucket", "s3")])
def test_storage_schemes(root, scheme):
    assert storage_scheme(root) == scheme


@pytest.mark.parametrize("root,why", [("gs://bucket/x", "not supported"), ("http://host/x", "not supported"),
                                      ("s3:///x", "names no bucket"),
                                      ("s3://AKIA:topsecret@bucket/x", "credentials")])
def test_bad_storage_roots_are_one_line_errors(root, why):
    with pytest.raises(UserError, match=why) as e:
        Storage(root)
    assert "\n" not in str(e.value) and "topsecret" not in str(e.value)
