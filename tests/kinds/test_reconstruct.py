"""reconstruct: DDIM-denoise an invert job's z_t back to z_0 and measure the round trip, per pair and in the mean.

The tiny SD model is random, so absolute PSNRs mean nothing here; what must hold for any model: the recorded
numbers equal an independent computation, a finer DDIM stride reconstructs z_0 more faithfully (DDIM inversion is
exact only as the stride goes to 0), and the job refuses an input that is not a succeeded invert job in one line.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from orchestrator import jobs, queries
from orchestrator.submit import submitter
from shared.errors import UserError
from tests.orchestrator.conftest import create_only, run_invert_inline
from tests.threads import torch_threads
from workers.runner import run_shard

submit_reconstruct = submitter("reconstruct")


def _reconstruct(s, inv: str, shards: int) -> dict:
    from kinds.reconstruct import reconstruct_work

    job_id = create_only(submit_reconstruct, s, argparse.Namespace(latents=inv, shards=shards, batch_size=4))
    with torch_threads(1):
        for i in range(shards):
            run_shard(s, job_id, i, reconstruct_work)
    job = jobs.get_job(s, job_id)
    assert job.state == "succeeded", job.error
    return {"id": job_id, "summary": queries.summary_metrics(s, job_id),
            "pairs": {r["item"]: r for r in queries.results(s, job_id) if r.get("item")}}


def test_reconstruct_records_per_pair_metrics_that_match_an_independent_round_trip(embedded, tiny_sd, m3fd_small):
    from safetensors import safe_open

    from shared.storage import Storage
    from workers.ml.image_metrics import psnr_ssim
    from workers.ml.inversion import InversionConfig, decode, denoise
    from workers.ml.m3fd import Pair, load_image_pair
    from workers.ml.sd import load_sd

    s = embedded
    inv = run_invert_inline(s, m3fd_small, tiny_sd, shards=2)
    out = _reconstruct(s, inv, shards=2)
    m, per_pair = out["summary"], out["pairs"]
    assert m["pairs"] == 20 and len(per_pair) == 20
    for name in ("psnr_rgb", "ssim_rgb", "psnr_ir", "ssim_ir", "vae_psnr_rgb", "latent_err_ir", "latent_rel_rgb"):
        assert math.isfinite(m[name]), name
        assert m[name] == pytest.approx(sum(p[name] for p in per_pair.values()) / 20, rel=1e-6)

    # one pair, recomputed here from the invert job's own files and spec
    row = queries.results(s, inv)[3]
    spec = jobs.get_job(s, inv).spec
    cfg = InversionConfig(**spec["inversion"])
    with safe_open(str(Storage(s.storage).resolve(row["artifact"])), framework="pt") as f:
        z0, zt = f.get_tensor("z_rgb_0")[row["position"]][None], f.get_tensor("z_rgb_t")[row["position"]][None]
    items = {r.pair_id: r for r in _items(s, inv)}
    it = items[row["pair_id"]]
    rgb, _ir, _ir01 = load_image_pair(Pair(row["pair_id"], Path(it.rgb_path), Path(it.ir_path)), cfg.size, cfg.resize_to)
    with torch_threads(1):
        parts = load_sd(str(tiny_sd))
        z0_rec = denoise(parts, zt, cfg.prompt_rgb, cfg)
        psnr, ssim = psnr_ssim(decode(parts, z0_rec), ((rgb[None] + 1) / 2).clamp(0, 1))
    mine = per_pair[row["pair_id"]]
    assert mine["psnr_rgb"] == pytest.approx(float(psnr[0]), abs=1e-3)
    assert mine["ssim_rgb"] == pytest.approx(float(ssim[0]), abs=1e-4)
    assert mine["latent_err_rgb"] == pytest.approx(float((z0_rec - z0).abs().mean()), rel=1e-4)
    # the report says what it measured and shows input beside reconstruction
    from orchestrator.report import describe, gather

    data = gather(s, out["id"])
    assert "DDIM-denoising z_t" in describe(data) and "the VAE alone" in describe(data)
    assert any((a["meta"] or {}).get("what", "").startswith("input RGB | reconstruction") for a in data.artifacts)


def _items(s, job_id):
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.models import Item

    with session_scope(s) as ses:
        rows = ses.execute(select(Item).where(Item.job_id == job_id)).scalars().all()
        for r in rows:
            ses.expunge(r)
        return rows


def test_a_finer_stride_reconstructs_z0_more_faithfully(embedded, tiny_sd, m3fd_small):
    s = embedded
    coarse = _reconstruct(s, run_invert_inline(s, m3fd_small, tiny_sd, shards=1, t=400, steps=5), 1)["summary"]
    fine = _reconstruct(s, run_invert_inline(s, m3fd_small, tiny_sd, shards=1, t=400, steps=50), 1)["summary"]
    for side in ("rgb", "ir"):
        assert fine[f"latent_err_{side}"] < coarse[f"latent_err_{side}"], (side, fine, coarse)


def test_reconstruct_refuses_what_is_not_a_succeeded_invert_job(embedded, tiny_sd, m3fd_small):
    from tests.orchestrator.conftest import invert_args

    s = embedded
    queued = create_only(submitter("invert"), s, invert_args(m3fd_small, tiny_sd, shards=1))
    with pytest.raises(UserError, match=f"--latents {queued} is queued: wait for it to succeed"):
        submit_reconstruct(s, argparse.Namespace(latents=queued, shards=1, batch_size=4))
    bench = jobs.create_job(s, "bench", {}, 1)
    with pytest.raises(UserError, match=f"--latents {bench} is a bench job: give the id of a invert job"):
        submit_reconstruct(s, argparse.Namespace(latents=bench, shards=1, batch_size=4))
    with pytest.raises(UserError, match="reconstruct needs --latents"):
        submit_reconstruct(s, argparse.Namespace(shards=1, batch_size=4))
    assert queries.list_jobs(s, kind="reconstruct") == []  # nothing was created by a refused submission
