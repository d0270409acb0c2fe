"""Artifact storage: atomic writes, recorded hashes, and no escape from the root."""

from __future__ import annotations

import hashlib

import pytest

from shared.storage import Storage, StorageError


def test_write_is_atomic_and_hashed(tmp_path):
    st = Storage(tmp_path / "root")
    f = st.write_bytes("jobs/j/a.bin", b"hello")
    assert f.sha256 == hashlib.sha256(b"hello").hexdigest() and f.bytes == 5
    assert st.resolve(f.uri).read_bytes() == b"hello"

    def boom(path):
        path.write_bytes(b"half")
        raise RuntimeError("writer died")

    with pytest.raises(StorageError, match="b.bin.*writer died"):
        st.write("jobs/j/b.bin", boom)
    assert sorted(p.name for p in (tmp_path / "root/jobs/j").iterdir()) == ["a.bin"]  # no half file, no temp file


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "", "a/\x00b"])
def test_keys_cannot_escape_the_root(tmp_path, key):
    with pytest.raises(StorageError):
        Storage(tmp_path / "root").path(key)


@pytest.mark.parametrize("uri", ["file:///etc/passwd", "file:///tmp/../etc/shadow", "http://example.org/x",
                                 "s3://bucket/x"])
def test_recorded_uris_outside_the_root_are_refused(tmp_path, uri):
    with pytest.raises(StorageError):
        Storage(tmp_path / "root").resolve(uri)


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
