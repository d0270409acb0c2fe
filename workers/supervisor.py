"""Supervising a torchrun process group from inside a Celery task (the long-running DDP mechanism).

torchrun runs in its own session (process group) so that cancel can signal every rank at once, and with a parent-death
signal so that it does not outlive a worker killed with -9 (otherwise an orphan run would race the run that takes
over after the lease expires). Ranks report through a JSON-lines event file (see workers/train/common.py); rank 0
alone writes checkpoints, which the supervisor records in the DB as they appear, so a resume always finds the latest.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

#: Seconds ranks get to write their signal checkpoint after SIGTERM before the group is killed.
TERM_GRACE_SECONDS = 60.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class EventTail:
    """Reads complete new lines appended to a JSONL file since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset, self._partial = path, 0, b""

    def read(self) -> Iterator[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def rank_threads_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Thread settings for training ranks: OMP_NUM_THREADS (1 unless set) for every threading library.

    torch takes its intra-op thread count from MKL_NUM_THREADS too, and the smaller one wins: a worker started
    with OMP_NUM_THREADS=2 beside an inherited MKL_NUM_THREADS=1 trained on one core (benchmarks/README.md s.8).
    """
    n = environ.get("OMP_NUM_THREADS", "1")
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def torchrun_command(module: str, config_path: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, "--config", str(config_path)]


class RunOutcome:
    def __init__(self, returncode: int, stopped: bool, done: dict[str, Any] | None, log_tail: str):
        self.returncode, self.stopped, self.done, self.log_tail = returncode, stopped, done, log_tail


def supervise(
    cmd: list[str],
    events: Path,
    log_path: Path,
    on_event: Callable[[dict[str, Any]], None],
    should_stop: Callable[[], bool],
    env: dict[str, str] | None = None,
    poll: float = 0.25,
) -> RunOutcome:
    """Run `cmd` in its own session, feed its events to `on_event`, SIGTERM the group when `should_stop()`."""
    events.parent.mkdir(parents=True, exist_ok=True)
    tail = EventTail(events)
    stopped = False
    done: dict[str, Any] | None = None
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent,
                                # torchrun waits this long for ranks to finish their signal checkpoint
                                env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(TERM_GRACE_SECONDS)),
                                     **os.environ, **(env or {})})
        term_sent_at: float | None = None
        try:
            while True:
                for ev in tail.read():
                    if ev.get("event") == "stopped":
                        stopped = True
                    if ev.get("event") == "done":
                        done = ev
                    on_event(ev)
                if proc.poll() is not None:
                    break
                if term_sent_at is None and should_stop():
                    term_sent_at = time.monotonic()
                    _signal_group(proc, signal.SIGTERM)
                elif term_sent_at is not None and time.monotonic() - term_sent_at > TERM_GRACE_SECONDS:
                    _signal_group(proc, signal.SIGKILL)
                time.sleep(poll)
        except BaseException:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=TERM_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
            raise
        for ev in tail.read():  # the last events written before exit
            if ev.get("event") == "stopped":
                stopped = True
            if ev.get("event") == "done":
                done = ev
            on_event(ev)
    return RunOutcome(proc.returncode, stopped, done, _tail(log_path))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()[-n:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace")
