"""Settings from the environment: one frozen object, documented where each field is defined.

| variable            | default                                             |
|---------------------|-----------------------------------------------------|
| ORCH_HOME           | ./.orchestrator (local state of the embedded default) |
| ORCH_BROKER_URL     | filesystem:// broker under ORCH_HOME/broker          |
| ORCH_DATABASE_URL   | sqlite:///ORCH_HOME/orchestrator.sqlite              |
| ORCH_STORAGE        | ORCH_HOME/artifacts (a path or file:// URI)          |
| ORCH_LEASE_SECONDS  | 60                                                   |
| ORCH_ARTIFACT_MODE  | 640 (octal; folders get x where r: 750)              |

A value that cannot be used (a non-numeric lease, a mode that is not octal) is a UserError: one line, exit 2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shared import constants as C


@dataclass(frozen=True)
class Settings:
    #: Folder of the embedded default's state (SQLite file, filesystem broker, artifacts).
    home: Path
    #: Celery broker URL; `filesystem://` means kombu's filesystem transport under `home/broker`.
    broker_url: str
    #: SQLAlchemy URL of the results database.
    database_url: str
    #: Root of artifact storage: a local or NFS path (or file:// URI) shared by all workers.
    storage: str
    #: Seconds a lease lives without a heartbeat.
    lease_seconds: float = C.LEASE_SECONDS
    #: Permission bits of artifact files (folders add x where r is set): group-readable by default, so workers
    #: running as another user of the same group can read what this one wrote.
    artifact_mode: int = C.ARTIFACT_MODE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("ORCH_HOME") or C.DEFAULT_HOME).expanduser().resolve()
        broker = env.get("ORCH_BROKER_URL") or "filesystem://"
        db = env.get("ORCH_DATABASE_URL") or f"sqlite:///{home / C.DB_FILENAME}"
        storage = env.get("ORCH_STORAGE") or str(home / C.STORAGE_DIRNAME)
        lease = lease_seconds(env.get("ORCH_LEASE_SECONDS"))
        return cls(home=home, broker_url=broker, database_url=db, storage=storage, lease_seconds=lease,
                   artifact_mode=artifact_mode(env))

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_folder(self) -> Path:
        return self.home / C.BROKER_DIRNAME

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def ensure_local_folders(self) -> None:
        """Create the embedded default's folders (harmless when servers are used)."""
        self.home.mkdir(parents=True, exist_ok=True)
        if self.embedded_broker:
            for sub in ("in", "processed", "control"):
                (self.broker_folder / sub).mkdir(parents=True, exist_ok=True)


#: A lease longer than this would let a dead worker's shard wait days before anyone takes it over.
MAX_LEASE_SECONDS = 86400.0


def lease_seconds(raw: str | None) -> float:
    from shared.errors import UserError

    if not raw:
        return C.LEASE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 1.0 <= value <= MAX_LEASE_SECONDS:  # also refuses NaN
        raise UserError(f"ORCH_LEASE_SECONDS={raw!r} is not a number of seconds between 1 and {MAX_LEASE_SECONDS:.0f}: "
                        f"unset it for the default ({C.LEASE_SECONDS:.0f})")
    return value


def artifact_mode(env: Mapping[str, str] | None = None) -> int:
    """ORCH_ARTIFACT_MODE as permission bits (octal: 640, 0640 or 0o640); the owner must keep read and write."""
    from shared.errors import UserError

    raw = (os.environ if env is None else env).get("ORCH_ARTIFACT_MODE")
    if not raw:
        return C.ARTIFACT_MODE
    try:
        value = int(raw.strip().lower().removeprefix("0o"), 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777 or value & 0o600 != 0o600:
        raise UserError(f"ORCH_ARTIFACT_MODE={raw!r} is not an octal file mode that lets the owner read and write "
                        "(e.g. 640 for group-readable, 600 for owner only)")
    return value


def folder_mode(file_mode: int) -> int:
    """The mode of an artifact folder: the file mode plus search (x) wherever read (r) is granted."""
    return file_mode | ((file_mode & 0o444) >> 2)


#: Query parameters whose value is a credential: sslpassword, api_key, X-Amz-Signature, auth_token, credentials, ...
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|sig|credential|auth", re.IGNORECASE)


def mask_url(url: str) -> str:
    """The URL with every credential replaced by ``***`` (for logs and `orchestrator db url`): the password of
    ``user:pass@``, and the value of each query parameter named like a secret (``?password=``, ``&token=``, ...).
    Everything else, IPv6 brackets and the user name included, is kept as written."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else netloc
    query = "&".join(_mask_param(p) for p in parts.query.split("&"))
    # rebuilt by hand: urlunsplit would turn sqlite://// into sqlite://
    scheme = f"{parts.scheme}:" if parts.scheme else ""
    authority = f"//{netloc}" if url[len(scheme):].startswith("//") else ""
    return (scheme + authority + parts.path + (f"?{query}" if "?" in url.split("#", 1)[0] else "")
            + (f"#{parts.fragment}" if "#" in url else ""))


def _mask_param(param: str) -> str:
    name, eq, _value = param.partition("=")
    return f"{name}=***" if eq and _SECRET_PARAM.search(unquote(name)) else param
