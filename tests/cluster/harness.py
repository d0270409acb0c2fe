"""The cluster: a head node (Redis, PostgreSQL, S3), the harness's own control host, and worker nodes, each in its
own network namespace on one bridge (tests/cluster/netns.py). Workers are the fault suite's warm nodes
(tests/faults/node.py: the Celery worker `orchestrator worker` runs, forked from a process that has imported the
ML libraries), each forked straight into its namespace, with a private ORCH_HOME and TMPDIR.

The harness process itself moves into the control namespace while the cluster is up, so every connection it
makes (submit, DB queries, S3) crosses the bridge like a client's would; `close()` moves it back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy import select

from shared.db import session_scope, upgrade
from shared.models import Shard
from shared.settings import Settings
from tests.cluster.head import Head, cleanup_folder
from tests.cluster.netns import Fabric, restart_io_threads, setns
from tests.faults import cluster as cl
from tests.faults.node import Zygote

#: Lease of the cluster's jobs (s): short, so a partition "longer than the lease" stays short too.
LEASE_SECONDS = 5.0
WORKERS = ("w1", "w2", "w3")


def netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


class Harness:
    def __init__(self, root: Path | None = None, workers: tuple[str, ...] = WORKERS,
                 lease_seconds: float = LEASE_SECONDS, storage: str | None = None):
        self.root = root or Path(tempfile.mkdtemp(prefix="orch-cluster-"))
        self.roles = workers
        self.lease_seconds = lease_seconds
        self.fabric = Fabric()
        self.head: Head | None = None
        self.zygote: Zygote | None = None
        self.nodes: dict[str, cl.Node] = {}
        self._storage = storage
        self.settings: Settings | None = None
        self._ns_role: dict[int, str] = {}
        self.setup_seconds = 0.0

    # -- life cycle ------------------------------------------------------------------------------------------------

    def start(self, zygote: Zygote | None = None) -> Harness:
        t0 = time.monotonic()
        try:
            # the fork server starts here, in the host namespace: each node it forks moves into its own
            # (a generous start-up bound: its imports take minutes when the machine's cores are busy)
            self.zygote = zygote or Zygote(self.root / "zygote", cl.base_env(), cl.REPO, timeout=900)
            self._own_zygote = zygote is None
            roles = [("head", 1), ("ctl", 2)] + [(r, 11 + i) for i, r in enumerate(self.roles)]
            self.fabric.build(roles)
            setns(self.fabric.hosts["ctl"].name)
            restart_io_threads()  # S3 requests of this process now leave from the ctl node
            self.head = Head(self.fabric.hosts["head"], self.root / "head")
            self.head.start()
            for role in self.roles:
                self._ns_role[os.stat(f"/run/netns/{self.fabric.hosts[role].name}").st_ino] = role
            storage = self._storage or "s3://orch/cluster"
            self.settings = Settings(home=self.root / "ctl-home", broker_url=self.head.broker_url,
                                     database_url=self.head.database_url, storage=storage,
                                     lease_seconds=self.lease_seconds)
            # the harness's own S3 client reads the standard variables; its read cache lives under ORCH_HOME
            self._saved_env = {k: os.environ.get(k) for k in (*self.head.s3_env(), "ORCH_HOME")}
            os.environ.update({**self.head.s3_env(), "ORCH_HOME": str(self.settings.home)})
            upgrade(self.settings.database_url)  # `orchestrator db upgrade` against the head node
            for role in self.roles:
                self.start_worker(role, wait=False)
            for role in self.roles:
                self.wait_ready(role)
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - t0
        return self

    def close(self) -> None:
        try:
            setns(None)
            restart_io_threads()  # and from the host again
        finally:
            self.fabric.destroy()
            if self.zygote is not None and getattr(self, "_own_zygote", False):
                self.zygote.close()
            self.nodes.clear()
            for k, v in getattr(self, "_saved_env", {}).items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            cleanup_folder(self.root / "head")
            if self.head is not None and self.head.pg_root is not None:
                cleanup_folder(self.head.pg_root)

    def __enter__(self) -> Harness:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- workers ---------------------------------------------------------------------------------------------------

    def private(self, role: str) -> Path:
        return self.root / "nodes" / role

    def worker_env(self, role: str) -> dict[str, str]:
        home, tmp = self.private(role) / "home", self.private(role) / "tmp"
        for p in (home, tmp):
            p.mkdir(parents=True, exist_ok=True)
        s = replace(self.settings, home=home)
        return cl.worker_env(s, {**self.head.s3_env(), "TMPDIR": str(tmp), "HOME": str(self.private(role)),
                                    "ORCH_CACHE": str(home / "cache")})

    def start_worker(self, role: str, wait: bool = True) -> cl.Node:
        log = self.root / "logs" / f"{role}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while log.exists():  # a replacement node: a log (and exit file) of its own
            n += 1
            log = self.root / "logs" / f"{role}-{n}.log"
        proc = self.zygote.spawn("gpu,cpu", f"{role}@%h", self.worker_env(role), log,
                                 netns=self.fabric.hosts[role].name)
        node = cl.Node(role, proc, log)
        self.nodes[role] = node
        if wait:
            self.wait_ready(role)
        return node

    def wait_ready(self, role: str, timeout: float = 180.0) -> None:
        node = self.nodes[role]
        start = len(node.text())
        cl.wait_for(lambda: " ready." in node.text() or not node.alive(), timeout, 0.2, f"{role} ready")
        if not node.alive():
            raise RuntimeError(f"worker {role} exited at start:\n{node.text()[start:][-3000:]}")

    def role_of_pid(self, pid: int | None) -> str | None:
        if pid is None:
            return None
        return self._ns_role.get(netns_inode(pid))

    # -- faults ----------------------------------------------------------------------------------------------------

    def kill_node(self, role: str) -> int:
        """Every process in the node's namespace, at once (SIGKILL)."""
        n = self.fabric.kill_host(role)
        node = self.nodes.get(role)
        if node is not None:
            try:
                node.proc.wait(timeout=30)
            except Exception:
                pass
        return n


class ShardWatch:
    """Records, per shard, the node (namespace) of every lease owner seen running it, and of the completer."""

    def __init__(self, harness: Harness, job_id: str, poll: float = 0.05):
        self.h, self.job_id, self.poll = harness, job_id, poll
        self.runs: dict[int, list[tuple[str, str | None]]] = {}  # index -> [(owner, role)]
        self.current: dict[int, str | None] = {}  # shards running at the last sample -> node
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.sample()
            except Exception:
                pass  # a failed poll is retried at the next one

    def sample(self) -> None:
        current = {}
        for r in cl.running_shards(self.h.settings, self.job_id):
            seen = self.runs.setdefault(r.index, [])
            if not seen or seen[-1][0] != r.owner:
                seen.append((r.owner, self.h.role_of_pid(r.pid)))
            current[r.index] = seen[-1][1]
        self.current = current

    def running_on(self, role: str) -> tuple[int, ...]:
        """Shards running on `role` right now (a tuple: shard 0 must not read as "none")."""
        return tuple(i for i, r in self.current.items() if r == role)

    def completers(self) -> dict[int, str | None]:
        """Shard -> node that recorded its completion (the owner pid in the result, mapped through the owners
        seen running it)."""
        with session_scope(self.h.settings) as s:
            rows = s.execute(select(Shard.index, Shard.result).where(Shard.job_id == self.job_id,
                                                                     Shard.state == "done")).all()
        out = {}
        for index, result in rows:
            pid = (result or {}).get("pid")
            role = next((r for o, r in self.runs.get(index, []) if cl.owner_pid(o) == pid), None)
            out[index] = role or self.h.role_of_pid(pid)
        return out

    def __enter__(self) -> ShardWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
