"""train-ncsn (DDP, 2 gloo ranks) -> sample (sharded, real workers, both backends) -> eval-fid (classifier features)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from orchestrator import jobs, queries
from orchestrator import submit as submit_mod
from orchestrator.demo import local_workers
from shared.storage import Storage
from tests.orchestrator.conftest import create_only
from workers.runner import run_shard

pytestmark = pytest.mark.slow




def ncsn_args(**kw):
    base = dict(data="mnist:embedded", preset="ncsn", epochs=1, batch_size=32, lr=1e-3, gpus=2, base_channels=8,
                max_train_samples=256, steps_each=2, amp=False, checkpoint_every=0, max_steps=None, log_every=2,
                seed=0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_ncsn_train_sample_eval(backend, tmp_path):
    from workers.tasks.ncsn import eval_fid_work
    from workers.tasks.train import train_work

    s = backend
    train_id = create_only(submit_mod.submitter("train-ncsn"), s, ncsn_args())
    run_shard(s, train_id, 0, train_work)
    assert jobs.get_job(s, train_id).state == "succeeded"
    ckpt = int(queries.summary_metrics(s, train_id)["final_checkpoint_id"])
    assert queries.metric_history(s, train_id, "loss_seed_units_epoch")  # both normalisations are logged

    cargs = argparse.Namespace(data="mnist:embedded", epochs=1, batch_size=64, lr=2e-3, gpus=1,
                               max_train_samples=1000, log_every=5, seed=0)
    clf_id = create_only(submit_mod.submitter("train-classifier"), s, cargs)
    run_shard(s, clf_id, 0, train_work)
    assert queries.summary_metrics(s, clf_id)["test_accuracy"] > 0.5
    clf_ckpt = int(queries.summary_metrics(s, clf_id)["final_checkpoint_id"])

    sargs = argparse.Namespace(checkpoint=ckpt, n=40, shards=4, batch_size=16, steps_each=2, seed=7)
    with local_workers(s, 2, "gpu,cpu", tmp_path / "logs"):
        sample_id = submit_mod.submitter("sample")(s, sargs)
        job = jobs.wait(s, sample_id, timeout=300)
    assert job.state == "succeeded", job.error
    rows = queries.results(s, sample_id)
    samples = [r for r in rows if r["kind"] == "samples"]
    assert len(samples) == 4 and len([r for r in rows if r["kind"] == "image"]) == 4
    arrays = [np.load(Storage(s.storage).resolve(r["artifact"])) for r in samples]
    assert sum(len(a) for a in arrays) == 40 and all(a.dtype == np.uint8 and a.shape[1:] == (28, 28) for a in arrays)
    assert queries.summary_metrics(s, sample_id)["samples"] == 40

    fargs = argparse.Namespace(samples=sample_id, reference="mnist:embedded", reference_split="test", n_real=200,
                               features="mnist-classifier", inception_weights=None, classifier=clf_ckpt,
                               is_splits=2, seed=0)
    fid_id = create_only(submit_mod.submitter("eval-fid"), s, fargs)
    run_shard(s, fid_id, 0, eval_fid_work)
    m = queries.summary_metrics(s, fid_id)
    assert m["n_fake"] == 40 and m["n_real"] == 200 and m["fid"] > 0 and m["is_mean"] >= 1.0
    assert m["feature_extractor"].startswith("mnist-classifier")
