"""The translator's held-out loss through the job path: invert (in process) -> train-translator (torchrun, 1 rank).

`train.run` hands the invert job's test rows to the entry point as "val_data" (workers/tasks/train.py), which logs
"val_loss_epoch" at every epoch end and "val_loss_identity" once (workers/train/translator.py); the worker records
them as job metrics. On synthetic M3FD pairs (the IR image is a fixed function of the scene) a few epochs take the
held-out latent MSE down and below the identity map's. benchmarks/translator_quality.py is the full-size version.
"""

from __future__ import annotations

import argparse

import pytest

from orchestrator import jobs, queries
from orchestrator import submit as submit_mod
from tests.orchestrator.conftest import create_only, run_invert_inline
from workers.runner import run_shard

pytestmark = pytest.mark.slow


def test_held_out_loss_falls_over_epochs(embedded, tiny_sd, m3fd_small):
    from workers.tasks.train import train_work

    s = embedded
    inv = run_invert_inline(s, m3fd_small, tiny_sd, shards=2)  # 20 pairs: 16 train, 4 test
    targs = argparse.Namespace(latents=inv, preset="readme", epochs=5, lr=3e-3, weight_decay=0.0, batch_size=4,
                               gpus=1, base_channels=8, depth=2, amp=False, checkpoint_every=0, max_steps=None,
                               log_every=50, seed=0)
    train_id = create_only(submit_mod.submitter("train-translator"), s, targs)
    out = run_shard(s, train_id, 0, train_work)
    assert jobs.get_job(s, train_id).state == "succeeded", out
    val = [v for _, v in queries.metric_history(s, train_id, "val_loss_epoch")]
    train = [v for _, v in queries.metric_history(s, train_id, "loss_epoch")]
    assert len(val) == len(train) == 5
    summary = queries.summary_metrics(s, train_id)
    identity = summary["val_loss_identity"]
    assert summary["val_loss_epoch"] == pytest.approx(val[-1])
    assert val[-1] < 0.75 * val[0], val
    assert min(val) < identity, (val, identity)  # better than copying the RGB latent on pairs it never saw
