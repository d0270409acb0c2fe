"""Object storage (S3 and S3-compatible servers) through fsspec/s3fs: the `s3://bucket/prefix` storage backend and
read-only input locations (`--data s3://bucket/m3fd`).

Endpoint and credentials come from where botocore and fsspec look for them: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY (or AWS_PROFILE and ~/.aws), or the fsspec config (FSSPEC_S3_* variables,
~/.config/fsspec). They are never part of a URI, so they reach neither the DB nor a log line.

Why a write appears whole or not at all, and why a late duplicate write cannot change a recorded artifact:
- the bytes are written and hashed locally first; the object's key carries the first 16 hex digits of their sha256
  (`shard-00003.safetensors` is stored as `shard-00003.<sha16>.safetensors`), so other bytes get another key;
- the upload is conditional (`If-None-Match: *`): it creates the key or fails with 412, it never overwrites. One PUT
  is atomic; a multipart upload (large files) is invisible until its completion, which carries the same condition;
- on 412 the existing object's sha256 (object metadata, written with it) and size are compared with ours: equal
  means a duplicate write of the same bytes (fine, same URI); anything else is refused with StorageError.
A late writer therefore either finds its bytes already there or writes a key that no DB row names (its completion
is refused by the lease check): the object under a recorded URI keeps the recorded bytes.

Reads download into the cache folder (ORCH_HOME/cache): a temporary name, the sha256 checked against the object's
metadata, then a rename. Objects never change, so a cached copy stays valid for as long as it is kept.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from shared.errors import UserError
from shared.storage import Storage, StorageError, StoredFile, default_cache_dir, sha256_file

#: Files up to this size go up in one PUT; larger ones as a multipart upload of parts this size.
PART = 64 << 20
#: Hex digits of the sha256 in an object's key.
HASH_IN_KEY = 16


#: Variables that choose the endpoint and identity: a filesystem is made per process and per their values.
_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
        "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")
_filesystems: dict[tuple, Any] = {}


def filesystem() -> Any:
    """An s3fs filesystem for this process and the current AWS_* variables (a forked child makes its own).

    Constructed through fsspec, so the fsspec config (FSSPEC_S3_* variables, ~/.config/fsspec) applies."""
    token = (os.getpid(), *(hashlib.sha256(os.environ.get(k, "").encode()).hexdigest() for k in _ENV))
    fs = _filesystems.get(token)
    if fs is None:
        try:
            import s3fs
        except ImportError as e:
            raise UserError(f"s3:// needs the s3fs package ({e}): pip install s3fs") from None
        fs = _filesystems[token] = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    return fs


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of s3://bucket/key."""
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


def _error_code(e: BaseException) -> str:
    cause = e.__cause__ if e.__cause__ is not None else e
    response = getattr(cause, "response", None) or {}
    return str(response.get("Error", {}).get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _why(e: BaseException) -> str:
    """An error message without anything a credential could hide in (botocore messages name no secrets)."""
    return f"{type(e).__name__}: {e}"


def _check_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or "\x00" in key or any(p in ("..", ".") for p in parts) or "//" in key:
        raise StorageError(f"invalid artifact key {key!r}")
    return key


def content_key(key: str, sha256: str) -> str:
    """`dir/name.ext` -> `dir/name.<sha16>.ext`: the key a file with this sha256 is stored under."""
    p = PurePosixPath(key)
    return str(p.with_name(f"{p.stem}.{sha256[:HASH_IN_KEY]}{p.suffix}"))


class S3Storage(Storage):
    """Artifacts under s3://bucket/prefix; local scratch files and read copies under `cache_dir`."""

    def __init__(self, root: str | Path, cache_dir: str | Path | None = None):
        text = str(root).rstrip("/")
        self.bucket, prefix = split_uri(text)
        self.prefix = prefix.strip("/")
        self.root_uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.cache = Path(cache_dir or default_cache_dir()).expanduser().resolve()
        # keys become local paths below these folders (read copies, scratch), checked like the local backend's
        self.objects = self.cache / "s3" / self.bucket
        self.scratch_root = self.cache / "scratch"
        self.root = self.scratch_root  # what the local helpers (path, adopt) check against
        self.fs = filesystem()

    def __repr__(self) -> str:
        return f"S3Storage({self.root_uri!r})"

    # -- names -------------------------------------------------------------------------------------------------

    def _full_key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full_key(key)}"

    def _key_of(self, uri: str) -> str:
        """The object key (below the bucket) of a recorded URI, refused outside this root."""
        if not uri.startswith("s3://"):
            raise StorageError(f"artifact URI {uri!r} is not an s3:// URI of {self.root_uri}")
        bucket, key = split_uri(uri)
        _check_key(key)
        if bucket != self.bucket or (self.prefix and not key.startswith(self.prefix + "/")):
            raise StorageError(f"artifact URI {uri!r} lies outside the storage root {self.root_uri}")
        return key

    def scratch(self, key: str) -> Path:
        """A local folder (under the cache, never shared) standing for `key`: `adopt` uploads files written there."""
        return self.path(key)

    # -- writes ------------------------------------------------------------------------------------------------

    def write(self, key: str, writer: Callable[[Path], None]) -> StoredFile:
        """`writer(tmp_path)` fills a local temporary file, which is then uploaded (see the module docstring)."""
        self._full_key(key)
        try:
            tmpdir = self.cache / "tmp"
            tmpdir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=PurePosixPath(key).suffix, dir=tmpdir)
            os.close(fd)
        except OSError as e:
            raise StorageError(f"cannot write under {self.cache}: {e.strerror}") from e
        tmp_path = Path(tmp)
        try:
            try:
                writer(tmp_path)
            except Exception as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
                raise StorageError(f"cannot write artifact {self.uri(key)}: {why}") from e
            return self.put_file(key, tmp_path)
        finally:
            tmp_path.unlink(missing_ok=True)

    def adopt(self, path: str | Path) -> StoredFile:
        """Upload a file written under `scratch(key)` to the key it stands for (e.g. a training checkpoint)."""
        p = Path(path).resolve()
        if self.scratch_root not in p.parents:
            raise StorageError(f"{p} lies outside the scratch folder {self.scratch_root}")
        return self.put_file(p.relative_to(self.scratch_root).as_posix(), p)

    def put_file(self, key: str, path: Path) -> StoredFile:
        """Upload a local file under its content key, never overwriting; returns its URI, sha256 and size."""
        digest, size = sha256_file(path), path.stat().st_size
        full = self._full_key(content_key(key, digest))
        uri = f"s3://{self.bucket}/{full}"
        try:
            if size <= PART:
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=full, Body=path.read_bytes(),
                                IfNoneMatch="*", Metadata={"sha256": digest})
            else:
                self._multipart(full, path, digest)
        except Exception as e:
            if isinstance(e, FileExistsError) or _error_code(e) in ("PreconditionFailed", "412"):
                self._check_existing(uri, full, digest, size)
            else:
                raise StorageError(f"cannot write artifact {uri}: {_why(e)}") from e
        return StoredFile(uri=uri, sha256=digest, bytes=size)

    def _multipart(self, full: str, path: Path, digest: str) -> None:
        up = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=full, Metadata={"sha256": digest})
        upload_id, parts = up["UploadId"], []
        try:
            with open(path, "rb") as f:
                while block := f.read(PART):
                    n = len(parts) + 1
                    r = self.fs.call_s3("upload_part", Bucket=self.bucket, Key=full, UploadId=upload_id,
                                        PartNumber=n, Body=block)
                    parts.append({"PartNumber": n, "ETag": r["ETag"]})
            self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=full, UploadId=upload_id,
                            MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        except BaseException:
            try:  # an unfinished upload is invisible; aborting frees its parts
                self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=full, UploadId=upload_id)
            except Exception:
                pass
            raise

    def _check_existing(self, uri: str, full: str, digest: str, size: int) -> None:
        """The key exists already: accept it only when it holds these very bytes (a duplicate write)."""
        head = self._head(full)
        theirs = (head.get("Metadata") or {}).get("sha256")
        if theirs != digest or int(head.get("ContentLength", -1)) != size:
            raise StorageError(f"artifact {uri} exists with other bytes (sha256 {theirs}, not {digest}): "
                               "refusing to replace it")

    def _head(self, full: str) -> dict:
        try:
            return self.fs.call_s3("head_object", Bucket=self.bucket, Key=full)
        except Exception as e:
            raise StorageError(f"cannot read s3://{self.bucket}/{full}: {_why(e)}") from e

    # -- reads -------------------------------------------------------------------------------------------------

    def resolve(self, uri: str) -> Path:
        """A local copy of a recorded object (downloaded once into the cache, sha256 checked)."""
        full = self._key_of(uri)
        local = (self.objects / full).resolve()
        if self.objects not in local.parents:
            raise StorageError(f"artifact URI {uri!r} escapes the cache folder")
        if local.is_file():
            return local
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=local.parent)
            os.close(fd)
        except OSError as e:
            raise StorageError(f"cannot cache {uri} under {local.parent}: {e.strerror}") from e
        tmp_path = Path(tmp)
        try:
            head = self._head(full)
            try:
                self.fs.get_file(f"{self.bucket}/{full}", str(tmp_path))
            except Exception as e:
                raise StorageError(f"cannot read {uri}: {_why(e)}") from e
            want = (head.get("Metadata") or {}).get("sha256")
            if want and sha256_file(tmp_path) != want:
                raise StorageError(f"{uri} does not hold the bytes it was written with (sha256 mismatch)")
            os.replace(tmp_path, local)
        finally:
            tmp_path.unlink(missing_ok=True)
        return local

    def read_bytes(self, uri: str) -> bytes:
        return self.resolve(uri).read_bytes()


# -- input locations ---------------------------------------------------------------------------------------------


class ObjectPath:
    """A read-only, pathlib-like view of an s3:// location: what dataset discovery and image loading use.

    Listing returns children that know whether they are folders (one LIST per folder, no HEAD per file).
    """

    def __init__(self, uri: str, kind: str | None = None, size: int | None = None):
        self.uri = uri.rstrip("/")
        self._kind, self._size = kind, size

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"ObjectPath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self.uri}/{name}")

    def __lt__(self, other: ObjectPath) -> bool:
        return self.uri < other.uri

    @property
    def _pure(self) -> PurePosixPath:
        return PurePosixPath(self.uri.split("://", 1)[1])

    name = property(lambda self: self._pure.name)
    stem = property(lambda self: self._pure.stem)
    suffix = property(lambda self: self._pure.suffix)

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.uri.rsplit("/", 1)[0])

    def expanduser(self) -> ObjectPath:
        return self

    def resolve(self) -> ObjectPath:
        return self

    def _info(self) -> tuple[str, int]:
        if self._kind is None:
            try:
                info = filesystem().info(self.uri)
            except FileNotFoundError:
                self._kind, self._size = "missing", 0
            else:
                self._kind, self._size = info.get("type", "file"), int(info.get("size") or 0)
        return self._kind, int(self._size or 0)

    def is_dir(self) -> bool:
        return self._info()[0] == "directory"

    def is_file(self) -> bool:
        return self._info()[0] == "file"

    def exists(self) -> bool:
        return self._info()[0] != "missing"

    def iterdir(self) -> Iterator[ObjectPath]:
        try:
            entries = filesystem().ls(self.uri, detail=True)
        except FileNotFoundError:
            entries = []
        for e in entries:
            name = str(e["name"]).rstrip("/")
            if name.rsplit("/", 1)[-1] == self.name and name.count("/") == self._pure.as_posix().count("/"):
                continue  # a folder marker object listed as its own child
            yield ObjectPath(f"s3://{name}", e.get("type", "file"), int(e.get("size") or 0))

    def stat(self) -> os.stat_result:
        kind, size = self._info()
        if kind == "missing":
            raise FileNotFoundError(2, "No such object", self.uri)
        return os.stat_result((0o100444, 0, 0, 1, 0, 0, size, 0, 0, 0))

    def read_bytes(self) -> bytes:
        try:
            return filesystem().cat_file(self.uri)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise OSError(5, _why(e), self.uri) from e

    def open(self, mode: str = "rb"):
        if mode != "rb":
            raise ValueError("object inputs are read-only")
        return filesystem().open(self.uri, "rb")


__all__ = ["S3Storage", "ObjectPath", "filesystem", "content_key", "split_uri"]
