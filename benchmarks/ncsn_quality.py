"""NCSN quality on CPU for a fixed budget: classifier-FID and IS of generated digits vs the held-out digits.

    python -m benchmarks.ncsn_quality                 # ~10 min on 2 CPU cores
    python -m benchmarks.ncsn_quality --quick         # seconds: checks the code path only

Trains a score network on `mnist:embedded` (the 4,000 train digits) for --steps optimizer steps (single process,
the same entry point the `train.run` task launches under torchrun), trains the MNIST classifier used as the feature
extractor, samples --n digits with annealed Langevin dynamics, and prints FID/IS against the 1,000 held-out digits
next to two references: uniform noise (the floor) and held-out real digits vs train digits (the ceiling).
These are classifier-feature FIDs: they are NOT comparable to Inception FIDs (such as the seed's 103.49).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=800, help="NCSN optimizer steps (batch 128)")
    p.add_argument("--n", type=int, default=1000, help="digits to sample")
    p.add_argument("--steps-each", type=int, default=30, help="Langevin steps per noise level")
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.n, args.steps_each, args.base_channels = 4, 20, 2, 8
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from workers.ml.classifier import train_classifier
    from workers.ml.fid import compute_fid_is, images_to_uint8
    from workers.ml.mnist import EMBEDDED, load_mnist
    from workers.ml.score import anneal_langevin, init_noise
    from workers.train.ncsn import load_score_model

    run = Path(tempfile.mkdtemp(prefix="ncsn-bench-"))
    cfg = {"run_dir": str(run), "events": str(run / "events.jsonl"), "data": EMBEDDED, "preset": "ncsn",
           "epochs": 1000, "max_steps": args.steps, "batch_size": 128, "lr": 1e-3, "base_channels": args.base_channels,
           "log_every": max(1, args.steps // 10), "checkpoint_every": 0, "device": "cpu"}
    (run / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "workers.train.ncsn", "--config", str(run / "config.json")], check=True,
                   stdout=subprocess.DEVNULL)
    train_s = time.perf_counter() - t0
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    ckpt = [e for e in events if e["event"] == "checkpoint"][-1]["path"]
    losses = [e["loss"] for e in events if e["event"] == "progress"]

    model, sigmas, mcfg = load_score_model(ckpt, "cpu")
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    x = init_noise((args.n, 1, 28, 28), mcfg["rule"], generator=gen)
    x = anneal_langevin(lambda a, s: model(a, s), x, sigmas, n_steps_each=args.steps_each,
                        step_lr=float(mcfg["step_lr"]) * 100 / args.steps_each, rule=mcfg["rule"],
                        final_denoise=True, clamp=(0.0, 1.0), generator=gen)
    sample_s = time.perf_counter() - t0
    fake = images_to_uint8(x, mcfg["data_scale"])

    train_x, train_y = load_mnist(EMBEDDED, "train")
    test_x, _ = load_mnist(EMBEDDED, "test")
    clf, _ = train_classifier(train_x, train_y, epochs=1 if args.quick else 6, batch_size=64, lr=2e-3, seed=0)
    noise = np.random.default_rng(0).integers(0, 256, size=(args.n, 28, 28), dtype=np.uint8)
    splits = 2 if args.quick else 10
    rows = []
    for name, imgs in (("NCSN samples", fake), ("uniform noise (floor)", noise),
                       ("train digits (ceiling)", train_x[: args.n])):
        r = compute_fid_is(test_x, imgs, features="mnist-classifier", classifier=clf, is_splits=splits, seed=0)
        rows.append((name, r["fid"], r["is_mean"], r["is_std"]))
    print(f"NCSN on mnist:embedded, CPU: {args.steps} steps (batch 128, base {args.base_channels}) in {train_s:.0f} s,"
          f" loss {losses[0]:.1f} -> {losses[-1]:.1f}; {args.n} samples, {args.steps_each} Langevin steps x "
          f"{len(sigmas)} levels in {sample_s:.0f} s ({args.n / sample_s:.1f} samples/s)")
    print(f"features: {r['feature_extractor']}; reference: the 1,000 held-out digits")
    print(f"{'':<24} {'FID':>9} {'IS':>14}")
    for name, fid, ism, iss in rows:
        print(f"{name:<24} {fid:>9.2f} {ism:>8.2f} ± {iss:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
