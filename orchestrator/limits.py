"""Every numeric command-line argument's valid range, and the configuration checks, in one place.

`check_arguments` runs right after parsing, before any setting is used, any row is written or anything is
published: a value that is negative, zero where that means nothing, NaN or infinite, or too large for the database
(32-bit ids and counts), the RNGs (seeds) or memory is one line naming the flag, its range and what it got.
`check_configuration` then refuses an ORCH_HOME that cannot be written and an artifact storage that no worker could
use. Checks that need the data (`--shards` against the number of pairs, `--t` against the schedule) stay with the
job kinds (kinds/, kinds/checks.py).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from shared.errors import UserError
from shared.settings import Settings

#: Largest value of a 32-bit signed column (ids and counts in PostgreSQL's INTEGER).
INT32 = 2**31 - 1
#: Seeds feed torch, numpy and Python RNGs: numpy's legacy seed takes 32 bits, and invert derives shard seeds from it.
SEED_MAX = 2**32 - 1
#: Storage schemes a worker can open: plain paths and file:// (local or NFS), s3:// through fsspec.
STORAGE_SCHEMES = ("", "file", "local", "s3")


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    #: True: the value must be strictly greater than `lo` (a learning rate of 0 trains nothing).
    lo_open: bool = False
    #: what the upper bound protects, said in the error
    why: str = ""

    def check(self, flag: str, value: Any) -> None:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        ok = math.isfinite(value) and (value > self.lo if self.lo_open else value >= self.lo) and value <= self.hi
        if not ok:
            lo = f"more than {self.lo:g}" if self.lo_open else f"{self.lo:g}"
            hi = f"{self.hi:g}" if isinstance(self.hi, float) else f"{self.hi:,}"
            why = f" ({self.why})" if self.why else ""
            raise UserError(f"{flag} must be between {lo} and {hi}{why} (got {value!r}): give a value in that range")


SEED = Range(0, SEED_MAX, why="a 32-bit seed")
BATCH = Range(1, 100_000, why="one batch must fit in memory")
GPU_BATCH = Range(1, 4096, why="one batch of images must fit in GPU memory")
EPOCHS = Range(1, 100_000)
STEPS = Range(1, 10**9)
LR = Range(0.0, 10.0, lo_open=True)
SHARDS = Range(1, 100_000, why="one row and one message per shard")
CHECKPOINT_ID = Range(1, INT32, why="a checkpoint id")
GPUS = Range(1, 64, why="DDP processes on one node")

_TRAIN_COMMON = {"epochs": EPOCHS, "lr": LR, "batch_size": BATCH, "gpus": GPUS, "max_steps": STEPS,
                 "log_every": STEPS, "checkpoint_every": Range(0, 10**9), "seed": SEED}

#: {"submit <kind>" or command: {argparse dest: Range}}; the flag is the dest with dashes.
LIMITS: dict[str, dict[str, Range]] = {
    "submit invert": {
        "shards": SHARDS, "t": Range(1, 999), "steps": Range(1, 1000),
        "size": Range(8, 2048, why="pixels; the VAE's memory grows with its square"), "batch_size": GPU_BATCH,
        "split_seed": SEED, "test_fraction": Range(0.0, 1.0), "seed": SEED,
    },
    "submit train-translator": {
        **_TRAIN_COMMON, "weight_decay": Range(0.0, 10.0), "base_channels": Range(1, 1024), "depth": Range(1, 6),
    },
    "submit eval-translator": {"checkpoint": CHECKPOINT_ID, "shards": SHARDS, "batch_size": GPU_BATCH},
    "submit train-ncsn": {
        **_TRAIN_COMMON, "base_channels": Range(1, 1024), "max_train_samples": Range(1, 10**8),
        "steps_each": Range(1, 10_000),
    },
    "submit train-classifier": {**_TRAIN_COMMON, "max_train_samples": Range(1, 10**8)},
    "submit sample": {
        "checkpoint": CHECKPOINT_ID, "n": Range(1, 1_000_000, why="samples are gathered in memory for FID"),
        "shards": SHARDS, "batch_size": BATCH, "steps_each": Range(1, 10_000), "seed": SEED,
    },
    "submit eval-fid": {
        "n_real": Range(1, 10**7), "classifier": CHECKPOINT_ID, "is_splits": Range(1, 10_000), "seed": SEED,
    },
    "jobs": {"limit": Range(1, 1_000_000)},
    "results": {"limit": Range(1, INT32), "offset": Range(0, 2**62)},
    "reap": {"stale_after": Range(0.0, 10**7)},
    "worker": {
        "processes": Range(1, 256), "concurrency": Range(1, 256),
        "max_memory_per_child": Range(1, 2**40, why="KiB"), "max_tasks_per_child": Range(1, 10**9),
    },
    "demo": {"workers": Range(1, 64), "pairs": Range(1, 100_000), "shards": SHARDS},
    "fixtures": {"pairs": Range(1, 100_000), "width": Range(8, 8192), "height": Range(8, 8192), "seed": SEED},
    "flower": {"port": Range(0, 65535)},
    "exporter": {"port": Range(0, 65535)},
    "report": {"examples": Range(0, 1000)},
    "watch": {"interval": Range(0.0, 86400.0, lo_open=True), "timeout": Range(0.0, 10**7, lo_open=True)},
}


def limits_for(args: Any) -> dict[str, Range]:
    command = getattr(args, "command", None)
    if command == "submit":
        return LIMITS.get(f"submit {args.kind}", {})
    return LIMITS.get(str(command), {})


def check_arguments(args: Any) -> None:
    """UserError (one line) for the first numeric argument outside its range."""
    for dest, rng in limits_for(args).items():
        rng.check("--" + dest.replace("_", "-"), getattr(args, dest, None))


#: Commands that read or write ORCH_HOME's state or hand work to workers (not --help, `db url`, fixtures).
_USES_STATE = ("submit", "worker", "reap", "demo", "status", "jobs", "results", "metrics", "cancel", "resume",
               "retry", "watch", "report", "queue-length", "exporter", "flower")


def check_storage_scheme(storage: str) -> None:
    scheme = urlsplit(storage).scheme.lower() if "://" in storage else ""
    if scheme not in STORAGE_SCHEMES:
        raise UserError(f"ORCH_STORAGE {storage!r} has the unknown scheme '{scheme}://': use a path, file://... "
                        "or s3://bucket/prefix")


def check_home_writable(settings: Settings) -> None:
    """ORCH_HOME holds the embedded broker, the SQLite file and the default artifacts: it must take a new file."""
    home = settings.home
    try:
        home.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=home)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"ORCH_HOME {home} is not a writable folder ({e.strerror or type(e).__name__}): "
                        "set ORCH_HOME to a folder you can write") from e


def check_configuration(args: Any, settings: Settings) -> None:
    """The settings this command needs are usable: UserError (one line) otherwise."""
    command = getattr(args, "command", None)
    if command not in _USES_STATE:
        return
    check_storage_scheme(settings.storage)
    home = str(settings.home)
    in_home = [settings.database_url.split("///", 1)[-1] if settings.is_sqlite else "", settings.storage]
    if settings.embedded_broker or any(p == home or p.startswith(home + os.sep) for p in in_home):
        check_home_writable(settings)


def checked_settings(args: Any) -> Settings:
    """check_arguments, then the settings from the environment, then check_configuration."""
    check_arguments(args)
    settings = Settings.from_env()
    check_configuration(args, settings)
    return settings


def database_error(e: BaseException) -> str | None:
    """The one line for a results-database error that comes from the configuration (unparseable URL, unknown
    driver, server unreachable, database missing, password refused, SQLite file that cannot be opened); None for
    any other error, which is a bug and keeps its traceback."""
    try:
        from sqlalchemy import exc
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(e, (exc.ArgumentError, exc.OperationalError, exc.InterfaceError)):
        return None
    from shared.settings import mask_url

    try:
        url = mask_url(Settings.from_env().database_url)
    except UserError:
        url = "ORCH_DATABASE_URL"
    detail = str(getattr(e, "orig", None) or e).strip().splitlines()
    first = detail[0][:200] if detail else type(e).__name__
    return (f"cannot use the results database {url}: {first}: check ORCH_DATABASE_URL (driver, host, port, "
            "database name, credentials) and that the server is running")
