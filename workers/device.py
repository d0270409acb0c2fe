"""Device and model cache of a worker process: models are loaded once per process and reused across shards."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_cache: OrderedDict[tuple, Any] = OrderedDict()
#: How many models a worker process keeps (an explicit limit: a long-lived GPU worker that sees many different
#: models would otherwise grow without bound). Overridable with ORCH_MODEL_CACHE_SIZE.
MODEL_CACHE_SIZE = 2
#: Loads performed by this process, per key: the tests read it to prove two shards share one load.
LOADS: dict[tuple, int] = {}


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, precision: str = "auto"):
    import torch

    if precision == "fp32" or device == "cpu":
        return torch.float32
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def cached(key: tuple, load: Callable[[], Any]) -> tuple[Any, bool]:
    """Return (model, hit): the cached model for `key`, loading it with `load()` on a miss (LRU eviction)."""
    import os

    size = int(os.environ.get("ORCH_MODEL_CACHE_SIZE", MODEL_CACHE_SIZE))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key], True
        model = load()
        LOADS[key] = LOADS.get(key, 0) + 1
        _cache[key] = model
        while len(_cache) > size:
            _cache.popitem(last=False)
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:
                pass
        return model, False
