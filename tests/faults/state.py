"""What a job left behind, and how it compares with the fault-free run of the same job.

A fault case passes when its end state equals the fault-free run's: job state and counters, every shard's state,
one artifact per shard whose *content* equals the reference's, the item rows (pair -> shard, artifact, position),
and the summary metrics except the timing ones. Artifact bytes embed the job id in their safetensors metadata, so
two jobs never share a file sha256: the comparison uses a content hash (tensor names, dtypes, shapes, bytes and the
metadata without the job id), and separately checks that each recorded sha256 and size are the bytes on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from shared import constants as C
from shared.db import session_scope
from shared.models import Artifact, Item, Job, Metric, Shard
from shared.settings import Settings
from shared.storage import Storage, sha256_file

#: Summary metrics that measure time, so differ between any two runs.
TIMING_METRICS = frozenset({"shard_seconds_total", "wall_seconds", "pairs_per_second"})


@dataclass(frozen=True)
class Plan:
    """An invert job: `pairs` synthetic M3FD pairs in `shards` contiguous shards, `batch_size` pairs per batch."""

    pairs: int
    shards: int
    batch_size: int = 1

    def args(self, data: Path, model: Path) -> argparse.Namespace:
        """The `orchestrator submit invert` arguments of this plan (64 px, the README preset, seed 0)."""
        return argparse.Namespace(data=str(data), model=str(model), shards=self.shards, t=None, steps=None, size=64,
                                  batch_size=self.batch_size, preset="readme", split_seed=42, test_fraction=0.2,
                                  precision="auto", seed=0)


#: 20 shards of 2 pairs: enough shards for 20 kills in one job.
MANY = Plan(pairs=40, shards=20)
#: 8 shards of 2 pairs: the job of every other invert case.
SMALL = Plan(pairs=16, shards=8)


@dataclass
class Inputs:
    """A tiny SD model of the real classes and synthetic data sets, made once under `root`."""

    root: Path
    model: Path

    def data(self, pairs: int) -> Path:
        from workers.fixtures.m3fd import write_synthetic

        out = self.root / f"m3fd-{pairs}"
        if not (out / "Vis").is_dir():
            write_synthetic(out, pairs)  # pair i does not depend on the count: the sets nest
        return out

    def args(self, plan: Plan) -> argparse.Namespace:
        return plan.args(self.data(plan.pairs), self.model)


def make_inputs(root: Path, model: Path | None = None) -> Inputs:
    from workers.fixtures.tiny_sd import write_tiny_sd

    root.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = root / "tiny-sd"
        if not (model / "unet").is_dir():
            write_tiny_sd(model)
    return Inputs(root, model)


class SubmitterCrash(RuntimeError):
    """Raised in place of publishing: the submitting process 'dies' after the rows are committed."""


@contextlib.contextmanager
def crash_before_publish() -> Iterator[None]:
    """`jobs.submit` raises SubmitterCrash after `create_job` committed, before any message is published."""
    from orchestrator import jobs

    def crash(*_a, **_kw):
        raise SubmitterCrash("the submitter died before publishing")

    orig = jobs.enqueue_shards
    jobs.enqueue_shards = crash
    try:
        yield
    finally:
        jobs.enqueue_shards = orig


def create_unpublished(settings: Settings, inputs: Inputs, plan: Plan) -> str:
    """The job's rows exactly as `orchestrator submit invert` creates them, with nothing published."""
    from orchestrator.submit import submitter
    submit_invert = submitter("invert")
    from shared.db import ensure_schema

    ensure_schema(settings)
    with crash_before_publish():
        before = job_ids(settings)
        try:
            submit_invert(settings, inputs.args(plan))
        except SubmitterCrash:
            pass
    (job_id,) = job_ids(settings) - before
    return job_id


def job_ids(settings: Settings) -> set[str]:
    with session_scope(settings) as s:
        return set(s.execute(select(Job.id)).scalars())


def content_hash(path: Path) -> str:
    """sha256 of a latents file's tensors and metadata, without the job id (which differs between runs)."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        meta = _without_job_id(f.metadata() or {})
        h.update(json.dumps(meta, sort_keys=True).encode())
        for key in sorted(f.keys()):
            t = f.get_tensor(key)
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes())  # any dtype, bf16 included
    return h.hexdigest()


def _without_job_id(meta: dict[str, str]) -> dict[str, Any]:
    """Metadata values are strings, some of them JSON objects: drop `job_id` at either level."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if key == "job_id":
            continue
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError):
            parsed = value
        if isinstance(parsed, dict):
            parsed = {k: v for k, v in parsed.items() if k != "job_id"}
        out[key] = parsed
    return out


@dataclass
class Fingerprint:
    """The end state of one invert job, in terms two runs of the same job can be compared in."""

    job_id: str
    state: str
    shards_total: int
    shards_done: int
    shards_failed: int
    error: str | None
    shard_states: dict[int, str]
    attempts: dict[int, int]
    #: shard index -> content hashes of the artifact rows recorded for it (one when all is well)
    artifacts: dict[int, list[str]]
    #: (pair_id, split, shard_index, shard of its artifact, position), one per item row
    items: list[tuple]
    summary: dict[str, float]
    metric_rows: int
    #: recorded artifacts whose file is missing or whose bytes differ from the recorded sha256/size
    integrity: list[str] = field(default_factory=list)
    #: files under the job's storage folder that no artifact row points to (".tmp-*" leftovers included)
    stray: list[str] = field(default_factory=list)
    #: sizes of the recorded artifacts (bytes)
    artifact_bytes: list[int] = field(default_factory=list)

    def comparable(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "counters": (self.shards_total, self.shards_done, self.shards_failed),
            "shard_states": self.shard_states,
            "artifacts": {i: sorted(h) for i, h in self.artifacts.items()},
            "items": self.items,
            "summary": {k: v for k, v in self.summary.items() if k not in TIMING_METRICS},
            "metric_rows": self.metric_rows,
        }


def fingerprint(settings: Settings, job_id: str) -> Fingerprint:
    storage = Storage(settings.storage)
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        shards = s.execute(select(Shard.index, Shard.state, Shard.attempts).where(Shard.job_id == job_id)).all()
        arts = s.execute(select(Artifact.id, Artifact.shard_index, Artifact.uri, Artifact.sha256, Artifact.bytes,
                                Artifact.meta).where(Artifact.job_id == job_id)).all()
        items = s.execute(select(Item.pair_id, Item.split, Item.shard_index, Item.artifact_id, Item.position)
                          .where(Item.job_id == job_id)).all()
        metrics = s.execute(select(Metric.name, Metric.value, Metric.step, Metric.item)
                            .where(Metric.job_id == job_id)).all()
        fp = Fingerprint(job_id, job.state, job.shards_total, job.shards_done, job.shards_failed, job.error,
                         {i: st for i, st, _ in shards}, {i: a for i, _, a in shards}, {}, [], {}, len(metrics))
    shard_of_artifact = {}
    recorded: set[Path] = set()
    for art_id, index, uri, sha, size, meta in arts:
        path = storage.resolve(uri)
        recorded.add(path)
        if not path.is_file():
            fp.integrity.append(f"shard {index}: {uri} is recorded but missing")
            continue
        if sha256_file(path) != sha or path.stat().st_size != size:
            fp.integrity.append(f"shard {index}: {uri} differs from its recorded sha256/size")
        if (meta or {}).get("preview"):
            continue  # an invert job's preview pictures (workers/previews.py): checked above, not the shard's result
        shard_of_artifact[art_id] = index
        fp.artifact_bytes.append(size)
        fp.artifacts.setdefault(index, []).append(content_hash(path))
    fp.items = sorted((p, sp, sh, shard_of_artifact.get(a), pos) for p, sp, sh, a, pos in items)
    fp.summary = {n: v for n, v, st, it in metrics if st == C.SUMMARY_STEP and it == C.NO_ITEM}
    folder = storage.path(f"jobs/{job_id}")
    if folder.is_dir():
        fp.stray = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p not in recorded)
    return fp


@dataclass
class Verdict:
    lost: int
    duplicated: int
    equal: bool
    diffs: list[str]


def compare(ref: Fingerprint, got: Fingerprint) -> Verdict:
    """Shards whose result is missing (lost), results recorded more than once (duplicated), and every difference."""
    lost = 0
    for i in range(ref.shards_total):
        recorded = got.artifacts.get(i, [])
        items_ok = all(a == i for _, _, sh, a, _ in got.items if sh == i)
        if got.shard_states.get(i) != "done" or not recorded or not items_ok:
            lost += 1
    done_rows = sum(1 for st in got.shard_states.values() if st == "done")
    pairs = Counter(p for p, *_ in got.items)
    duplicated = (
        sum(max(0, len(h) - 1) for h in got.artifacts.values())
        + max(0, got.shards_done - done_rows)
        + sum(n - 1 for n in pairs.values())
        + max(0, got.metric_rows - ref.metric_rows)
    )
    a, b = ref.comparable(), got.comparable()
    diffs = [f"{k}: expected {a[k]!r}, got {b[k]!r}" for k in a if a[k] != b[k]]
    diffs += got.integrity
    diffs += [f"stray file {p}" for p in got.stray if not Path(p).name.startswith(".tmp-")]
    return Verdict(lost, duplicated, not diffs, diffs)


def run_reference(home: Path, inputs: Inputs, plan: Plan) -> str:
    """Run the plan's job fault-free in this process (the shards one after another) under `home`; its job id."""
    from orchestrator.submit import submitter
    submit_invert = submitter("invert")
    from tests.threads import torch_threads
    from workers.runner import run_shard
    from workers.tasks.invert import invert_work

    settings = Settings.from_env({"ORCH_HOME": str(home)})
    settings.ensure_local_folders()
    # the real submit; its messages go to this run's own broker folder, which nobody reads
    job_id = submit_invert(settings, inputs.args(plan))
    with torch_threads(1):  # as in the workers (OMP_NUM_THREADS=1): same kernels, same bytes
        for i in range(plan.shards):
            run_shard(settings, job_id, i, invert_work)
    return job_id


class References:
    """Fault-free runs of each plan, each computed once.

    `prefetch` runs them in a separate process (`python -m tests.faults.state`) in the CPU the first cases leave
    idle while they wait for leases to expire; `get` waits for it, or runs the plan here when nothing prefetched it.
    (A separate process, not a thread: Alembic's migration context and the patched submit are process-global.)
    """

    def __init__(self, inputs: Inputs, root: Path):
        self.inputs, self.root = inputs, root
        self._done: dict[Plan, Fingerprint] = {}
        self._proc: subprocess.Popen | None = None

    def home(self, plan: Plan) -> Path:
        return self.root / f"ref-{plan.pairs}-{plan.shards}"

    def prefetch(self, plans: tuple[Plan, ...] = (SMALL, MANY)) -> None:
        from tests.faults.cluster import REPO, base_env

        for plan in plans:
            self.inputs.data(plan.pairs)  # made here, once, not raced by the other process
        argv = [sys.executable, "-m", "tests.faults.state", str(self.root), str(self.inputs.root),
                str(self.inputs.model), *(f"{p.pairs}x{p.shards}x{p.batch_size}" for p in plans)]
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "references.log", "ab") as log:
            self._proc = subprocess.Popen(argv, env=base_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def get(self, plan: Plan, timeout: float = 600.0) -> Fingerprint:
        if plan not in self._done:
            marker = self.home(plan) / "job_id"
            if self._proc is not None and not marker.exists():
                try:
                    self._proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
            if marker.exists():
                job_id = marker.read_text().strip()
            else:
                job_id = run_reference(self.home(plan), self.inputs, plan)
            fp = fingerprint(Settings.from_env({"ORCH_HOME": str(self.home(plan))}), job_id)
            assert fp.state == "succeeded" and not fp.integrity, (fp.state, fp.error, fp.integrity)
            self._done[plan] = fp
        return self._done[plan]

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)


def _main(argv: list[str]) -> None:
    """`python -m tests.faults.state ROOT INPUTS MODEL PAIRSxSHARDSxBATCH...`: the references of References."""
    root, inputs = Path(argv[0]), Inputs(Path(argv[1]), Path(argv[2]))
    for spec in argv[3:]:
        pairs, shards, batch = (int(x) for x in spec.split("x"))
        plan = Plan(pairs, shards, batch)
        home = root / f"ref-{plan.pairs}-{plan.shards}"
        job_id = run_reference(home, inputs, plan)
        (home / "job_id").write_text(job_id)


if __name__ == "__main__":
    _main(sys.argv[1:])
