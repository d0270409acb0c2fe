"""NCSN sampling: samples/s of annealed Langevin dynamics for 1,000 steps (10 levels x 100) at batch 1,000, the
worker's sampler vs a straightforward loop and tuned variants.

    python -m benchmarks.ncsn_sampling               # CPU: a narrow score U-Net (base 16), batch 100, 100 steps
    python -m benchmarks.ncsn_sampling --quick
    python -m benchmarks.ncsn_sampling --gpu         # CUDA: the "ncsn" preset's U-Net (base 64), batch 1,000

Figures are normalised to 1,000 steps: samples/s = batch / (seconds per step x 1,000), so a CPU run with fewer
steps reports what the full schedule would give. Variants:

- ``straightforward loop``: what a notebook writes (the seed's q2.ipynb): ``torch.no_grad()``, a fresh sigma
  tensor, ``randn_like`` and out-of-place arithmetic every step, float32;
- ``worker (anneal_langevin)``: ``workers.ml.score.anneal_langevin`` as ``sample.shard`` calls it;
- ``in-place``: inference mode, one preallocated noise buffer, ``add_`` updates;
- GPU only: channels-last, then ``bf16 autocast`` on top, then ``torch.compile`` of the score network, then the
  whole step captured as a CUDA graph (``torch.cuda.graph``; one replay per step).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable

from benchmarks._common import Timer, emit, header


def build(base: int, device: str):
    import torch

    from workers.ml.ncsn import ScoreUNet
    from workers.ml.score import get_sigmas

    torch.manual_seed(0)
    model = ScoreUNet(base_channels=base, channel_mults=(1, 2, 2), scale_by_sigma=True).to(device).eval()
    return model, get_sigmas("geometric", 1.0, 0.01, 10).to(device)


def straightforward(model, x, sigmas, steps_each: int, step_lr: float = 2e-5):
    """The obvious loop (fresh tensors every step, autograd bookkeeping off with no_grad)."""
    import torch

    for sigma in sigmas:
        alpha = step_lr * (sigma / sigmas[-1]) ** 2
        for _ in range(steps_each):
            with torch.no_grad():
                labels = torch.ones(x.shape[0], device=x.device) * sigma
                grad = model(x, labels)
            noise = torch.randn_like(x)
            x = x + (alpha / 2) * grad + torch.sqrt(alpha) * noise
    return x


def worker(model, x, sigmas, steps_each: int):
    from workers.ml.score import anneal_langevin

    return anneal_langevin(lambda y, s: model(y, s), x, sigmas, n_steps_each=steps_each, step_lr=2e-5, rule="ncsn")


def in_place(model, x, sigmas, steps_each: int, autocast: bool = False, step_lr: float = 2e-5,
             channels_last: bool = False):
    """Same update, x <- x + a/2 s(x) + sqrt(a) z, with buffers reused and no autograd state."""
    import torch

    from workers.ml.score import step_sizes

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.clone().contiguous(memory_format=fmt)
    z = torch.empty_like(x)
    sigma = torch.empty(x.shape[0], device=x.device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else _null()
    with torch.inference_mode(), ctx:
        for s, a in zip(sigmas.tolist(), step_sizes(sigmas, step_lr).tolist(), strict=True):
            sigma.fill_(s)
            for _ in range(steps_each):
                score = model(x, sigma)
                x.add_(score.to(x.dtype), alpha=a / 2).add_(z.normal_(), alpha=math.sqrt(a))
    return x


def cuda_graph(model, x, sigmas, steps_each: int, step_lr: float = 2e-5):
    """One Langevin step captured as a CUDA graph (bf16 autocast inside) and replayed for every step."""
    import torch

    from workers.ml.score import step_sizes

    sx = x.clone().contiguous(memory_format=torch.channels_last)
    sigma = torch.full((x.shape[0],), float(sigmas[0]), device=x.device)
    half_a = torch.zeros((), device=x.device)
    sqrt_a = torch.zeros((), device=x.device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            score = model(sx, sigma)
        sx.add_(score.float() * half_a + torch.randn_like(sx) * sqrt_a)

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up (cuDNN autotuning, allocator) outside the capture
                step()
        torch.cuda.current_stream().wait_stream(side)
        sx.copy_(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for s, a in zip(sigmas.tolist(), step_sizes(sigmas, step_lr).tolist(), strict=True):
            sigma.fill_(s)
            half_a.fill_(a / 2)
            sqrt_a.fill_(math.sqrt(a))
            for _ in range(steps_each):
                graph.replay()
    return sx


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def timed(fn: Callable, model, x, sigmas, steps_each: int, cuda: bool) -> float:
    import torch

    fn(model, x, sigmas[:1], 1)  # warm-up: one step at the first level
    if cuda:
        torch.cuda.synchronize()
    with Timer() as t:
        out = fn(model, x, sigmas, steps_each)
        if cuda:
            torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "non-finite samples"
    return t.s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=None, help="default 1,000 on the GPU, 100 on CPU")
    p.add_argument("--steps-each", type=int, default=None, help="steps per level (10 levels); default 100 GPU, 10 CPU")
    p.add_argument("--base", type=int, default=None, help="U-Net width; default 64 GPU (the preset), 16 CPU")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    header("ncsn_sampling")
    import torch

    cuda = args.gpu
    if cuda and not torch.cuda.is_available():
        print("no GPU")
        return 0
    if not cuda:
        torch.set_num_threads(1)
    device = "cuda" if cuda else "cpu"
    batch = args.batch or (1000 if cuda else (20 if args.quick else 100))
    steps_each = args.steps_each or ((20 if args.quick else 100) if cuda else (2 if args.quick else 10))
    base = args.base or (64 if cuda else (8 if args.quick else 16))
    if cuda:
        torch.backends.cudnn.benchmark = True
    model, sigmas = build(base, device)
    x = torch.rand(batch, 1, 28, 28, device=device, generator=None)
    steps = steps_each * len(sigmas)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    compiled: list = []

    def with_compile(m, y, s, k):  # compiles on the first (warm-up) call
        if not compiled:
            compiled.append(torch.compile(cl_model, dynamic=False))
        return in_place(compiled[0], y, s, k, autocast=True, channels_last=True)

    variants: list[tuple[str, Callable]] = [
        ("straightforward loop", straightforward),
        ("worker (anneal_langevin)", worker),
        ("in-place", lambda m, y, s, k: in_place(m, y, s, k)),
    ]
    if cuda:  # channels-last pays on tensor cores; on CPU it slows these narrow convolutions down
        variants.append(("+ channels-last", lambda m, y, s, k: in_place(cl_model, y, s, k, channels_last=True)))
        variants.append(("+ bf16 autocast",
                         lambda m, y, s, k: in_place(cl_model, y, s, k, autocast=True, channels_last=True)))
        if not args.no_compile:
            variants.append(("+ torch.compile", with_compile))
        variants.append(("bf16 step as a CUDA graph", lambda m, y, s, k: cuda_graph(cl_model, y, s, k)))
    rows = []
    for name, fn in variants:
        try:
            seconds = timed(fn, model, x, sigmas, steps_each, cuda)
        except Exception as e:  # one failing variant must not cost the others
            print(f"  {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            continue
        per_step = seconds / steps
        rows.append({"variant": name, "batch": batch, "steps_run": steps, "ms_per_step": round(1e3 * per_step, 3),
                     "samples_per_s_1000_steps": round(batch / (per_step * 1000), 3)})
        print(f"  {name:<28} {1e3 * per_step:9.2f} ms/step", flush=True)
    if rows:
        base_rate = rows[0]["samples_per_s_1000_steps"]
        for r in rows:
            r["x_vs_loop"] = round(r["samples_per_s_1000_steps"] / base_rate, 2)
    where = torch.cuda.get_device_name(0) if cuda else "CPU, 1 thread"
    emit(f"NCSN annealed Langevin sampling on {where}: U-Net base {base}, batch {batch} "
         f"(samples/s normalised to 1,000 steps)", rows, json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
