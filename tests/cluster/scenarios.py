"""The cluster scenarios: each runs a real job on the namespaced cluster (tests/cluster/harness.py), breaks
something on purpose, and compares the end state with the fault-free run of the same job (tests/faults/state.py:
job and shard states, one artifact per shard with identical content, recorded sha256 = stored bytes, item rows,
metrics). `python -m tests.cluster` and tests/cluster/test_cluster.py run these same functions.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from statistics import mean

from sqlalchemy import select

from orchestrator import jobs
from orchestrator.submit import submitter
from shared.db import session_scope
from shared.models import Shard
from shared.status import JobState
from tests.cluster.harness import Harness, ShardWatch
from tests.faults import cluster as cl
from tests.faults.state import Inputs, Plan, References, compare, fingerprint

submit_invert = submitter("invert")

#: The job of every invert scenario: 16 shards of 2 synthetic pairs, 64 px, the tiny SD model.
PLAN = Plan(pairs=32, shards=16)
JOB_TIMEOUT = 600.0


@dataclass
class Result:
    scenario: str
    faults: str
    lost: int | None = None
    duplicated: int | None = None
    equal: bool | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def failures(self) -> list[str]:
        return [k for k, ok in self.checks.items() if not ok]

    def report(self) -> str:
        head = f"{self.scenario}: faults={self.faults!r} lost={self.lost} duplicated={self.duplicated}"
        lines = [head] + [f"  FAILED: {k}" for k in self.failures()]
        lines += [f"  {k}: {v}" for k, v in self.figures.items()]
        lines += [f"  {n}" for n in self.notes[:20]]
        return "\n".join(lines)


@dataclass
class Context:
    h: Harness
    inputs: Inputs
    refs: References
    #: mean seconds per shard of the fault-free cluster run (the netem scenario's baseline)
    baseline_shard_s: float | None = None


def _submit(ctx: Context, plan: Plan = PLAN) -> str:
    return submit_invert(ctx.h.settings, ctx.inputs.args(plan))


def _wait(ctx: Context, job_id: str, timeout: float = JOB_TIMEOUT):
    return jobs.wait(ctx.h.settings, job_id, timeout=timeout, poll=0.2)


def shard_seconds(ctx: Context, job_id: str) -> list[float]:
    with session_scope(ctx.h.settings) as s:
        rows = s.execute(select(Shard.started_at, Shard.finished_at).where(Shard.job_id == job_id)).all()
    return [(b - a).total_seconds() for a, b in rows if a and b]


def _conclude(ctx: Context, res: Result, job_id: str, plan: Plan = PLAN) -> Result:
    fp = fingerprint(ctx.h.settings, job_id)
    if not JobState(fp.state).finished:
        jobs.cancel(ctx.h.settings, job_id)
    v = compare(ctx.refs.get(plan), fp)
    res.lost, res.duplicated, res.equal = v.lost, v.duplicated, v.equal
    res.notes += v.diffs
    res.checks["job succeeded"] = fp.state == JobState.SUCCEEDED
    res.checks["no shard lost"] = v.lost == 0
    res.checks["nothing recorded twice"] = v.duplicated == 0
    res.checks["end state equals the fault-free run"] = v.equal
    uris, stray = _objects(ctx, job_id)
    res.checks["every artifact is an object in S3 (nodes share no files)"] = bool(uris) and all(
        u.startswith("s3://") for u in uris)
    res.checks["no stray object under the job's prefix (no late write left bytes behind)"] = not stray
    res.notes += [f"stray object {o}" for o in stray]
    return res


def _objects(ctx: Context, job_id: str) -> tuple[list[str], list[str]]:
    """The job's recorded artifact URIs, and the objects under its prefix that no artifact row points to."""
    from shared.models import Artifact
    from shared.storage import Storage

    with session_scope(ctx.h.settings) as s:
        uris = list(s.execute(select(Artifact.uri).where(Artifact.job_id == job_id)).scalars())
    storage = Storage(ctx.h.settings.storage)
    if not ctx.h.settings.storage.startswith("s3://"):
        return uris, []
    prefix = f"{storage.bucket}/{storage.prefix}/jobs/{job_id}".replace("//", "/")
    found = {f"s3://{k}" for k in storage.fs.find(prefix)}
    return uris, sorted(found - set(uris))


def _per_node(completers: dict[int, str | None]) -> str:
    counts = Counter(r or "?" for r in completers.values())
    return " ".join(f"{r}={counts.get(r, 0)}" for r in (*sorted(k for k in counts if k != "?"),
                                                         *(["?"] if "?" in counts else [])))


# -- scenarios -----------------------------------------------------------------------------------------------------


def spread(ctx: Context) -> Result:
    """`submit invert --shards 16` on three nodes, no fault: the baseline, with the per-node shard counts."""
    res = Result("spread over 3 nodes", "none")
    t0 = time.monotonic()
    job_id = _submit(ctx)
    with ShardWatch(ctx.h, job_id) as watch:
        _wait(ctx, job_id)
    wall = time.monotonic() - t0
    done_by = watch.completers()
    secs = shard_seconds(ctx, job_id)
    ctx.baseline_shard_s = mean(secs) if secs else None
    res.figures["shards per node"] = _per_node(done_by)
    res.figures["job wall time"] = f"{wall:.1f} s"
    res.figures["mean seconds per shard"] = f"{ctx.baseline_shard_s:.2f} s" if secs else "n/a"
    res.checks["all three nodes ran shards"] = {r for r in done_by.values() if r} == set(ctx.h.roles)
    return _conclude(ctx, res, job_id)


def _task_id(owner: str) -> str:
    return owner.rsplit(":", 1)[-1]


def partition(ctx: Context, role: str = "w1") -> Result:
    """One node's link goes down mid-shard for longer than the lease, then comes back."""
    h = ctx.h
    cut_for = 3 * h.lease_seconds
    res = Result("partition", f"{role} link down {cut_for:.0f} s mid-shard (lease {h.lease_seconds:.0f} s)")
    node = h.nodes[role]
    job_id = _submit(ctx)
    with ShardWatch(h, job_id, poll=0.02) as watch:
        (index, *_) = cl.wait_for(lambda: watch.running_on(role), 120, 0.02, f"a shard on {role}")
        owner = watch.runs[index][-1][0]
        t_cut = time.monotonic()
        h.fabric.link(role, up=False)
        try:
            def taken_over() -> bool:
                state, o, _ = cl.shard_row(h.settings, job_id, index)
                return state == "done" or (o is not None and o != owner)
            cl.wait_for(taken_over, 120, 0.1, f"shard {index} taken over")
            t_taken = time.monotonic() - t_cut
            cl.wait_for(lambda: cl.shard_row(h.settings, job_id, index)[0] == "done", 120, 0.1,
                        f"shard {index} done elsewhere")
            t_done = time.monotonic() - t_cut
            time.sleep(max(0.0, cut_for - (time.monotonic() - t_cut)))
        finally:
            h.fabric.link(role, up=True)
        down = time.monotonic() - t_cut
        _wait(ctx, job_id)
        done_by = watch.completers()
    task = _task_id(owner)
    # the cut-off delivery ends once its connections come back: its completion must have been refused
    finished_re = re.compile(rf"Task invert\.shard\[{task}\] (succeeded|retry|raised)[^\n]*")
    line = cl.wait_for(lambda: finished_re.search(node.text()), 180, 0.5, f"{role}'s late end of shard {index}")
    late = line.group(0)
    res.faults = (f"{role} link down mid-shard for {down:.0f} s (lease {h.lease_seconds:.0f} s; up again once "
                  "another node finished the shard)")
    res.figures["partition length"] = f"{down:.1f} s"
    res.figures["time to take the shard over"] = f"{t_taken:.1f} s after the cut"
    res.figures["time to recover (shard done elsewhere)"] = f"{t_done:.1f} s after the cut"
    res.figures["shards per node"] = _per_node(done_by)
    res.notes.append(f"cut-off delivery of shard {index} ended: {late[:200]}")
    res.checks["the partition outlasted the lease"] = down > h.lease_seconds
    res.checks[f"another node finished shard {index}"] = done_by.get(index) not in (None, role)
    res.checks["the cut-off worker's late completion was refused"] = "skipped" in late or "retry" in late
    out = _conclude(ctx, res, job_id)
    # the same worker process, never restarted, takes work again: its consumer reconnected by itself
    follow = Plan(pairs=12, shards=6)
    job2 = _submit(ctx, follow)
    with ShardWatch(h, job2) as w2:
        _wait(ctx, job2)
    later = w2.completers()
    res.checks[f"{role}'s consumer recovered without a restart (same process ran shards after)"] = (
        node.alive() and role in later.values())
    res.figures["follow-up job shards per node"] = _per_node(later)
    return out


def node_loss(ctx: Context, role: str = "w2") -> Result:
    """Every process of one node's namespace killed at once, mid-shard; its shards re-run elsewhere."""
    h = ctx.h
    res = Result("whole-node loss", f"SIGKILL of every process in {role}'s namespace mid-shard")
    job_id = _submit(ctx)
    with ShardWatch(h, job_id, poll=0.02) as watch:
        (index, *_) = cl.wait_for(lambda: watch.running_on(role), 120, 0.02, f"a shard on {role}")
        t_kill = time.monotonic()
        killed = h.kill_node(role)
        cl.wait_for(lambda: cl.shard_row(h.settings, job_id, index)[0] == "done", 600, 0.1,
                    f"shard {index} done elsewhere")
        t_rec = time.monotonic() - t_kill
        _wait(ctx, job_id)
        done_by = watch.completers()
    res.faults += f" ({killed} processes)"
    res.figures["time to recover (lost shard done elsewhere)"] = f"{t_rec:.1f} s after the kill"
    res.figures["shards per node"] = _per_node(done_by)
    res.checks[f"shard {index} re-ran on another node"] = done_by.get(index) not in (None, role)
    res.checks[f"nothing left running in {role}'s namespace"] = not h.fabric.kill_host(role)
    out = _conclude(ctx, res, job_id)
    h.start_worker(role)  # a replacement node, for the scenarios after this one
    return out


def netem(ctx: Context, spec: str = "delay 50ms loss 2%") -> Result:
    """Latency and loss on every worker's link; the job completes, and the overhead per shard is measured."""
    h = ctx.h
    res = Result("latency and loss", f"tc netem {spec} on every worker link")
    why = h.fabric.netem_available()
    if why:
        res.skipped = why
        res.faults = f"none: {why}"
        return res
    for role in h.roles:
        h.fabric.set_netem(role, spec)
    try:
        t0 = time.monotonic()
        job_id = _submit(ctx)
        with ShardWatch(h, job_id) as watch:
            _wait(ctx, job_id)
        wall = time.monotonic() - t0
        done_by = watch.completers()
    finally:
        for role in h.roles:
            h.fabric.set_netem(role, None)
    secs = shard_seconds(ctx, job_id)
    per = mean(secs) if secs else float("nan")
    res.figures["job wall time"] = f"{wall:.1f} s"
    res.figures["mean seconds per shard"] = f"{per:.2f} s"
    if ctx.baseline_shard_s:
        res.figures["overhead per shard vs fault-free"] = f"{per - ctx.baseline_shard_s:+.2f} s"
    res.figures["shards per node"] = _per_node(done_by)
    return _conclude(ctx, res, job_id)
