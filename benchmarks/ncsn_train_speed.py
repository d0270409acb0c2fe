"""NCSN training speed on CPU: optimizer steps/s of the `ncsn` preset's training step for network and runtime variants.

    python -m benchmarks.ncsn_train_speed              # the variants below, 20 timed steps each after 5 warm-up steps
    python -m benchmarks.ncsn_train_speed --quick      # 2 timed steps each: checks the code path only

One step is what `workers.train.ncsn` does per batch: the DSM loss of a random batch of the 4,000 embedded training
digits (kept as one tensor), backward, Adam, the EMA update. Variants (one change from the baseline each, unless
named otherwise): batch size, width (`base_channels`), intra-op threads, channels-last memory format, and
`torch.compile` of the network (its compile time reported apart). On a 2-core machine the training budget is
steps, so steps/s decides how far a 40-minute run gets (benchmarks/README.md, section 8).
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks._common import emit, header


def _step_rate(base: int, batch: int, threads: int, channels_last: bool = False, compile_: bool = False,
               warmup: int = 5, steps: int = 20) -> dict:
    import torch

    from workers.ml.mnist import EMBEDDED, load_mnist, to_tensor
    from workers.ml.ncsn import ScoreUNet
    from workers.ml.score import EMA, dsm_loss, get_sigmas

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    images, _ = load_mnist(EMBEDDED, "train")
    x_all = to_tensor(images, "zero_one")  # (4000, 1, 28, 28)
    sigmas = get_sigmas("geometric", 1.0, 0.01, 10)
    model = ScoreUNet(base_channels=base, channel_mults=(1, 2, 2), scale_by_sigma=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ema = EMA(model, 0.999, warmup=True)
    net = model
    compile_s = None
    if compile_:
        net = torch.compile(model)
    params = sum(p.numel() for p in model.parameters())

    def one() -> None:
        idx = torch.randint(0, x_all.shape[0], (batch,))
        x = x_all[idx]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = dsm_loss(net, x, sigmas)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)

    t0 = time.perf_counter()
    one()  # the first step (compilation, if any)
    first = time.perf_counter() - t0
    if compile_:
        compile_s = first
    for _ in range(max(0, warmup - 1)):
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    dt = (time.perf_counter() - t0) / steps
    return {"base": base, "batch": batch, "threads": threads, "channels_last": channels_last,
            "compile": compile_, "params_k": round(params / 1000, 1), "s_per_step": round(dt, 4),
            "steps_per_s": round(1 / dt, 3), "digits_per_s": round(batch / dt, 1),
            "steps_in_40_min": int(2400 / dt),
            "compile_s": round(compile_s, 1) if compile_s is not None else None}


VARIANTS: list[dict] = [
    {"base": 16, "batch": 128, "threads": 2},  # the benchmark's network and the preset's batch
    {"base": 16, "batch": 128, "threads": 1},
    {"base": 16, "batch": 128, "threads": 2, "channels_last": True},
    {"base": 16, "batch": 64, "threads": 2},
    {"base": 16, "batch": 256, "threads": 2},
    {"base": 8, "batch": 128, "threads": 2},
    {"base": 24, "batch": 128, "threads": 2},
    {"base": 32, "batch": 128, "threads": 2},
    {"base": 16, "batch": 128, "threads": 2, "compile_": True},
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 timed steps a variant: checks the code path only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--json", default=None, help="append the table as one JSON line to this file")
    args = p.parse_args(argv)
    header("ncsn_train_speed")
    import torch

    threads_before = torch.get_num_threads()  # the variants set it; a caller's process gets its own back
    rows = []
    for v in VARIANTS:
        if v.get("compile_") and args.no_compile:
            continue
        kw = dict(v)
        if args.quick:
            kw.update(warmup=1, steps=2, batch=min(kw["batch"], 16))
        try:
            rows.append(_step_rate(**kw))
        except Exception as e:  # torch.compile needs a working C++ toolchain: report, do not stop the table
            rows.append({**{k: kw.get(k) for k in ("base", "batch", "threads")}, "compile": bool(v.get("compile_")),
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"})
        print(rows[-1], flush=True)
    torch.set_num_threads(threads_before)
    emit("NCSN training step on CPU (DSM loss, backward, Adam, EMA)", rows, json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
