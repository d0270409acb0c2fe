"""Real worker nodes for the fault cases, and what the cases need to find, signal and watch them.

A node is one Celery worker (main process + prefork pool children) in its own session, so `os.killpg` takes the
whole node down as a lost machine would. Nodes log at INFO, so a case can count deliveries, retries and skips of a
task id in the logs. `Cluster` always stops its nodes: SIGKILL of each node's process group.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from shared.db import session_scope
from shared.models import Shard
from shared.settings import Settings
from tests.faults.node import ForkedProcess, Zygote, die_with_parent

REPO = Path(__file__).resolve().parents[2]


def _processes():
    """(pid, state, ppid, pgrp) of every process, read from /proc/*/stat (psutil is not installed, and
    /proc/PID/task/*/children is not available here)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        yield int(stat.parent.name), state, int(ppid), int(pgrp)


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`."""
    return [p for p, _, ppid, _ in _processes() if ppid == pid]


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process belongs to process group `pgid`."""
    return any(pgrp == pgid and state != "Z" for _, state, _, pgrp in _processes())


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (e.g. a training attempt's config file)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                out.append(int(cmdline.parent.name))
        except OSError:
            continue
    return out


def owner_pid(owner: str | None) -> int | None:
    """The pid in a lease owner `host:pid:task_id` (bookkeeping.make_owner)."""
    if not owner:
        return None
    try:
        return int(owner.rsplit(":", 2)[1])
    except (IndexError, ValueError):
        return None


def wait_for(pred: Callable[[], object], timeout: float, poll: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def base_env() -> dict[str, str]:
    """This environment, one thread per process, and the repository importable (for `-m tests.faults.node`)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}


def worker_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**base_env(), "ORCH_HOME": str(settings.home), "ORCH_BROKER_URL": settings.broker_url,
            "ORCH_DATABASE_URL": settings.database_url, "ORCH_STORAGE": settings.storage,
            "ORCH_LEASE_SECONDS": str(settings.lease_seconds), **(extra or {})}


def start_zygote(folder: Path) -> Zygote:
    return Zygote(folder, base_env(), REPO)


@dataclass
class Node:
    name: str
    proc: subprocess.Popen | ForkedProcess
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def hostname(self) -> str:
        """The Celery node name (`%h` is this machine's host name)."""
        return f"{self.name}@{socket.gethostname()}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def children(self) -> list[int]:
        return children_of(self.pid) if self.alive() else []

    def holds(self, pid: int | None) -> bool:
        """Whether `pid` is this node's main process or one of its pool children."""
        return pid is not None and self.alive() and (pid == self.pid or pid in self.children())

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def ready(self) -> bool:
        return " ready." in self.text()

    def kill_node(self) -> None:
        """SIGKILL to the whole process group: main process, pool children and anything they started."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def warm_shutdown(self) -> None:
        """SIGTERM to the main process, as Kubernetes sends on scale-down: finish running tasks, then exit."""
        self.proc.send_signal(signal.SIGTERM)


class Cluster:
    """Worker nodes of one case: forked by `zygote` when given (warm, see tests/faults/node.py), else each the real
    `orchestrator worker` command (cold: it imports everything itself)."""

    def __init__(self, settings: Settings, log_dir: Path, zygote: Zygote | None = None, queues: str = "gpu,cpu",
                 env: dict[str, str] | None = None):
        self.settings, self.log_dir, self.queues, self.zygote = settings, log_dir, queues, zygote
        self.env = worker_env(settings, env)
        self.nodes: list[Node] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, n: int = 1, warm: bool = True, queues: str | None = None, ready_timeout: float = 120.0,
              ) -> list[Node]:
        """Start `n` nodes and wait until each is ready; `warm=False` starts the real `orchestrator worker`."""
        queues = queues or self.queues
        new = []
        for _ in range(n):
            name = f"n{len(self.nodes)}"
            log = self.log_dir / f"{name}.log"
            if warm and self.zygote is not None:
                proc = self.zygote.spawn(queues, f"{name}@%h", self.env, log)
            else:
                argv = [sys.executable, "-m", "orchestrator", "worker", "--queues", queues, "--hostname",
                        f"{name}@%h", "--loglevel", "INFO"]
                with open(log, "ab") as fh:
                    proc = subprocess.Popen(argv, env=self.env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=die_with_parent)
            node = Node(name, proc, log)
            self.nodes.append(node)
            new.append(node)
        for node in new:
            wait_for(lambda node=node: node.ready() or not node.alive(), ready_timeout, 0.2, f"{node.name} ready")
            if not node.alive():
                raise RuntimeError(f"worker {node.name} exited at start:\n{node.text()[-3000:]}")
        return new

    def node_holding(self, pid: int | None) -> Node | None:
        return next((n for n in self.nodes if n.holds(pid)), None)

    def logs(self) -> str:
        return "\n".join(n.text() for n in self.nodes)

    def stop(self) -> None:
        """SIGKILL every node's process group (main process, pool children, anything they started) and wait.
        Nothing a case checks happens after this, so there is no point in a graceful stop."""
        for node in self.nodes:
            if group_alive(node.pid):  # never signal a group number that may have been reused
                try:
                    os.killpg(node.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for node in self.nodes:
            try:
                node.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class Running:
    index: int
    owner: str
    attempts: int

    @property
    def pid(self) -> int | None:
        return owner_pid(self.owner)


def running_shards(settings: Settings, job_id: str) -> list[Running]:
    with session_scope(settings) as s:
        rows = s.execute(select(Shard.index, Shard.lease_owner, Shard.attempts)
                         .where(Shard.job_id == job_id, Shard.state == "running")).all()
    return [Running(i, o, a) for i, o, a in rows if o]


def shard_row(settings: Settings, job_id: str, index: int) -> tuple[str, str | None, int]:
    with session_scope(settings) as s:
        return tuple(s.execute(select(Shard.state, Shard.lease_owner, Shard.attempts)
                               .where(Shard.job_id == job_id, Shard.index == index)).one())


class Watch:
    """Polls a job's shards in a thread and records, per shard, every lease owner seen running it (in order)."""

    def __init__(self, settings: Settings, job_id: str, poll: float = 0.05):
        self.settings, self.job_id, self.poll = settings, job_id, poll
        self.owners: dict[int, list[str]] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                for r in running_shards(self.settings, self.job_id):
                    seen = self.owners.setdefault(r.index, [])
                    if not seen or seen[-1] != r.owner:
                        seen.append(r.owner)
            except Exception:  # a failed poll (a locked SQLite file, say) is simply retried at the next one
                self.errors += 1

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def task_log_lines(logs: str, task_id: str) -> list[str]:
    return [line for line in logs.splitlines() if task_id in line]


#: "Task invert.shard[ID] retry: Retry in ...": a delivery that met a live lease and will come back later.
RETRY_RE = re.compile(r"Task invert\.shard\[(?P<id>[0-9a-f-]+)\] retry")
