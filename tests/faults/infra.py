"""Things a fault case breaks on purpose, all private to the case: a Redis server it can restart, a TCP proxy in
front of PostgreSQL that it can cut, and a tiny tmpfs it can fill or make read-only.

The shared Redis (6379) and PostgreSQL (5432) servers are never stopped or reconfigured: other test runs use them.
Every object here stops what it started, within a bounded time.
"""

from __future__ import annotations

import errno
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class PrivateRedis:
    """A redis-server on a free loopback port, with AOF persistence as deploy/ runs it (`--appendonly yes`)."""

    def __init__(self, folder: Path, appendonly: bool = True, password: str | None = None):
        self.folder, self.appendonly, self.password = folder, appendonly, password
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.folder),
                "--logfile", str(self.folder / "redis.log")]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM: Redis flushes its AOF and exits, as when its pod is restarted."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self, down: float) -> None:
        self.stop()
        time.sleep(down)
        self.start()


class TcpProxy:
    """A loopback TCP proxy to `upstream` that can be cut: `cut()` drops every open connection and refuses new ones
    (nothing listens on the port) until `restore()`. Put between the workers and PostgreSQL, it makes the database
    unavailable to them while the shared server keeps running for everyone else."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.connections = 0

    def start(self) -> None:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:  # the previous listener may take a moment to be released (see cut)
            try:
                ls.bind(("127.0.0.1", self.port))
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    ls.close()
                    raise
                time.sleep(0.05)
        ls.listen(128)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), name="proxy-accept", daemon=True).start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # listener closed: cut or closed
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not ls:  # cut meanwhile
                    client.close()
                    server.close()
                    continue
                self._socks.update((client, server))
                self.connections += 1
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._close(s)

    def _close(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def cut(self) -> None:
        with self._lock:
            ls, self._listener = self._listener, None
            socks = list(self._socks)
        if ls is not None:
            # close() alone leaves the socket listening while the accept thread is blocked in accept() on it (the
            # kernel keeps it alive for the syscall); shutdown() wakes that accept, which then lets go of it.
            try:
                ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            ls.close()
        for s in socks:
            self._close(s)

    def restore(self) -> None:
        self.start()

    def close(self) -> None:
        self.cut()

    def url_for(self, database_url: str) -> str:
        """`database_url` with its host:port replaced by this proxy's."""
        from sqlalchemy.engine import make_url

        return make_url(database_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)


class Tmpfs:
    """A tmpfs mounted at `path` (root only): `size` makes it fill up, `ro` makes it read-only; remountable."""

    def __init__(self, path: Path):
        self.path = path
        self.mounted = False

    @staticmethod
    def available(scratch: Path) -> str | None:
        """None when mounting works here, else why not."""
        probe = scratch / f"mount-probe-{uuid.uuid4().hex[:6]}"
        probe.mkdir(parents=True, exist_ok=True)
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(probe)], capture_output=True,
                               text=True, timeout=20)
            if r.returncode != 0:
                return f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}"
            subprocess.run(["umount", str(probe)], capture_output=True, timeout=20)
            return None
        except (OSError, subprocess.SubprocessError) as e:
            return f"cannot mount a tmpfs here: {e}"
        finally:
            try:
                probe.rmdir()
            except OSError:
                pass

    def _run(self, *argv: str) -> None:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")

    def mount(self, size: int, ro: bool = False) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755{',ro' if ro else ''}", "tmpfs", str(self.path))
        self.mounted = True

    def remount(self, size: int | None = None, ro: bool | None = None) -> None:
        opts = ["remount"]
        if size is not None:
            opts.append(f"size={size}")
        if ro is not None:
            opts.append("ro" if ro else "rw")
        self._run("mount", "-o", ",".join(opts), str(self.path))

    def umount(self) -> None:
        if self.mounted:
            r = subprocess.run(["umount", str(self.path)], capture_output=True, timeout=20)
            if r.returncode != 0:  # a process may still hold a file there: detach now, free when released
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=20)
            self.mounted = False


@contextmanager
def temporary_pg_database(admin_url: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database on the shared server, dropped after."""
    from shared.db import temporary_database

    with temporary_database(admin_url, "orch_faults") as url:
        yield url
