"""The process's one heartbeat thread: it beats every registered lease (`workers.bookkeeping.Heartbeat`) in due order."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.bookkeeping import Heartbeat

log = logging.getLogger("workers.bookkeeping")


class Renewer:
    """The process's heartbeat thread: beats every registered Heartbeat each `interval` seconds.

    Started on first use in each process (a forked pool child starts its own: `os.register_at_fork` resets the
    state a child inherits). Beats run one at a time, in due order.
    """

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[Heartbeat, float] = {}
        self._beating: Heartbeat | None = None
        self._thread: threading.Thread | None = None

    def add(self, hb: Heartbeat) -> None:
        with self._cond:
            self._due[hb] = time.monotonic() + hb.interval
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def remove(self, hb: Heartbeat, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._due.pop(hb, None)
            while self._beating is hb and time.monotonic() < deadline:
                self._cond.wait(max(deadline - time.monotonic(), 0.0))

    def _next(self) -> Heartbeat:
        """Wait (holding the condition) until a heartbeat is due; mark it in flight and schedule its next beat."""
        while True:
            now = time.monotonic()
            if self._due:
                hb, when = min(self._due.items(), key=lambda kv: kv[1])
                if when <= now:
                    self._due[hb] = now + hb.interval
                    self._beating = hb
                    return hb
                self._cond.wait(when - now)
            else:
                self._cond.wait()

    def _run(self) -> None:
        cond = self._cond  # this thread's generation (a fork resets the attribute, not our reference)
        while True:
            with cond:
                hb = self._next()
            try:
                hb.beat()
            except Exception as e:  # a DB blip must not kill the work; the lease just ages
                log.warning("heartbeat failed: %s", e)
            finally:
                with cond:
                    self._beating = None
                    cond.notify_all()
