"""The JSON-lines event file through which rank 0 reports to its supervisor (the events are listed in
workers/train/common.py)."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # NaN/inf are not JSON; a diverged loss shows as null
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


class EventWriter:
    """Appends one JSON object per line to the event file (rank 0 only), flushed and fsynced each time."""

    def __init__(self, path: str | None, enabled: bool = True) -> None:
        self.enabled = enabled
        self._f = None
        if enabled and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- kept open for the run

    def emit(self, event: str, **fields: Any) -> dict | None:
        """Write {"event": event, "time": now, **fields}; returns the record (None on non-main ranks)."""
        if not self.enabled:
            return None
        record = {"event": event, "time": time.time(), **{k: _jsonable(v) for k, v in fields.items()}}
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        return record

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
