"""What a training run of the fault cases left behind: each attempt's logged events, and a fingerprint of what was
recorded. Shared by the cases that kill (tests/faults/test_kill.py) or freeze (tests/faults/test_freeze.py) the node
running one."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from sqlalchemy import select

from shared.db import session_scope
from shared.models import Job, Shard
from shared.settings import Settings


def train_translator_args(latents: str, epochs: int, checkpoint_every: int) -> argparse.Namespace:
    """The small 2-rank train-translator job both training fault cases submit."""
    return argparse.Namespace(latents=latents, preset="readme", epochs=epochs, lr=1e-3, weight_decay=None,
                              batch_size=2, gpus=2, base_channels=8, depth=2, amp=False,
                              checkpoint_every=checkpoint_every, max_steps=None, log_every=1, seed=0)


def events(run_dir: Path) -> dict[str, list[dict]]:
    """The events each attempt of a training run logged, by file name, in attempt order."""
    return {f.name: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for f in sorted(run_dir.glob("events-attempt*.jsonl"))}


def fingerprint_training(settings: Settings, job_id: str) -> dict:
    """Attempts, final step, intact checkpoint files, and rows recorded more than once (artifacts per URI, rows
    per checkpoint step, the job's done counter)."""
    from shared.models import Artifact, Checkpoint
    from shared.storage import Storage, sha256_file

    storage = Storage(settings.storage)
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        attempts = s.execute(select(Shard.attempts).where(Shard.job_id == job_id)).scalar_one()
        arts = s.execute(select(Artifact.uri, Artifact.sha256).join(Checkpoint, Checkpoint.artifact_id == Artifact.id)
                         .where(Checkpoint.job_id == job_id)).all()
        per_step = Counter(s.execute(select(Checkpoint.step).where(Checkpoint.job_id == job_id)).scalars())
        shards_done = job.shards_done
    from orchestrator import queries

    # after the session: a second transaction inside it would wait on this one's SQLite lock
    steps = int(queries.summary_metrics(settings, job_id).get("steps", -1))
    integrity = [uri for uri, sha in arts if not storage.resolve(uri).is_file()
                 or sha256_file(storage.resolve(uri)) != sha]
    duplicated = sum(n - 1 for n in per_step.values()) + max(0, shards_done - 1)
    return {"attempts": attempts, "steps": steps, "integrity": integrity, "duplicated": duplicated}
