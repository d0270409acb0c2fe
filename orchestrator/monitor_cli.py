"""Monitoring subcommands (Flower, watch, report, queue lengths): registered into the CLI by `orchestrator.cli`."""

from __future__ import annotations

COMMANDS: dict = {}


def add_parsers(sub) -> None:
    """Add this module's subcommands to the `orchestrator` parser."""
