"""Stopping a training run: on a signal (cancel, shutdown) or when its attempt no longer holds the shard's lease.

The lease is the run's fencing token (docs/training.md). The supervisor that claimed the shard renews it, but a frozen
or partitioned supervisor renews nothing and watches nothing, while its torchrun group (in its own session) trains
on. So rank 0 checks the token itself: a `LeaseFence` thread reads the shard row every `lease / 4` seconds, and the
fence trips when the row names another owner or attempt (a newer attempt took over), or when the lease has not been
confirmed for a lease past its expiry (the supervisor stopped renewing, or the database cannot be reached). The
ranks act on a trip like on a signal, together at the next step boundary, but write no checkpoint: the "stopped"
event says reason "fenced" and every rank exits 0.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

#: The environment variable that carries the database URL to rank 0 (never the config file: it may hold a password).
FENCE_DATABASE_ENV = "ORCH_FENCE_DATABASE_URL"

_RUN, _SIGNAL, _FENCED = 0, 1, 2


class LeaseFence:
    """Rank 0's own view of whether its attempt still holds the shard's lease.

    `tripped()` never touches the database (the check runs in a thread), so a database that hangs cannot hold the
    training loop: past the confirmed deadline the fence trips whether or not the last read returned.
    """

    def __init__(self, url: str, shard_id: int, owner: str, attempt: int, lease_seconds: float,
                 every: float | None = None, start: bool = True) -> None:
        self.url, self.shard_id, self.owner, self.attempt = url, int(shard_id), owner, int(attempt)
        self.lease_seconds = float(lease_seconds)
        self.every = every if every is not None else max(0.2, min(self.lease_seconds / 4, 5.0))
        #: unix time until which the lease is known to be ours (its expiry as last read), plus one lease of grace
        #: for a late heartbeat; at start, one lease to reach the database
        self.valid_until = time.time() + self.lease_seconds
        self.lost: str | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine: Any = None
        if start:
            self.poll()
            self._thread = threading.Thread(target=self._run, name="lease-fence", daemon=True)
            self._thread.start()

    @classmethod
    def from_config(cls, fence: dict[str, Any] | None) -> LeaseFence | None:
        url = os.environ.get(FENCE_DATABASE_ENV)
        if not fence or not url:
            return None
        return cls(url, fence["shard_id"], fence["owner"], fence["attempt"], fence["lease_seconds"])

    def poll(self) -> None:
        """Read the shard row once and update `lost` / `valid_until` (errors are kept, not raised)."""
        from sqlalchemy import create_engine, select

        from shared.models import Shard

        try:
            if self._engine is None:
                # its own plain engine, not shared/db.py's: a read must not take SQLite's write lock (BEGIN
                # IMMEDIATE there), and a server that does not answer must not hang the thread for long
                sqlite = self.url.startswith("sqlite")
                self._engine = create_engine(self.url, pool_pre_ping=True, connect_args={"timeout": 10} if sqlite
                                             else {"connect_timeout": 10} if "postgres" in self.url else {})
            with self._engine.connect() as conn:
                row = conn.execute(select(Shard.state, Shard.lease_owner, Shard.attempts, Shard.lease_expires_at)
                                   .where(Shard.id == self.shard_id)).first()
        except Exception as e:  # unreachable or locked: the deadline decides
            self.last_error = f"{type(e).__name__}: {e}"
            return
        self.last_error = None
        if row is None or row.state != "running" or row.lease_owner != self.owner or row.attempts != self.attempt:
            who = "no row" if row is None else f"state {row.state}, attempt {row.attempts}, owner {row.lease_owner}"
            self.lost = f"attempt {self.attempt} no longer holds the lease of shard {self.shard_id} ({who})"
            return
        expires = row.lease_expires_at
        if expires is not None:
            if expires.tzinfo is None:  # SQLite returns naive UTC datetimes
                from datetime import timezone

                expires = expires.replace(tzinfo=timezone.utc)
            self.valid_until = expires.timestamp() + self.lease_seconds

    def tripped(self) -> str | None:
        """Why this attempt must stop, or None while it holds the lease."""
        if self.lost:
            return self.lost
        if time.time() > self.valid_until:  # for good: a later read must not restart a run the others saw stop
            why = f" (last error: {self.last_error})" if self.last_error else ""
            self.lost = f"the lease of shard {self.shard_id} was not renewed for a lease past its expiry{why}"
        return self.lost

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()
            if self.lost:
                return

    def close(self) -> None:
        self._stop.set()


class StopFlag:
    """SIGTERM/SIGINT handler that only records the request; ranks act on it together at a step boundary.

    With a `fence` (rank 0 of a supervised run) a tripped fence is a stop request too, agreed on the same way;
    `fenced` then holds True on every rank, and `reason` rank 0's account of why.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self.fence: LeaseFence | None = None
        self.fenced = False
        self.reason: str | None = None

    @classmethod
    def install(cls) -> StopFlag:
        flag = cls()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, flag._handle)
        return flag

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested, self.signum = True, signum

    def agreed(self, info: Any) -> bool:
        """Collective: True on every rank if any rank was signalled or fenced, so all stop at the same step."""
        code = _SIGNAL if self.requested else _RUN
        tripped = self.fence.tripped() if self.fence is not None else None
        if tripped:
            code, self.reason = _FENCED, tripped
        if info.ddp:
            import torch  # here, not at the top: the supervisor imports this module for FENCE_DATABASE_ENV only
            import torch.distributed as dist

            t = torch.tensor([code], dtype=torch.int32)  # host tensor, gloo: no GPU sync
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.cpu_group)
            code = int(t.item())
        self.fenced = code == _FENCED
        return code != _RUN
