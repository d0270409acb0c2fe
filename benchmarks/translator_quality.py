"""Translator quality on CPU through the job path: a trained translator against the identity baseline.

    python -m benchmarks.translator_quality           # 128 synthetic pairs at 64 px, 8 epochs: 2-3 min on 2 CPUs
    python -m benchmarks.translator_quality --quick   # 20 pairs, 6 epochs of a smaller net: checks the code path

On a throw-away embedded backend with two local worker processes it writes the tiny Stable Diffusion model
(``workers.ml.sd.write_tiny_sd``) and synthetic M3FD pairs (``workers.ml.m3fd.write_synthetic``: the IR image is
a fixed function of the scene), then submits, like a user would, ``invert`` (train/test split as
``orchestrator.submit.submitter("invert")`` draws it: split seed 42, test fraction 0.2), ``train-translator`` and
``eval-translator`` on the final checkpoint. The table compares the translator with the identity baseline (the
RGB latent taken as the prediction, workers/ml/translator_eval.py) under both protocols, gives the margins
(translator minus baseline, PSNR dB and SSIM), and the per-epoch training loss and held-out latent MSE
("val_loss_epoch", workers/train/translator.py) against the identity map's held-out MSE. Reference rows against
the real IR: the target latent z_ir_t itself through the same denoise + decode (the honest protocol's ceiling),
the VAE alone, and a constant grey image; and the SSIMs once more under the valid-window convention
(benchmarks/ssim_border.py). The budget (8 epochs) is set by the held-out loss: on 102 training pairs it is
lowest near epoch 5 and barely higher at 8, which gave the larger pixel margins of the two; longer runs overfit
(150 epochs on 51 pairs: held-out MSE 0.22 at epoch 5, 0.30 at the end, margins about halved). One JSON
record per protocol is appended to benchmarks/results/translator_quality.json (to --json FILE instead if given;
nowhere with --quick).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import append_records, backend, machine

RESULTS = Path(__file__).parent / "results" / "translator_quality.json"
PROTOCOLS = {"honest": "", "seed": "_seed_protocol"}  # metric-name suffixes (workers/ml/translator_eval.py)


def _commit() -> str:
    """The short commit hash, with "-dirty" when tracked files differ from it (the figures are of the working tree)."""
    try:
        def git(*a: str) -> str:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent,
                                  check=True).stdout.strip()

        return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def recompute(settings, eval_job) -> dict[str, float]:
    """The eval job's images recomputed in this process: SSIM under both conventions, and the reference rows.

    Same prediction, ground-truth round trip and baseline images as ``workers.ml.translator_eval.evaluate_batch``
    (predict, DDIM-denoise with the IR prompt, decode). ``<metric>_tm`` is torchmetrics' whole-map SSIM mean (what
    the job reports, so it must equal the job's figure), ``<metric>_valid`` the valid-window mean
    (benchmarks/ssim_border.py). Reference rows against the real IR: ``*_ceiling`` is the ground truth's own
    latent z_ir_t taken through the same denoise + decode (no translator can do better than its own target
    latent under the honest protocol), ``*_vae`` the VAE alone (decode(encode(IR)), the posterior mean: what the
    decoder can reproduce at all), ``*_grey`` a constant image at each test image's mean IR level.
    """
    from pathlib import Path as P

    import torch
    from safetensors import safe_open

    from benchmarks.ssim_border import both_ssims
    from orchestrator.queries import results
    from shared.db import session_scope
    from shared.models import Item
    from shared.storage import Storage
    from workers.ml.image_metrics import psnr_ssim
    from workers.ml.inversion import InversionConfig, decode, denoise, encode
    from workers.ml.m3fd import Pair, load_image_pair
    from workers.ml.sd import load_sd
    from workers.train.translator import load_translator

    spec, storage = eval_job.spec, Storage(settings.storage)
    cfg = InversionConfig(**spec["inversion"])
    parts = load_sd(spec["model"])
    model, _ = load_translator(str(storage.resolve(spec["checkpoint_uri"])))
    with session_scope(settings) as s:
        items = {i.pair_id: (i.rgb_path, i.ir_path) for i in s.query(Item).filter(Item.job_id == spec["latents"])}
    rows = [r for r in results(settings, spec["latents"]) if r["split"] == "test"]
    z_rgb, z_ir, ir11, ir01 = [], [], [], []
    for r in rows:
        with safe_open(str(storage.resolve(r["artifact"])), framework="pt") as f:
            z_rgb.append(f.get_tensor("z_rgb_t")[r["position"]].float())
            z_ir.append(f.get_tensor("z_ir_t")[r["position"]].float())
        rgb_path, ir_path = items[r["pair_id"]]
        _, ir, ir_01 = load_image_pair(Pair(r["pair_id"], P(rgb_path), P(ir_path)), cfg.size, cfg.resize_to)
        ir11.append(ir)
        ir01.append(ir_01)
    zr, zi, target = torch.stack(z_rgb), torch.stack(z_ir), torch.stack(ir01).clamp(0, 1)
    with torch.inference_mode():
        imgs = decode(parts, denoise(parts, torch.cat([model(zr), zi, zr]), cfg.prompt_ir, cfg)).cpu()
        vae = decode(parts, encode(parts, torch.stack(ir11).to(parts.device), "mean")).cpu().clamp(0, 1)
    pred, truth_rt, base = imgs.clamp(0, 1).split(len(rows))
    out = {}
    for name, (a, b) in {"ssim": (pred, target), "ssim_seed_protocol": (pred, truth_rt),
                         "ssim_baseline": (base, target), "ssim_baseline_seed_protocol": (base, truth_rt)}.items():
        tm, valid = both_ssims(a, b)
        out[f"{name}_tm"], out[f"{name}_valid"] = float(tm.mean()), float(valid.mean())
    grey = target.mean(dim=(1, 2, 3), keepdim=True).expand_as(target)
    for name, img in (("ceiling", truth_rt), ("vae", vae), ("grey", grey)):
        psnr, ssim = psnr_ssim(img, target)
        out[f"psnr_{name}"], out[f"ssim_{name}"] = float(psnr.mean()), float(ssim.mean())
    return out


def wins(settings, eval_job_id: str) -> dict[str, int]:
    """Test pairs on which the translator's PSNR beats the baseline's, per protocol (the job's per-pair metrics)."""
    from orchestrator.queries import results

    rows = [r for r in results(settings, eval_job_id) if r.get("item")]
    return {p: sum(r[f"psnr{sfx}"] > r[f"psnr_baseline{sfx}"] for r in rows) for p, sfx in PROTOCOLS.items()}


def run_benchmark(args: argparse.Namespace, work: Path) -> dict:
    """Submit invert -> train-translator -> eval-translator; return the figures (see ``main`` for the table)."""
    import numpy as np

    from orchestrator import jobs, submit
    from orchestrator.demo import local_workers
    from orchestrator.queries import metric_history, summary_metrics
    from shared.db import ensure_schema
    from workers.fixtures.m3fd import write_synthetic
    from workers.fixtures.tiny_sd import write_tiny_sd

    model = write_tiny_sd(work / "tiny-sd")
    data = work / "m3fd"
    # 4:3 like M3FD, short side = the crop: the 64 px centre square keeps most of the scene
    write_synthetic(data, args.pairs, width=args.size * 4 // 3, height=args.size, seed=1)
    ns = argparse.Namespace
    loads: list[float] = []
    with backend("embedded") as settings:
        ensure_schema(settings)
        env = {"OMP_NUM_THREADS": str(args.threads)}
        with local_workers(settings, 2, "gpu,train,cpu", settings.home / "logs", env=env):

            def run(fn, a, timeout: float = 3600):
                job_id = fn(settings, a)
                deadline = time.monotonic() + timeout
                while not jobs.get_job(settings, job_id).finished_at and time.monotonic() < deadline:
                    loads.append(os.getloadavg()[0])
                    time.sleep(1.0)
                job = jobs.wait(settings, job_id, timeout=max(1.0, deadline - time.monotonic()))
                if job.state != "succeeded":
                    raise RuntimeError(f"{job.kind} {job_id} ended {job.state}: {job.error or ''}")
                return job

            inv = run(submit.submitter("invert"), ns(
                data=str(data), model=str(model), shards=4, t=None, steps=None, size=args.size, batch_size=8,
                preset="readme", split_seed=42, test_fraction=0.2, precision="auto", seed=0, skip_bad=False))
            n_test = round(args.pairs * 0.2)  # approximate until the eval job reports its pair count
            print(f"invert: job {inv.id}, {args.pairs} pairs at {args.size} px", flush=True)
            train = run(submit.submitter("train-translator"), ns(
                latents=inv.id, preset="readme", epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                batch_size=args.batch_size, gpus=1, base_channels=args.base_channels, depth=args.depth, amp=False,
                checkpoint_every=0, max_steps=None, log_every=50, seed=0))
            train_s = (train.finished_at - train.started_at).total_seconds()
            tm = summary_metrics(settings, train.id)
            print(f"train-translator: job {train.id}, {args.epochs} epochs in {train_s:.0f} s", flush=True)
            ev = run(submit.submitter("eval-translator"), ns(checkpoint=int(tm["final_checkpoint_id"]), shards=2,
                                                       batch_size=8))
            m = summary_metrics(settings, ev.id)
            n_test = int(m.get("pairs", n_test))
            again, won = recompute(settings, ev), wins(settings, ev.id)
            return {
                "metrics": m, "train_seconds": train_s, "n_test": n_test, "n_train": int(train.spec["train_pairs"]),
                "loss_epoch": [v for _, v in metric_history(settings, train.id, "loss_epoch")],
                "val_loss_epoch": [v for _, v in metric_history(settings, train.id, "val_loss_epoch")],
                "val_loss_identity": tm.get("val_loss_identity"), "again": again, "wins": won,
                "jobs": {"invert_job": inv.id, "train_job": train.id, "eval_job": ev.id},
                "loadavg_mean": round(float(np.mean(loads)), 2) if loads else None,
                "loadavg_max": round(float(np.max(loads)), 2) if loads else None,
            }


def records(args: argparse.Namespace, res: dict) -> list[dict]:
    """One record per protocol: translator, baseline and their margins, with the run's settings."""
    m, out = res["metrics"], []
    for protocol, sfx in PROTOCOLS.items():
        psnr, ssim = m[f"psnr{sfx}"], m[f"ssim{sfx}"]
        bp, bs = m[f"psnr_baseline{sfx}"], m[f"ssim_baseline{sfx}"]
        sv, bsv = res["again"][f"ssim{sfx}_valid"], res["again"][f"ssim_baseline{sfx}_valid"]
        out.append({"protocol": protocol, "psnr": round(psnr, 3), "ssim": round(ssim, 4),
                    "psnr_baseline": round(bp, 3),
                    "ssim_baseline": round(bs, 4), "ssim_valid_window": round(sv, 4),
                    "ssim_baseline_valid_window": round(bsv, 4), "margin_db": round(psnr - bp, 3),
                    "margin_ssim": round(ssim - bs, 4), "pairs_won": res["wins"][protocol],
                    "psnr_ceiling": round(res["again"]["psnr_ceiling"], 3),
                    "ssim_ceiling": round(res["again"]["ssim_ceiling"], 4),
                    "psnr_vae": round(res["again"]["psnr_vae"], 3), "ssim_vae": round(res["again"]["ssim_vae"], 4),
                    "psnr_grey": round(res["again"]["psnr_grey"], 3), "ssim_grey": round(res["again"]["ssim_grey"], 4),
                    "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                    "weight_decay": args.weight_decay, "base_channels": args.base_channels, "depth": args.depth,
                    "train_seconds": round(res["train_seconds"], 1), "n_train": res["n_train"],
                    "n_test": res["n_test"], "size": args.size,
                    "val_loss_first": res["val_loss_epoch"][0] if res["val_loss_epoch"] else None,
                    "val_loss_last": res["val_loss_epoch"][-1] if res["val_loss_epoch"] else None,
                    "val_loss_identity": res["val_loss_identity"], "loadavg_mean": res["loadavg_mean"],
                    "loadavg_max": res["loadavg_max"], "cpus": os.cpu_count(), "commit": _commit(), **res["jobs"]})
    return out


def print_table(recs: list[dict], res: dict) -> None:
    r0 = recs[0]
    print(f"\n{r0['n_train']} train / {r0['n_test']} test pairs at {r0['size']} px; {r0['epochs']} epochs "
          f"(lr {r0['lr']:g}, batch {r0['batch_size']}, base {r0['base_channels']}, depth {r0['depth']}) in "
          f"{r0['train_seconds']:.0f} s; load average {r0['loadavg_mean']} (max {r0['loadavg_max']}) on "
          f"{os.cpu_count()} CPUs")
    print(f"{'protocol':<34} {'translator':>18} {'identity baseline':>18} {'margin':>18} {'pairs won':>10}")
    print(f"{'':<34} {'PSNR dB':>9}{'SSIM':>9} {'PSNR dB':>9}{'SSIM':>9} {'dB':>9}{'SSIM':>9} {'(PSNR)':>10}")
    names = {"honest": "vs real IR (honest)", "seed": "vs IR round trip (seed protocol)"}
    for r in recs:
        print(f"{names[r['protocol']]:<34} {r['psnr']:>9.2f}{r['ssim']:>9.4f} {r['psnr_baseline']:>9.2f}"
              f"{r['ssim_baseline']:>9.4f} {r['margin_db']:>+9.2f}{r['margin_ssim']:>+9.4f} "
              f"{str(r['pairs_won']) + ' / ' + str(r['n_test']):>10}")
    print(f"{'references vs real IR:':<34}")
    print(f"{'  z_ir_t itself, denoised+decoded':<34} {r0['psnr_ceiling']:>9.2f}{r0['ssim_ceiling']:>9.4f}"
          "   (the honest protocol's ceiling: the target latent's own pixels)")
    print(f"{'  VAE alone: decode(encode(IR))':<34} {r0['psnr_vae']:>9.2f}{r0['ssim_vae']:>9.4f}")
    print(f"{'  constant grey at the mean IR':<34} {r0['psnr_grey']:>9.2f}{r0['ssim_grey']:>9.4f}")
    print("\nSSIM convention on these outputs: torchmetrics whole-map mean (the figures above) vs valid-window mean")
    for r in recs:
        sfx = PROTOCOLS[r["protocol"]]
        tm, bt = res["again"][f"ssim{sfx}_tm"], res["again"][f"ssim_baseline{sfx}_tm"]
        print(f"{names[r['protocol']]:<34} translator {tm:.4f} vs {r['ssim_valid_window']:.4f} "
              f"({tm - r['ssim_valid_window']:+.4f}); baseline {bt:.4f} vs {r['ssim_baseline_valid_window']:.4f} "
              f"({bt - r['ssim_baseline_valid_window']:+.4f})")
    val, tr = res["val_loss_epoch"], res["loss_epoch"]
    if val:
        print(f"\nlatent MSE per epoch (held-out: {r0['n_test']} test pairs; identity map z_rgb_t -> z_ir_t: "
              f"{res['val_loss_identity']:.4f})")
        n = len(val)
        shown = sorted({0, 1, 2, 4, 9, 19, 49, 99, 149, 199, 299, n - 1} & set(range(n)))
        print(f"{'epoch':>6} {'train loss':>11} {'val loss':>10}")
        for e in shown:
            print(f"{e + 1:>6} {tr[e] if e < len(tr) else float('nan'):>11.4f} {val[e]:>10.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=128, help="synthetic pairs (80 %% train, 20 %% test)")
    p.add_argument("--size", type=int, default=64, help="crop side in px (latents are size / 8)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per worker process")
    p.add_argument("--quick", action="store_true", help="tiny budget: checks the code path only")
    p.add_argument("--json", type=Path, default=None, help=f"append the records here (default {RESULTS})")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.epochs, args.base_channels = 20, 6, 8

    print(machine())
    with tempfile.TemporaryDirectory(prefix="translator-quality-") as tmp:
        res = run_benchmark(args, Path(tmp))
    recs = records(args, res)
    print_table(recs, res)
    out = args.json or (None if args.quick else RESULTS)
    if out is not None:
        append_records(out, recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
