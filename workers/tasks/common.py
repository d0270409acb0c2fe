"""What every task module shares: the settings of this worker process (read once from the environment)."""

from __future__ import annotations

from functools import lru_cache

from shared.db import ensure_schema
from shared.settings import Settings


@lru_cache(maxsize=1)
def settings() -> Settings:
    s = Settings.from_env()
    ensure_schema(s)
    return s
