"""NCSN jobs on the GPU queue: `sample.shard` (annealed Langevin sampling) and `eval_fid.run` (FID/IS)."""

from __future__ import annotations

import io
import os
import time
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from shared import constants as C
from shared.errors import UserError
from shared.models import Job
from shared.store import Store, store
from workers import bookkeeping as bk
from workers.device import cached, pick_device
from workers.recording import record_artifact, record_metrics
from workers.runner import ShardContext, ShardOutput

#: Digits in the PNG grid each sampling shard writes.
GRID_SAMPLES = 64


def shard_sizes(n: int, shards: int) -> list[int]:
    return [(i + 1) * n // shards - i * n // shards for i in range(shards)]


def shard_seed(seed: int, index: int) -> int:
    """Each shard's own recorded seed: a re-run of shard i draws exactly the same samples."""
    return seed * 1_000_003 + index


def digits_grid_png(u8: np.ndarray, ncols: int = 8) -> bytes:
    """(N, 28, 28) uint8 -> PNG bytes of a grid."""
    import cv2

    n = len(u8)
    nrows = max(1, -(-n // ncols))
    h, w = u8.shape[1:3]
    grid = np.zeros((nrows * (h + 2) + 2, ncols * (w + 2) + 2), np.uint8)
    for k, img in enumerate(u8):
        r, c = divmod(k, ncols)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = img
    ok, buf = cv2.imencode(".png", grid)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _npy_bytes(a: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.save(bio, a, allow_pickle=False)
    return bio.getvalue()


def sample_work(ctx: ShardContext) -> ShardOutput:
    import torch

    from workers.ml.fid import images_to_uint8
    from workers.ml.score import anneal_langevin, init_noise, init_prior
    from workers.train.ncsn import load_score_model

    spec = ctx.spec
    n = shard_sizes(int(spec["n"]), ctx.spec["shards"])[ctx.index]
    seed = shard_seed(int(spec.get("seed", 0)), ctx.index)
    device = pick_device(spec.get("device", "auto"))
    path = str(ctx.storage.resolve(spec["checkpoint_uri"]))
    (model, sigmas, cfg), hit = cached(("ncsn", path, device), lambda: load_score_model(path, device))
    sigmas = sigmas.to(device)
    steps_each = int(spec.get("n_steps_each") or cfg["n_steps_each"])
    clamp = tuple(cfg["clamp"]) if cfg.get("clamp") is not None else None
    gen = torch.Generator(device=device).manual_seed(seed)
    bs = int(spec.get("batch_size", 1000))
    out = []
    # progress counts Langevin steps (score network calls), so it moves inside a batch; each step also checks
    # for a cancel (at most one DB read a second)
    per_batch = len(sigmas) * steps_each
    steps_total = per_batch * -(-n // bs)
    t0 = time.perf_counter()
    for batch_no, start in enumerate(range(0, n, bs)):
        ctx.check()
        b = min(bs, n - start)

        def on_step(k: int, _steps: int, batch_no: int = batch_no, start: int = start) -> None:
            ctx.step(batch_no * per_batch + k, steps_total, unit="langevin_steps", samples_done=start, samples=n)

        if cfg.get("init") == "prior" and cfg.get("data_mean") is not None:
            x = init_prior(b, cfg["data_mean"], float(sigmas[0]), generator=gen, device=device)
        else:
            x = init_noise((b, 1, 28, 28), cfg["rule"], generator=gen, device=device)
        x = anneal_langevin(lambda x, s: model(x, s), x, sigmas, n_steps_each=steps_each,
                            step_lr=float(cfg["step_lr"]), rule=cfg["rule"],
                            final_denoise=bool(cfg["final_denoise"]), clamp=clamp, generator=gen, on_step=on_step)
        out.append(images_to_uint8(x.cpu(), cfg["data_scale"]))
        done = start + b
        ctx.progress((batch_no + 1) * per_batch, steps_total, unit="langevin_steps", samples_done=done, samples=n,
                     samples_per_s=round(done / max(time.perf_counter() - t0, 1e-9), 3))
    seconds = time.perf_counter() - t0
    u8 = np.concatenate(out)  # (n, 28, 28) uint8
    base = f"jobs/{ctx.job_id}/samples/shard-{ctx.index:05d}"
    samples = ctx.storage.write_bytes(base + ".npy", _npy_bytes(u8))
    grid = ctx.storage.write_bytes(base + ".png", digits_grid_png(u8[:GRID_SAMPLES]))

    def record(s: Session) -> None:
        record_artifact(s, ctx.job_id, ctx.index, C.ARTIFACT_SAMPLES, samples,
                        {"n": int(n), "seed": seed, "shape": list(u8.shape), "dtype": "uint8"})
        record_artifact(s, ctx.job_id, ctx.index, C.ARTIFACT_IMAGE, grid, {"what": "sample grid"})

    return ShardOutput(record, {"n": int(n), "seed": seed, "seconds": round(seconds, 3),
                                "samples_per_s": round(n / max(seconds, 1e-9), 3), "steps_each": steps_each,
                                "pid": os.getpid(), "device": device, "model_cache_hit": hit})


def finalize_sample(s: Session, job: Job) -> None:
    results = Store.shard_results(s, job.id)  # one per shard
    n = len(results)
    total = sum(int((r or {}).get("n", 0)) for r in results)
    busy = sum(float((r or {}).get("seconds", 0.0)) for r in results)
    wall = (bk.utcnow() - bk.aware(job.started_at or job.created_at)).total_seconds()
    record_metrics(s, job.id, {"samples": total, "shards": n, "shard_seconds_total": round(busy, 4),
                               "samples_per_second": round(total / max(wall, 1e-9), 4)})


def load_sample_arrays(s: Session, storage, sample_job: str) -> np.ndarray:
    """The digits a sample job drew, in shard order, read in the caller's session."""
    uris = Store.sample_uris(s, sample_job)
    if not uris:
        raise UserError(f"sample job {sample_job} has no samples recorded")
    return np.concatenate([np.load(storage.resolve(u), allow_pickle=False) for u in uris])


def load_classifier_checkpoint(path: str, device: str):
    """An MNIST classifier from a training checkpoint (harness format) or a `save_classifier` file."""
    from workers.ml.classifier import MnistClassifier, load_classifier
    from workers.ml.weights import load_weights

    ckpt = load_weights(path, "classifier checkpoint")  # weights only: a checkpoint in storage must not run code
    if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt:
        model = MnistClassifier()
        model.load_state_dict(ckpt["model"])
        return model.to(device).eval()
    return load_classifier(path, device)[0]


def eval_fid_work(ctx: ShardContext) -> ShardOutput:
    from workers.ml.fid import compute_fid_is
    from workers.ml.mnist import load_mnist

    spec = ctx.spec
    device = pick_device(spec.get("device", "auto"))
    fake = store(ctx.settings).run(load_sample_arrays, ctx.storage, spec["samples"])
    real, _ = load_mnist(spec["reference"], spec.get("reference_split", "test"))
    if spec.get("n_real"):
        real = real[: int(spec["n_real"])]
    classifier = None
    if spec["features"] == "mnist-classifier":
        path = str(ctx.storage.resolve(spec["classifier_uri"]))
        classifier, _ = cached(("classifier", path, device), lambda: load_classifier_checkpoint(path, device))
    ctx.progress(0, 1, stage="features")
    t0 = time.perf_counter()
    res = compute_fid_is(real, fake, features=spec["features"], inception_weights=spec.get("inception_weights"),
                         classifier=classifier, is_splits=int(spec.get("is_splits", 10)), seed=int(spec.get("seed", 0)),
                         device=device)
    seconds = time.perf_counter() - t0
    values: dict[str, Any] = {k: float(res[k]) for k in ("fid", "is_mean", "is_std", "n_real", "n_fake")}

    def record(s: Session) -> None:
        record_metrics(s, ctx.job_id, values)

    return ShardOutput(record, {**values, "feature_extractor": res["feature_extractor"], "seconds": round(seconds, 3)})


