"""What every fault case runs on and returns: the bench (a backend's settings, inputs, references, worker nodes),
the outcome (what happened, compared with the fault-free run), the `fault_case` mark that makes a function of a
test module a case of `python -m tests.faults.summary`, and the helpers the cases share."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from orchestrator import jobs
from orchestrator.submit import submitter
from shared import constants as C
from shared.db import ensure_schema, session_scope
from shared.models import Job, Shard
from shared.settings import Settings
from shared.status import JobState
from tests.faults import cluster as cl
from tests.faults.node import Zygote
from tests.faults.state import (
    Inputs,
    Plan,
    References,
    compare,
    fingerprint,
)

submit_invert = submitter("invert")

#: Lease of every case (s): a dead owner's shard is free again after at most this long.
LEASE_SECONDS = 4.0
#: Longest wait for a job to end once its faults are injected (s); a job still running then is reported as such.
JOB_TIMEOUT = 180.0


@dataclass
class Bench:
    """What a case runs on: a backend's settings (with the short lease), the inputs, the references, a folder.

    `settings` is the backend's; `fresh(name)` gives a case its own state: on the embedded default a new home
    (SQLite file, broker folder, artifacts), on servers the same database (jobs do not share rows) and an emptied
    Redis DB index, so no message of an earlier case reaches this one.
    """

    backend: str
    settings: Settings
    inputs: Inputs
    refs: References
    work: Path
    zygote: Zygote | None = None

    def cluster(self, settings: Settings, name: str, env: dict[str, str] | None = None,
                queues: str = "gpu,cpu") -> cl.Cluster:
        return cl.Cluster(settings, self.folder(f"logs-{name}"), self.zygote, queues=queues, env=env)

    def folder(self, name: str) -> Path:
        p = self.work / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def fresh(self, name: str) -> Settings:
        if self.settings.embedded_broker:
            home = self.folder(f"{name}-home")
            s = replace(self.settings, home=home, database_url=f"sqlite:///{home / C.DB_FILENAME}",
                        storage=str(home / C.STORAGE_DIRNAME))
            s.ensure_local_folders()
            # migrate before any node starts: nodes starting together on a fresh SQLite file race the migration
            # (see docs/faults.md), and a node that loses the race runs without a reaper thread
            ensure_schema(s)
            return s
        import redis

        redis.Redis.from_url(self.settings.broker_url).flushdb()
        return replace(self.settings, storage=str(self.folder(f"{name}-artifacts")))


@dataclass
class Outcome:
    case: str
    backend: str
    injections: int
    shards: int
    lost: int
    duplicated: int
    state: str
    equal: bool
    seconds: float
    #: case-specific assertions, by description
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def failures(self) -> list[str]:
        return [name for name, ok in self.checks.items() if not ok]

    def report(self) -> str:
        lines = [f"{self.case} [{self.backend}]: state={self.state} lost={self.lost} duplicated={self.duplicated} "
                 f"equal={self.equal} injections={self.injections}"]
        lines += [f"  FAILED: {name}" for name in self.failures()]
        lines += [f"  {n}" for n in self.notes[:30]]
        return "\n".join(lines)


def short_lease(settings: Settings) -> Settings:
    return replace(settings, lease_seconds=LEASE_SECONDS)


def wait_job(settings: Settings, job_id: str, timeout: float = JOB_TIMEOUT) -> Job:
    return jobs.wait(settings, job_id, timeout=timeout, poll=0.2)


def conclude(bench: Bench, settings: Settings, case: str, plan: Plan, job_id: str, injections: int, t0: float,
             checks: dict[str, bool] | None = None, notes: list[str] | None = None) -> Outcome:
    """Compare the job's end state with the fault-free run's and add the checks every case makes. A job that did
    not end is cancelled afterwards, so no later case's reaper picks it up."""
    seconds = round(time.monotonic() - t0, 1)  # the case itself, not the wait for its reference below
    fp = fingerprint(settings, job_id)
    if not JobState(fp.state).finished:
        jobs.cancel(settings, job_id)
    v = compare(bench.refs.get(plan), fp)
    out = Outcome(case, bench.backend, injections, plan.shards, v.lost, v.duplicated, fp.state, v.equal, seconds,
                  dict(checks or {}), list(notes or []) + v.diffs)
    out.checks["job succeeded"] = fp.state == JobState.SUCCEEDED
    out.checks["no shard lost"] = v.lost == 0
    out.checks["nothing recorded twice"] = v.duplicated == 0
    out.checks["end state equals the fault-free run"] = v.equal
    return out


def submit(settings: Settings, bench: Bench, plan: Plan) -> str:
    """`orchestrator submit invert` of the plan (rows, then one message per shard)."""
    return submit_invert(settings, bench.inputs.args(plan))


def wait_running_on(settings: Settings, job_id: str, cluster: cl.Cluster, node: cl.Node | None = None,
                    first_attempt: bool = True, timeout: float = 120.0) -> cl.Running:
    """A shard running right now in a pool child of `node` (of any node of the cluster when None)."""

    def pick():
        for r in cl.running_shards(settings, job_id):
            holder = cluster.node_holding(r.pid)
            if holder is not None and (node is None or holder is node) and (r.attempts == 1 or not first_attempt):
                return r
        return None

    return cl.wait_for(pick, timeout, 0.02, "a running shard")


def shards_in(settings: Settings, job_id: str, *states: str) -> int:
    with session_scope(settings) as s:
        return s.execute(select(func.count()).select_from(Shard)
                         .where(Shard.job_id == job_id, Shard.state.in_(states))).scalar_one()


def attempts_of(settings: Settings, job_id: str) -> dict[int, int]:
    with session_scope(settings) as s:
        return dict(s.execute(select(Shard.index, Shard.attempts).where(Shard.job_id == job_id)).all())


class Skip(Exception):
    """The case cannot run here (e.g. mounting is not permitted); the message says why."""


def cli(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`orchestrator ARGS` in a process of its own, with the environment the worker nodes get."""
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=cl.worker_env(settings), cwd=cl.REPO,
                          capture_output=True, text=True, timeout=timeout)


BOTH = ("servers", "embedded")


@dataclass(frozen=True)
class Case:
    """A fault case: its `--cases` name, its function, the backends it applies to, and its arguments per backend."""

    name: str
    fn: Callable[..., list[Outcome]]
    backends: tuple[str, ...]
    kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(self, bench: Bench, **overrides: Any) -> list[Outcome]:
        return self.fn(bench, **{**self.kwargs.get(bench.backend, {}), **overrides})


def fault_case(name: str, backends: tuple[str, ...] = BOTH, **kwargs: dict[str, Any]):
    """Mark a function of a test module in this folder as the fault case `name` (what `python -m
    tests.faults.summary --cases` takes), for `backends`, with its arguments per backend (`servers={...}`,
    `embedded={...}`). The summary finds the marked functions by importing the test modules, and the tests run them
    with `run_case` (tests/faults/conftest.py), so both run a case with the same arguments."""
    unknown = set(kwargs) - set(BOTH)
    if unknown:  # a misspelt backend would silently run the case with its defaults
        raise TypeError(f"fault case {name!r}: arguments for unknown backend(s) {', '.join(sorted(unknown))}")

    def mark(fn: Callable[..., list[Outcome]]) -> Callable[..., list[Outcome]]:
        fn.fault_case = Case(name, fn, backends, kwargs)
        return fn

    return mark


#: Outcomes (by case title) that show a bug not fixed yet: the tests mark them xfail(strict=True) with this reason
#: (tests/faults/conftest.py known_bug), and the summary fails once such an outcome keeps the promise.
KNOWN_BUGS: dict[str, str] = {}
