"""The prefetching loader used by `invert.shard`: order, overlap, errors and early close."""

from __future__ import annotations

import threading
import time

import pytest

from workers.ml.prefetch import prefetched


def test_yields_every_batch_in_order():
    assert list(prefetched(list(range(7)), lambda b: b * 10)) == [b * 10 for b in range(7)]
    assert list(prefetched([], lambda b: b)) == []
    assert list(prefetched([3], lambda b: b + 1)) == [4]


def test_loads_ahead_while_the_consumer_computes():
    """While batch 0 is being consumed, batches 1 and 2 are loaded on other threads (depth 2), not batch 3."""
    started: list[int] = []
    lock = threading.Lock()

    def load(b):
        with lock:
            started.append(b)
        return b

    it = prefetched(list(range(6)), load, depth=2)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(started) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(started) == [0, 1, 2]
    assert list(it) == [1, 2, 3, 4, 5]
    it.close()


def test_a_loading_error_surfaces_at_its_batch():
    def load(b):
        if b == 2:
            raise ValueError("bad file 2")
        return b

    it = prefetched(list(range(5)), load)
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(ValueError, match="bad file 2"):
        next(it)


def test_closing_early_drops_the_batches_not_started():
    started: list[int] = []
    gate = threading.Event()

    def load(b):
        started.append(b)
        gate.wait(5)
        return b

    it = prefetched(list(range(50)), load, depth=2, workers=1)
    gate.set()
    assert next(it) == 0
    it.close()  # a cancelled shard: the pool is shut down, the queued loads cancelled
    assert len(started) <= 4
