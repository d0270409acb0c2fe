"""Logging set-up shared by the CLI and the workers: a chosen level for our own lines, less third-party noise."""

from __future__ import annotations

import logging
import os

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _DropPrefix(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_quiet = False


def quiet_third_party() -> None:
    """Silence what a user cannot act on (idempotent):

    - kombu's "No hostname was supplied" (the filesystem broker has no host by design);
    - Alembic's "Context impl ..." / "Will assume ..." INFO lines, printed once per process that opens the DB;
    - transformers', diffusers' and the Hugging Face hub's INFO logs and progress bars (WARNING and above stay).
    """
    global _quiet
    if _quiet:
        return
    _quiet = True
    logging.getLogger("kombu.connection").addFilter(_DropPrefix("No hostname was supplied"))
    for name in ("alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "warning")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def setup(level: str = "WARNING") -> None:
    """The CLI's logging: `level` for the orchestrator's own lines on stderr, third-party noise quietened."""
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()
