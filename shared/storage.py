"""Artifact storage addressed by URI under one root: a local/NFS path (the embedded default) or object storage.

`Storage(root)` picks the backend from the root's scheme (`storage_scheme`): a path or file:// URI gives this
module's local backend, `s3://bucket/prefix` the object-storage backend of `shared.s3` (docs/object-storage.md).
Both offer the same operations: `write`/`write_bytes` (an artifact appears whole or not at all), `resolve` (a
local file to read a recorded URI from), `scratch` + `adopt` (files a subprocess writes, e.g. training checkpoints,
recorded afterwards).

Local writes go to a temporary name in the destination folder and are renamed into place (atomic on POSIX), so a
reader never sees half a file and a crashed writer leaves only a `.tmp-*` file that no DB row points to. Keys and URIs
are checked to stay inside the root: a key or a URI from the DB cannot reach outside it (path traversal).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shared.errors import UserError

CHUNK = 1 << 20

#: Storage schemes this build understands (`storage_scheme` maps a root to one of them).
SCHEMES = ("file", "s3")


@dataclass(frozen=True)
class StoredFile:
    uri: str
    sha256: str
    bytes: int


class StorageError(Exception):
    """A storage operation failed (not writable, full, outside the root)."""


def storage_scheme(root: str | Path) -> str:
    """The scheme of a storage root or input location: "file" (a path or file:// URI) or "s3" (s3://bucket/...).

    The one place schemes are told apart. Raises UserError (one line) for any other scheme, for an s3:// URI
    without a bucket, and for credentials written into the URI (they would end up in the DB and in logs).
    """
    text = str(root)
    if "://" not in text:
        return "file"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return "file"
    if scheme in ("s3", "s3a"):
        if "@" in parts.netloc:
            raise UserError(f"'{scheme}://...@...' carries credentials in the URI: give s3://bucket/prefix and set "
                            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the fsspec config) instead")
        if not parts.netloc:
            raise UserError(f"'{text}' names no bucket: use s3://BUCKET/PREFIX")
        return "s3"
    raise UserError(f"storage scheme '{scheme}://' is not supported: give a local/NFS path, a file:// URI or "
                    "s3://bucket/prefix")


def input_path(location: str | os.PathLike):
    """An input file or dataset folder: a read-only `shared.s3.ObjectPath` for s3://..., else a local Path."""
    text = str(location)
    if storage_scheme(text) == "s3":
        from shared.s3 import ObjectPath

        return ObjectPath("s3://" + text.split("://", 1)[1])
    if text.startswith("file://"):
        return Path(unquote(urlsplit(text).path))
    return Path(text)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def default_cache_dir(home: str | Path | None = None) -> Path:
    """Where object-storage reads are cached and scratch files live: ORCH_CACHE, else HOME/cache (ORCH_HOME's).

    A node's own disk, never a shared folder: with object storage nothing else is shared between nodes."""
    from shared import constants as C

    if os.environ.get("ORCH_CACHE"):
        return Path(os.environ["ORCH_CACHE"]).expanduser().resolve()
    return Path(home or os.environ.get("ORCH_HOME") or C.DEFAULT_HOME).expanduser().resolve() / "cache"


def open_storage(settings) -> Storage:
    """The storage of `settings` (its root; the cache under its home unless ORCH_CACHE says otherwise)."""
    return Storage(settings.storage, default_cache_dir(settings.home))


class Storage:
    """The local backend (and the factory: an s3:// root constructs `shared.s3.S3Storage`)."""

    def __new__(cls, root: str | Path, cache_dir: str | Path | None = None):
        if cls is Storage and storage_scheme(root) == "s3":
            from shared.s3 import S3Storage

            return super().__new__(S3Storage)
        return super().__new__(cls)

    def __init__(self, root: str | Path, cache_dir: str | Path | None = None):
        root = str(root)
        storage_scheme(root)
        if root.startswith("file://"):
            root = unquote(urlsplit(root).path)
        self.root = Path(root).expanduser().resolve()

    def path(self, key: str) -> Path:
        """The local path of a relative key, refused when it would leave the root."""
        if not key or key.startswith("/") or "\x00" in key:
            raise StorageError(f"invalid artifact key {key!r}")
        p = (self.root / key).resolve()
        if p != self.root and self.root not in p.parents:
            raise StorageError(f"artifact key {key!r} escapes the storage root {self.root}")
        return p

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def scratch(self, key: str) -> Path:
        """A local folder for files a subprocess writes under `key` and `adopt` records later (a training run).

        Locally it is the key's own folder inside the root, so adopting a file there records it in place."""
        return self.path(key)

    def resolve(self, uri: str) -> Path:
        """A local file holding a URI recorded in the DB (here: the file itself); it must lie inside the root."""
        parts = urlsplit(uri)
        if parts.scheme != "file":
            raise StorageError(f"artifact URI {uri!r} is not a file:// URI")
        p = Path(unquote(parts.path)).resolve()
        if self.root not in p.parents:
            raise StorageError(f"artifact URI {uri!r} lies outside the storage root {self.root}")
        return p

    def write(self, key: str, writer: Callable[[Path], None]) -> StoredFile:
        """Write an artifact atomically: `writer(tmp_path)` fills a temporary file, which is then renamed to `key`."""
        dest = self.path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=dest.suffix, dir=dest.parent)
            os.close(fd)
        except OSError as e:
            raise StorageError(f"cannot write under {dest.parent}: {e.strerror}") from e
        tmp_path = Path(tmp)
        try:
            writer(tmp_path)
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            digest = sha256_file(tmp_path)
            size = tmp_path.stat().st_size
            os.replace(tmp_path, dest)
        except BaseException as e:
            tmp_path.unlink(missing_ok=True)
            if isinstance(e, StorageError) or not isinstance(e, Exception):
                raise
            # writers (safetensors, numpy, cv2) report a full or failing disk in their own exception types:
            # whatever the writer raised, the artifact was not written, and the error names the path
            why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
            raise StorageError(f"cannot write artifact {dest}: {why}") from e
        return StoredFile(uri=dest.as_uri(), sha256=digest, bytes=size)

    def write_bytes(self, key: str, data: bytes) -> StoredFile:
        return self.write(key, lambda p: p.write_bytes(data))

    def adopt(self, path: str | Path) -> StoredFile:
        """Describe a file already written inside the root (e.g. a checkpoint a training rank renamed into place)."""
        p = Path(path).resolve()
        if self.root not in p.parents:
            raise StorageError(f"{p} lies outside the storage root {self.root}")
        return StoredFile(uri=p.as_uri(), sha256=sha256_file(p), bytes=p.stat().st_size)
