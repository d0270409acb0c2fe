"""Load the next batches while the current one computes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

B = TypeVar("B")
T = TypeVar("T")


def prefetched(batches: Sequence[B], load: Callable[[B], T], depth: int = 2, workers: int = 2) -> Iterator[T]:
    """Yield ``load(b)`` for each batch, in order, while a thread pool loads the next ``depth`` ones.

    Decoding (OpenCV) and tensor copies release the GIL, so loading runs beside the compute and takes the CPU off
    the GPU's critical path. An exception raised by ``load`` surfaces when its batch is reached, as in a plain loop.
    Closing the generator early (an error or a cancellation in the consumer) drops the batches not yet started.
    """
    if depth < 1 or len(batches) <= 1:
        yield from (load(b) for b in batches)
        return
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prefetch")
    try:
        futures: list[Future[T]] = [pool.submit(load, b) for b in batches[:depth]]
        for i in range(len(batches)):
            if i + depth < len(batches):
                futures.append(pool.submit(load, batches[i + depth]))
            yield futures[i].result()
            futures[i] = None  # type: ignore[call-overload]  # let the batch go once consumed
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
