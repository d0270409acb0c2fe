"""Network namespaces joined by a bridge: the machines of the cluster harness, all on this one host.

Topology (PREFIX is unique per harness run, so two runs never share a name):

    PREFIX-sw    the switch: a bridge `br0` with one veth port per node, and no address of its own
    PREFIX-head  10.213.N.1  Redis, PostgreSQL, the S3 server
    PREFIX-ctl   10.213.N.2  the harness itself (submits, queries the DB, checks results)
    PREFIX-w1..3 10.213.N.11.. one `orchestrator worker` each

Every address lives inside a namespace created here, in a private range; no namespace has a default route, NAT
or forwarding, so nothing in the cluster can reach anything outside the bridge. `Fabric.destroy()` kills every
process in every namespace (found with `ip netns pids`, whoever started it) and deletes the namespaces; it runs
on normal exit, on an exception, at interpreter exit and on SIGTERM. Namespaces left by a run that died with
SIGKILL are removed by the next run (`sweep_stale`).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
#: Namespaces of this harness start with this; the creating process id follows (see sweep_stale).
NAME_PREFIX = "orchc"
_libc = ctypes.CDLL(None, use_errno=True)
#: The namespace this process started in (the host's), kept open to return to: /proc/1/ns/net may be unreadable.
_ORIGIN = os.open("/proc/self/ns/net", os.O_RDONLY)


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up (not root, no CAP_NET_ADMIN, a missing kernel feature)."""


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {(r.stderr or r.stdout).strip()}")
    return r


def setns(name: str | None) -> None:
    """Move the calling thread into network namespace `name` (None: the one this process started in).
    Threads started afterwards inherit it; sockets already open stay where they were opened."""
    if name is None:
        if _libc.setns(_ORIGIN, CLONE_NEWNET) != 0:
            raise NetnsError(f"setns back to the host namespace: {os.strerror(ctypes.get_errno())}")
        return
    path = f"/run/netns/{name}"
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise NetnsError(f"setns({path}): {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def restart_io_threads() -> None:
    """Stop fsspec's IO thread (s3fs's event loop) and drop the S3 filesystems bound to it; the next S3 call starts
    a new one in the calling thread's namespace.

    A thread inherits the namespace of the thread that starts it and keeps it. fsspec runs every S3 request of the
    process on one such thread: started while the harness was inside a node's namespace, it went on dialling that
    namespace's addresses after the harness came back, and every later S3 test of the session timed out. The
    harness calls this on each move between namespaces.
    """
    import sys

    asyn = sys.modules.get("fsspec.asyn")
    if asyn is not None:
        old = asyn.loop[0]
        asyn.reset_lock()
        if old is not None:
            old.call_soon_threadsafe(old.stop)
    s3 = sys.modules.get("shared.s3")
    if s3 is not None:
        s3._filesystems.clear()


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the block in namespace `name`, then return to the namespace the thread was in."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    setns(name)
    try:
        yield
    finally:
        _libc.setns(back, CLONE_NEWNET)
        os.close(back)


def ns_pids(name: str) -> list[int]:
    r = sh("ip", "netns", "pids", name, check=False)
    return [int(p) for p in r.stdout.split() if p.strip().isdigit()]


def kill_namespace(name: str, timeout: float = 15.0) -> int:
    """SIGKILL every process in namespace `name` at once, repeat until none is left; how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while (pids := ns_pids(name)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return len(killed)


def sweep_stale() -> list[str]:
    """Delete namespaces of earlier harness runs whose creating process is gone (a run killed with -9)."""
    removed = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(NAME_PREFIX + "-"):
            continue
        try:
            owner = int(name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if not os.path.exists(f"/proc/{owner}"):
            kill_namespace(name)
            sh("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass
class Host:
    name: str  # the namespace
    role: str  # head | ctl | w1 ...
    addr: str
    port: str  # its veth end on the switch

    def exec(self, *argv: str) -> list[str]:
        """`argv` run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


@dataclass
class Fabric:
    """The switch and the hosts plugged into it; `build` creates them, `destroy` removes them and their processes."""

    subnet: int = 213
    lan: int = 0
    prefix: str = field(default_factory=lambda: f"{NAME_PREFIX}-{os.getpid()}")
    hosts: dict[str, Host] = field(default_factory=dict)
    netem: dict[str, str] = field(default_factory=dict)
    _built: bool = False

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def addr(self, last: int) -> str:
        return f"10.{self.subnet}.{self.lan}.{last}"

    def build(self, roles: list[tuple[str, int]]) -> None:
        """Create the switch and one host per (role, last address byte)."""
        if os.geteuid() != 0:
            raise NetnsError("the cluster harness needs root (network namespaces, veth links)")
        sweep_stale()
        self._built = True
        atexit.register(self.destroy)
        _chain_sigterm(self.destroy)
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for role, last in roles:
            self.plug(role, last)

    def plug(self, role: str, last: int) -> Host:
        name, port = f"{self.prefix}-{role}", f"p-{role}"
        host = Host(name, role, self.addr(last), port)
        sh("ip", "netns", "add", name)
        self.hosts[role] = host
        sh("ip", "link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", port, "netns", self.switch)
        sh("ip", "-n", self.switch, "link", "set", port, "master", "br0")
        sh("ip", "-n", self.switch, "link", "set", port, "up")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "addr", "add", f"{host.addr}/24", "dev", "eth0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        # the /24 route alone: no default route, so nothing outside the bridge is reachable
        return host

    def routes(self, role: str) -> str:
        return sh("ip", "-n", self.hosts[role].name, "route", "show").stdout

    def link(self, role: str, up: bool) -> None:
        """Unplug (or plug back) a host's cable: its switch port goes down, so its packets go nowhere and nothing
        reaches it; its processes keep running and their connections stay open, as in a real partition."""
        sh("ip", "-n", self.switch, "link", "set", self.hosts[role].port, "up" if up else "down")

    def netem_available(self) -> str | None:
        """None when `tc qdisc ... netem` works here, else the reason (e.g. the kernel has no sch_netem)."""
        probe = f"{self.prefix}-probe"
        sh("ip", "netns", "add", probe)
        try:
            sh("ip", "-n", probe, "link", "set", "lo", "up")
            r = sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay",
                   "1ms", check=False)
            if r.returncode != 0:
                return f"tc netem is not available in this kernel ({(r.stderr or r.stdout).strip()})"
            return None
        finally:
            sh("ip", "netns", "del", probe, check=False)

    def set_netem(self, role: str, spec: str | None) -> None:
        """Delay/loss on both directions of a host's link (`spec` e.g. "delay 50ms loss 2%"; None removes it)."""
        h = self.hosts[role]
        for ns, dev in ((h.name, "eth0"), (self.switch, h.port)):
            if spec is None:
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            else:
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "netem", *spec.split())
        if spec is None:
            self.netem.pop(role, None)
        else:
            self.netem[role] = spec

    def kill_host(self, role: str) -> int:
        """Every process of a host at once: the machine is gone."""
        return kill_namespace(self.hosts[role].name)

    def destroy(self) -> None:
        if not self._built:
            return
        self._built = False
        names = [h.name for h in self.hosts.values()] + [self.switch]
        for name in names:
            for pid in ns_pids(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for name in names:
            kill_namespace(name)
            sh("ip", "netns", "del", name, check=False)
        self.hosts.clear()

    def leftovers(self) -> list[str]:
        """Namespaces of this fabric that still exist (empty after destroy)."""
        listed = {ln.split()[0] for ln in sh("ip", "netns", "list", check=False).stdout.splitlines() if ln.strip()}
        return sorted(n for n in listed if n.startswith(self.prefix + "-"))


def _chain_sigterm(cleanup) -> None:
    """On SIGTERM, clean up and exit (as Python does on Ctrl-C via KeyboardInterrupt), keeping any earlier handler."""
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        cleanup()
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: atexit and the caller's finally still clean up
        pass
