"""Worker nodes for the fault cases, started warm: the Celery command line `orchestrator worker` builds
(`orchestrator.worker.celery_argv`), run in a process that has already imported torch, diffusers and transformers.

    python -m tests.faults.node --hostname n0@%h --queues gpu,cpu    # one node
    python -m tests.faults.node --serve /tmp/zygote.sock              # a fork server of nodes (see Zygote)

Why: on this 2-core machine importing the ML libraries costs 10-20 s of CPU per process. A pool child that replaces
one killed with -9 is forked from its node's main process, so with the libraries imported there it starts at once,
as it does from a warm main process in production, and a node forked from the fork server starts in about a second.
The cases measure recovery, not import time. Everything else (app, configuration, tasks, signals, the reaper thread)
is what `orchestrator worker` runs; the SIGTERM and visibility-timeout cases use the real `orchestrator worker`
command.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

#: Imported before anything forks (importing torch does not initialise CUDA, so forking afterwards is safe).
#: Nothing here reads the ORCH_* settings: the Celery app itself is imported by each node, from its environment.
PRELOAD = ("numpy", "cv2", "torch", "safetensors.torch", "transformers", "diffusers", "workers.ml.sd",
           "workers.ml.inversion", "workers.ml.m3fd", "celery", "kombu", "kombu.transport.redis",
           "kombu.transport.filesystem", "redis", "sqlalchemy", "psycopg2", "alembic")


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    # diffusers and transformers load their classes lazily: touch the ones the invert work uses
    from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


def run_celery(queues: str, hostname: str, concurrency: int = 1, loglevel: str = "INFO") -> None:
    """Run the Celery worker `orchestrator worker` would exec, in this process (does not return)."""
    from orchestrator.worker import celery_argv, check_queues

    cmd = celery_argv(check_queues(queues), hostname, concurrency, loglevel, "prefork", None, None)
    sys.argv = ["celery", *cmd[3:]]  # drop "python -m celery"
    from celery.__main__ import main as celery_main

    celery_main()


# -- fork server ----------------------------------------------------------------------------------------------------


def serve(path: str) -> None:
    """Accept spawn requests on a unix socket; fork one node per request; write each node's exit status to
    `<log>.exit` when it ends. Exits when its parent does."""
    parent = os.getppid()
    preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    logs: dict[int, str] = {}
    while os.getppid() == parent:
        ready, _, _ = select.select([listener], [], [], 0.2)
        _reap(logs)
        if not ready:
            continue
        conn, _ = listener.accept()
        with conn:
            req = json.loads(conn.makefile("r").readline())
            pid = os.fork()
            if pid == 0:
                _child(req, listener, conn)  # never returns
            logs[pid] = req["log"]
            conn.sendall((json.dumps({"pid": pid}) + "\n").encode())


def _reap(logs: dict[int, str]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        log = logs.pop(pid, None)
        if log:
            Path(log + ".exit").write_text(str(code))


def _child(req: dict, listener: socket.socket, conn: socket.socket) -> None:
    code = 1
    try:
        listener.close()
        conn.close()
        os.setsid()  # its own session and process group: killpg takes the whole node
        die_with_parent()
        if req.get("netns"):  # a node of the cluster harness (tests/cluster): its machine's network namespace
            enter_netns(req["netns"])
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        run_celery(req["queues"], req["hostname"], req.get("concurrency", 1), req.get("loglevel", "INFO"))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _load_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


#: Looked up once here: a function run between fork and exec must not load libraries.
_PRCTL = _load_prctl()
_SETNS = getattr(ctypes.CDLL(None, use_errno=True), "setns", None)
PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move this (single-threaded, just forked) process into the network namespace `ip netns add NAME` made."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _SETNS is None or _SETNS(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name} failed")
    finally:
        os.close(fd)


def die_with_parent() -> None:
    """SIGKILL this process when its parent ends (the fork server ends when the test process does): no node
    outlives an interrupted run. The setting survives exec."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


class ForkedProcess:
    """A node forked by the fork server: the part of `subprocess.Popen` the cases use."""

    def __init__(self, pid: int, log: Path):
        self.pid, self._exit = pid, Path(str(log) + ".exit")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self._exit.exists():
            text = self._exit.read_text().strip()
            self.returncode = int(text) if text else None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"node {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


class Zygote:
    """The fork server, started once (it pays the imports) and stopped with `close()`."""

    def __init__(self, folder: Path, env: dict[str, str], cwd: Path, timeout: float = 180.0):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "zygote.sock"
        self.path.unlink(missing_ok=True)
        self.cwd = cwd
        self.log = folder / "zygote.log"
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.faults.node", "--serve", str(self.path)],
                                         env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the node fork server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def spawn(self, queues: str, hostname: str, env: dict[str, str], log: Path, loglevel: str = "INFO",
              concurrency: int = 1, netns: str | None = None) -> ForkedProcess:
        req = {"queues": queues, "hostname": hostname, "env": env, "log": str(log), "cwd": str(self.cwd),
               "loglevel": loglevel, "concurrency": concurrency, "netns": netns}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self.path))
            s.sendall((json.dumps(req) + "\n").encode())
            reply = json.loads(s.makefile("r").readline())
        return ForkedProcess(reply["pid"], log)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.faults.node")
    p.add_argument("--serve", metavar="SOCKET", help="run the fork server on this unix socket")
    p.add_argument("--queues", default="gpu,cpu")
    p.add_argument("--hostname", default="node@%h")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--loglevel", default="INFO")
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return
    preload()
    run_celery(args.queues, args.hostname, args.concurrency, args.loglevel)


if __name__ == "__main__":
    main()
