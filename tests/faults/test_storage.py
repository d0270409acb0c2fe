"""Artifact storage full, then not writable: a clear failure, nothing half-written recorded, and a retry completes
the job once storage is back. (Storage does not depend on the broker or database: the embedded default.)"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from shared.status import JobState
from tests.faults import cluster as cl
from tests.faults.bench import Bench, Outcome, Skip, cli, conclude, fault_case, shards_in, submit, wait_job
from tests.faults.conftest import assert_kept, run_case
from tests.faults.infra import Tmpfs
from tests.faults.state import SMALL, fingerprint

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@fault_case("storage", backends=("embedded",))
def storage_faults(bench: Bench) -> list[Outcome]:
    """Artifact storage on a tiny tmpfs: first full (room for about one artifact), then read-only. Each time the job
    fails with a one-line error naming the path and the cause, nothing half-written is recorded or left behind;
    after the space is freed / the mount made writable, `orchestrator retry JOB --failed` completes the job."""
    reason = Tmpfs.available(bench.work)
    if reason:
        raise Skip(reason)
    s0 = bench.fresh("storage")
    art_bytes = max(bench.refs.get(SMALL).artifact_bytes)
    fs = Tmpfs(bench.work / "storage-mount")
    outcomes = []
    try:
        fs.mount(size=_pages(art_bytes) + 4096)  # one artifact fits, the next does not
        s = replace(s0, storage=str(fs.path))
        with bench.cluster(s, "storage") as cluster:
            cluster.start(2)
            for case, break_it, fix_it in (
                ("storage full", lambda: None, lambda: fs.remount(size=64 << 20)),
                ("storage not writable", lambda: fs.remount(ro=True), lambda: fs.remount(ro=False)),
            ):
                t0 = time.monotonic()
                break_it()
                job_id = submit(s, bench, SMALL)
                job = wait_job(s, job_id)
                cl.wait_for(lambda job_id=job_id: shards_in(s, job_id, "queued", "running", "pending") == 0, 120,
                            0.2, "every shard settled")
                failed_fp = fingerprint(s, job_id)
                error = job.error or ""
                checks = {
                    "the job failed": job.state == JobState.FAILED,
                    "its error is one line": error.strip() != "" and "\n" not in error.strip(),
                    "the error names the storage path": str(fs.path) in error,
                    "the error names the cause": any(w in error for w in ("No space", "Read-only", "not writable")),
                    "no half-written file left": not failed_fp.stray,
                    "every recorded artifact is complete": not failed_fp.integrity,
                    "an artifact row only for done shards": all(
                        failed_fp.shard_states[i] == "done" for i in failed_fp.artifacts),
                }
                fix_it()
                retry = cli(s, "retry", job_id, "--failed")
                checks["`orchestrator retry --failed` succeeded"] = retry.returncode == 0
                wait_job(s, job_id)
                notes = [f"error: {error[:300]!r}", f"retry: {retry.stdout.strip()} {retry.stderr.strip()[-300:]}",
                         f"before retry: {failed_fp.shard_states}"]
                outcomes.append(conclude(bench, s, case, SMALL, job_id, 1, t0, checks, notes))
    finally:
        fs.umount()
    return outcomes


def _pages(n: int) -> int:
    return (n + 4095) // 4096 * 4096


@pytest.fixture(scope="module")
def storage_outcomes(embedded_bench):
    return {o.case: o for o in run_case(storage_faults, embedded_bench)}


def test_storage_full_fails_clearly_and_resumes(storage_outcomes):
    assert_kept(storage_outcomes["storage full"])


def test_storage_not_writable_fails_clearly_and_resumes(storage_outcomes):
    assert_kept(storage_outcomes["storage not writable"])
