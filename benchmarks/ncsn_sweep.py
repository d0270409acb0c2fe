"""NCSN noise levels and sampler settings, compared on one machine in one run (direct, not through the job path).

    python -m benchmarks.ncsn_sweep --steps 1200 --levels 1:10 10:60 --evals 200 50

For every noise-level setting SIGMA_MAX:L (geometric from SIGMA_MAX to the preset's sigma_min 0.01, L levels) it
trains the `ncsn` preset's network (base 16 by default) on the 4,000 embedded training digits for ``--steps``
optimiser steps (the same for every setting, so other load on the machine cannot bias the comparison) with the
training step the worker runs (DSM loss, Adam with warm-up, ramped EMA), then draws ``--n`` samples from the EMA
weights with every sampling budget E of ``--evals`` (network evaluations a sample: T = E / L Langevin steps a
level, at least 1, with NCSNv2's technique-4 step size for that T and level ratio, or ``--step-lr``) and scores
them with classifier-FID and IS against the 1,000 held-out digits. Prints one row per (levels, sampler); ``--json`` appends the rows to
benchmarks/results/ncsn_sweep.json. It answers "which settings", and the job-path benchmark
(benchmarks/ncsn_quality.py) then measures the chosen preset as users run it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from benchmarks._common import append_records, machine

RESULTS = Path(__file__).parent / "results" / "ncsn_sweep.json"


def technique4_eps(gamma: float, steps: int, sigma_min: float) -> float:
    """step_lr bringing the variance at the end of a level closest to sigma_i^2 (NCSNv2, technique 4).

    In this code's update (x + alpha/2 s + sqrt(alpha) z) with a = alpha / (2 sigma_i^2) = eps / (2 sigma_L^2)
    and r = 2 / (2 - a), a level of T steps that starts at variance gamma^2 sigma_i^2 ends at
    ((1 - a)^(2T) (gamma^2 - r) + r) sigma_i^2. The ratio stays above 1 (r > 1); NCSNv2 takes the step that
    brings it nearest 1, i.e. its minimum over a, found here on a fine log grid.
    """
    def ratio(a: float) -> float:
        r = 2.0 / (2.0 - a)
        return (1 - a) ** (2 * steps) * (gamma**2 - r) + r

    grid = [10 ** (-6 + 6 * k / 4000) for k in range(4000)]  # a in [1e-6, 1)
    best = min(grid, key=ratio)
    return 2 * sigma_min**2 * best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200, help="optimiser steps per noise-level setting")
    ap.add_argument("--levels", nargs="+", default=["1:10", "10:60"], help="SIGMA_MAX:L, geometric to 0.01")
    ap.add_argument("--evals", nargs="+", type=int, default=[200, 50], help="network evaluations a sample")
    ap.add_argument("--step-lr", type=float, default=None, help="fixed Langevin step_lr (default: technique 4)")
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--lr-schedule", nargs="+", default=["constant"], choices=["constant", "cosine"],
                    help="one run per schedule (cosine decays to 0 at --steps)")
    ap.add_argument("--lr", type=float, default=None, help="default: the preset's")
    ap.add_argument("--init", nargs="+", default=["prior"], choices=["prior", "uniform"],
                    help="sampler start: N(data mean, sigma_1^2) or NCSN's U[0, 1]; one row per start")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from workers.ml.classifier import train_classifier
    from workers.ml.fid import compute_fid_is, images_to_uint8
    from workers.ml.mnist import load_mnist, to_tensor
    from workers.ml.score import (
        EMA,
        anneal_langevin,
        dsm_loss,
        get_preset,
        get_sigmas,
        init_noise,
        init_prior,
        lr_factor,
    )
    from workers.train.ncsn import build_model, build_optimizer

    torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    train_u8, train_y = load_mnist("mnist:embedded", "train")
    test_u8, _ = load_mnist("mnist:embedded", "test")
    t0 = time.perf_counter()
    classifier, _ = train_classifier(train_u8, train_y, epochs=5, seed=0)
    print(f"classifier trained in {time.perf_counter() - t0:.0f} s", flush=True)
    x_all = to_tensor(train_u8, "zero_one")  # (4000, 1, 28, 28)

    rows = []
    runs = [(spec, schedule) for spec in args.levels for schedule in args.lr_schedule]
    for spec, schedule in runs:
        sigma_max, n_levels = float(spec.split(":")[0]), int(spec.split(":")[1])
        cfg = get_preset("ncsn") | {"base_channels": args.base_channels, "sigma_max": sigma_max,
                                    "num_levels": n_levels}
        cfg["lr"] = args.lr or cfg["lr"]
        cfg["batch_size"] = args.batch_size or cfg["batch_size"]
        sigmas = get_sigmas("geometric", sigma_max, cfg["sigma_min"], n_levels)
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = build_optimizer(cfg, model)
        ema = EMA(model, cfg["ema_decay"], warmup=True)
        gen = torch.Generator().manual_seed(0)
        step, losses, t_start = 0, [], time.perf_counter()
        model.train()
        while step < args.steps:
            for group in opt.param_groups:
                group["lr"] = cfg["lr"] * lr_factor(step, args.steps, cfg["warmup_steps"], schedule)
            idx = torch.randint(0, len(x_all), (cfg["batch_size"],), generator=gen)
            loss = dsm_loss(model, x_all[idx], sigmas, generator=gen)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)
            losses.append(loss.item())
            step += 1
        train_s = time.perf_counter() - t_start
        ema.copy_to(model)
        model.eval()
        gamma = float(sigmas[0] / sigmas[1])
        print(f"sigma_max {sigma_max} L {n_levels} (ratio {gamma:.3f}), lr {cfg['lr']:g} {schedule}, batch "
              f"{cfg['batch_size']}: {step} steps in {train_s / 60:.1f} min, "
              f"loss of the last 100 steps {sum(losses[-100:]) / len(losses[-100:]):.2f}", flush=True)
        for evals, init in [(e, i) for e in args.evals for i in args.init]:
            t_each = max(1, round(evals / n_levels))
            eps = args.step_lr or technique4_eps(gamma, t_each, cfg["sigma_min"])
            g = torch.Generator().manual_seed(1)
            t1 = time.perf_counter()
            if init == "prior":
                x = init_prior(args.n, x_all.mean(dim=0), float(sigmas[0]), generator=g)
            else:
                x = init_noise((args.n, 1, 28, 28), "ncsn", generator=g)
            x = anneal_langevin(model, x, sigmas, n_steps_each=t_each, step_lr=eps, rule="ncsn",
                                final_denoise=True, clamp=(0.0, 1.0), generator=g)
            sample_s = time.perf_counter() - t1
            m = compute_fid_is(test_u8, images_to_uint8(x, "zero_one"), features="mnist-classifier",
                               classifier=classifier, is_splits=10)
            row = {"sigma_max": sigma_max, "num_levels": n_levels, "gamma": round(gamma, 4),
                   "base_channels": args.base_channels, "lr": cfg["lr"], "lr_schedule": schedule,
                   "batch_size": cfg["batch_size"], "train_minutes": round(train_s / 60, 2), "steps": step,
                   "loss_last100": round(sum(losses[-100:]) / len(losses[-100:]), 3), "steps_each": t_each,
                   "step_lr": eps, "init": init, "evals_per_sample": n_levels * t_each + 1, "n_samples": args.n,
                   "sample_s": round(sample_s, 1), "fid": round(m["fid"], 1), "is_mean": round(m["is_mean"], 2)}
            rows.append(row)
            print(f"  {init:7s} T {t_each:4d} eps {eps:.2e} ({row['evals_per_sample']} evals/sample, {sample_s:.0f} s): "
                  f"FID {row['fid']:7.1f}  IS {row['is_mean']:.2f}", flush=True)
    if args.json:
        append_records(RESULTS, [r | {"cpus": os.cpu_count(), "loadavg_end": round(os.getloadavg()[0], 2)}
                                 for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
