"""`train.run`: one DDP training run (translator, NCSN or classifier) as a long-running, lease-guarded task.

The job has one shard; its lease is the run's lease. The task builds the run's config from the DB (data rows,
latest recorded checkpoint), starts torchrun under `workers.supervisor`, records progress, metrics and checkpoints as
they appear, forwards cancel as SIGTERM, and resumes from the latest recorded checkpoint when delivered again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

import kinds
from shared import constants as C
from shared.settings import Settings
from shared.storage import Storage, sha256_file
from shared.store import Store, store
from workers import bookkeeping as bk
from workers.recording import record_artifact, record_metrics
from workers.runner import ShardContext, ShardOutput
from workers.supervisor import rank_threads_env, supervise, torchrun_command
from workers.train.fencing import FENCE_DATABASE_ENV

log = logging.getLogger(__name__)


#: Spec keys copied into the torchrun config unchanged.
PASSTHROUGH = ("epochs", "lr", "batch_size", "weight_decay", "seed", "amp", "checkpoint_every", "max_steps",
               "log_every", "preset", "model", "data", "fault", "grad_clip", "amp_dtype", "base_channels",
               "max_train_samples", "max_test_samples", "sigma_kind", "num_levels")


class TrainingFailed(RuntimeError):
    pass


class LeaseUnconfirmed(TimeoutError):
    """Rank 0 stopped the run because it could not confirm the lease, which this attempt still holds: transient."""


def resume_checkpoint(settings: Settings, storage: Storage, job_id: str) -> str | None:
    """The file of the latest recorded checkpoint whose bytes still match the hash recorded with it.

    Only a lease holder records checkpoint rows (`record_checkpoint`), each attempt writes into its own folder, so
    a mismatch means the file was damaged after it was recorded; the next older intact one is used instead.
    """
    for step, uri, sha in store(settings).checkpoints_newest_first(job_id):
        path = storage.resolve(uri)
        try:
            if sha256_file(path) == sha:
                return str(path)
        except OSError:
            pass
        log.warning("training run %s: checkpoint of step %s (%s) is missing or changed; trying an older one",
                    job_id, step, path)
    return None


def hold_lease(settings: Settings, shard_id: int, owner: str) -> None:
    """Renew the shard's lease, or raise LeaseLost if `owner` no longer holds it (shared/store_leases.py)."""
    if not store(settings).run(Store.hold_lease, shard_id, owner, settings.lease_seconds):
        raise bk.LeaseLost(f"lease on shard {shard_id} was taken over: nothing of {owner} is recorded")


def translator_data(settings: Settings, storage: Storage, invert_job: str, split: str = "train") -> dict[str, Any]:
    """The rows of one split of an invert job: {"files": [shard file paths], "rows": [[file_idx, position], ...]}."""
    files: list[str] = []
    index: dict[str, int] = {}
    out_rows = []
    for pos, uri in store(settings).split_rows(invert_job, split):
        if uri not in index:
            index[uri] = len(files)
            files.append(str(storage.resolve(uri)))
        out_rows.append([index[uri], pos])
    return {"files": files, "rows": out_rows}


def build_config(ctx: ShardContext, run_dir: Path, attempt_events: Path) -> dict[str, Any]:
    spec = ctx.spec
    cfg: dict[str, Any] = {k: spec[k] for k in PASSTHROUGH if k in spec}
    cfg.update({"run_dir": str(run_dir), "events": str(attempt_events), "device": spec.get("device", "auto"),
                # rank 0 stops the run itself once this attempt no longer holds the lease (workers/train/fencing.py)
                "fence": {"shard_id": ctx.heartbeat.shard_id, "owner": ctx.owner, "attempt": ctx.attempt,
                          "lease_seconds": ctx.settings.lease_seconds}})
    if ctx.kind == "train-translator":
        cfg["data"] = translator_data(ctx.settings, ctx.storage, spec["latents"])
        val = translator_data(ctx.settings, ctx.storage, spec["latents"], "test")  # per-epoch held-out loss
        if val["rows"]:
            cfg["val_data"] = val
    cfg["resume_from"] = resume_checkpoint(ctx.settings, ctx.storage, ctx.job_id)
    return cfg


def record_checkpoint(settings: Settings, storage: Storage, job_id: str, owner: str, ev: dict[str, Any],
                      shard_id: int | None = None) -> None:
    stored = storage.adopt(ev["path"])
    if ev.get("sha256") and ev["sha256"] != stored.sha256:
        raise TrainingFailed(f"checkpoint {ev['path']} changed after it was written (sha256 mismatch)")
    # with a shard, only while `owner` holds its lease: the rows are written by the lease holder or not at all
    fence = None if shard_id is None else (shard_id, owner, settings.lease_seconds)
    if not store(settings).record_checkpoint(job_id, stored, int(ev["step"]), int(ev["epoch"]),
                                             ev.get("reason", "interval"),
                                             {"step": ev["step"], "epoch": ev["epoch"], "reason": ev.get("reason")},
                                             fence):
        raise bk.LeaseLost(f"lease on shard {shard_id} was taken over: nothing of {owner} is recorded")


def train_work(ctx: ShardContext) -> ShardOutput:
    # locally the run folder lies in the storage root; with object storage it is a local scratch folder whose
    # checkpoints `adopt` uploads as they are reported (and `resolve` downloads the one a resume starts from)
    run_dir = ctx.storage.scratch(f"jobs/{ctx.job_id}/run")
    run_dir.mkdir(parents=True, exist_ok=True)
    events = run_dir / f"events-attempt{ctx.attempt:03d}.jsonl"
    # each attempt's checkpoints in a folder of their own: a stale attempt cannot overwrite a file a newer one wrote
    cfg = build_config(ctx, run_dir / f"attempt-{ctx.attempt:03d}", events)
    config_path = run_dir / f"config-attempt{ctx.attempt:03d}.json"
    config_path.write_text(json.dumps(cfg, indent=2))
    nproc = int(ctx.spec.get("gpus", 1))
    available = os.environ.get("ORCH_TRAIN_GPUS")
    if available:
        nproc = min(nproc, int(available))
    cmd = torchrun_command(kinds.get(ctx.kind).entry_point, config_path, nproc)
    summary: dict[str, Any] = {}
    last: dict[str, Any] = {}
    db = store(ctx.settings)

    def on_event(ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "progress":
            last.update(ev)
            ctx.progress(int(ev["step"]), int(ev.get("total_steps") or 0), epoch=ev.get("epoch"),
                         loss=ev.get("loss"), samples_per_s=ev.get("samples_per_s"))
            db.run(record_metrics, ctx.job_id, [("loss", ev["loss"], int(ev["step"]), C.NO_ITEM)], 0)
        elif kind == "metric":
            db.run(record_metrics, ctx.job_id, [(ev["name"], ev["value"], int(ev["step"]), C.NO_ITEM)], 0)
        elif kind == "checkpoint":
            record_checkpoint(ctx.settings, ctx.storage, ctx.job_id, ctx.owner, ev, ctx.heartbeat.shard_id)
        elif kind == "artifact":
            stored = ctx.storage.adopt(ev["path"])
            db.run(record_artifact, ctx.job_id, 0, str(ev.get("kind", "file")), stored,
                   {k: v for k, v in ev.items() if k not in ("event", "path", "sha256", "bytes")})
        elif kind == "stopped":
            last["stopped"] = ev.get("reason")
        elif kind == "done":
            summary.update(ev.get("metrics") or {})
        elif kind == "start":
            ctx.progress(int(ev.get("step", 0)), int(ev.get("total_steps") or 0), epoch=ev.get("epoch"),
                         resumed_from=ev.get("resumed_from"), world_size=ev.get("world_size"))

    hb = ctx.heartbeat
    outcome = supervise(cmd, events, run_dir / "torchrun.log", on_event,
                        should_stop=hb.should_stop,
                        env={**rank_threads_env(os.environ), FENCE_DATABASE_ENV: ctx.settings.database_url})
    if hb.lost.is_set():
        raise bk.LeaseLost(f"training run {ctx.job_id} lost its lease")
    if last.get("stopped") == "fenced":
        hold_lease(ctx.settings, ctx.heartbeat.shard_id, ctx.owner)  # LeaseLost: a newer attempt runs it
        # still ours (the database was out of reach for a while): give the lease up and run it again
        raise LeaseUnconfirmed(f"training run {ctx.job_id} stopped: rank 0 could not confirm its lease")
    finished = outcome.done is not None and outcome.returncode == 0
    if outcome.stopped or (hb.cancelled.is_set() and not finished):
        # a cancel that arrives after the run finished does not throw the finished run away
        raise bk.Cancelled(ctx.job_id)
    if outcome.returncode != 0 or outcome.done is None:
        lines = [ln for ln in outcome.log_tail.splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
        raise TrainingFailed(f"torchrun exited with {outcome.returncode}: {err.strip()}\n{outcome.log_tail[-2000:]}")

    def record(s: Session) -> None:
        values = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
        values["steps"] = float(outcome.done.get("step", 0))
        values["world_size"] = float(nproc)
        cid = Store.final_checkpoint_id(s, ctx.job_id)
        if cid is not None:
            values["final_checkpoint_id"] = float(cid)
        record_metrics(s, ctx.job_id, values)

    return ShardOutput(record, {"steps": outcome.done.get("step"), "world_size": nproc,
                                "loss": last.get("loss"), "attempt": ctx.attempt})
