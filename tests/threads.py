"""torch's intra-op thread count for a block of test code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on `n` intra-op threads, then give the process its own count back. One thread is what the
    workers run with (OMP_NUM_THREADS=1: the same kernels, the same bytes), and on a shared CPU tiny models only lose
    to OpenMP threads spinning against other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
