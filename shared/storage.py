"""Artifact storage addressed by URI under one root (a local or NFS path now; object storage would slot in here).

Every write goes to a temporary name in the destination folder and is renamed into place (atomic on POSIX), so a
reader never sees half a file and a crashed writer leaves only a `.tmp-*` file that no DB row points to. Keys and URIs
are checked to stay inside the root: a key or a URI from the DB cannot reach outside it (path traversal).
Files get ORCH_ARTIFACT_MODE (default 640: group-readable) and the folders created for them the same plus x where r
is set (750), whatever the umask: workers running as other users of the group read each other's artifacts.
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


@dataclass(frozen=True)
class StoredFile:
    uri: str
    sha256: str
    bytes: int


class StorageError(Exception):
    """A storage operation failed (not writable, full, outside the root)."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


class Storage:
    def __init__(self, root: str | Path, mode: int | None = None):
        from shared.settings import artifact_mode, folder_mode

        self.mode = artifact_mode() if mode is None else mode  # None: ORCH_ARTIFACT_MODE
        self.folder_mode = folder_mode(self.mode)
        root = str(root)
        if root.startswith("file://"):
            root = unquote(urlsplit(root).path)
        elif "://" in root:
            raise UserError(f"storage '{root}' is not supported: give a local/NFS path or a file:// URI in ORCH_STORAGE")
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

    def resolve(self, uri: str) -> Path:
        """The local path of a URI recorded in the DB; it must lie inside the root."""
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
            self._make_folders(dest.parent)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=dest.suffix, dir=dest.parent)
            os.fchmod(fd, self.mode)  # mkstemp creates 0600
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

    def _make_folders(self, folder: Path) -> None:
        """Create `folder` and its missing parents with the folder mode (mkdir alone would apply the umask)."""
        missing = []
        while not folder.is_dir() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for f in reversed(missing):
            try:
                f.mkdir()
            except FileExistsError:  # another worker made it first: its mode is already set
                continue
            os.chmod(f, self.folder_mode)

    def write_bytes(self, key: str, data: bytes) -> StoredFile:
        return self.write(key, lambda p: p.write_bytes(data))

    def adopt(self, path: str | Path) -> StoredFile:
        """Describe a file already written inside the root (e.g. a checkpoint a training rank renamed into place)."""
        p = Path(path).resolve()
        if self.root not in p.parents:
            raise StorageError(f"{p} lies outside the storage root {self.root}")
        return StoredFile(uri=p.as_uri(), sha256=sha256_file(p), bytes=p.stat().st_size)
