"""Helpers of the `orchestrator` command line: --version, defaults in --help, and quiet endings."""

from __future__ import annotations

import argparse
import os
import sys

from shared import constants as C
from shared.logs import LEVELS

#: Packages of the [worker] extra: a control-plane install (the base package) lacks them.
WORKER_PACKAGES = frozenset({"torch", "torchvision", "diffusers", "transformers", "torchmetrics", "torch_fidelity",
                             "mlxtend"})


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("m3fd-orchestrator")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def add_global_options(p: argparse.ArgumentParser) -> None:
    """--version and --log-level, given before the command."""
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LEVELS,
                   help="level of the orchestrator's own log lines on stderr (workers: `worker --loglevel`)")


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append '(default: X)' to the help of every option with a default, in every subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                show_defaults(child)
        elif (action.option_strings and not any(action.default is x for x in (None, False, argparse.SUPPRESS))
              and action.help is not argparse.SUPPRESS and "%(default)" not in (action.help or "")):
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"


def missing_worker_package(e: ModuleNotFoundError, command: str) -> int:
    """One line naming the extra to install when a command needs the ML stack on a control-plane install."""
    if (e.name or "").split(".")[0] not in WORKER_PACKAGES:
        raise e
    print(f"error: `orchestrator {command}` needs the worker packages ({e.name} is not installed): "
          "pip install 'm3fd-orchestrator[worker]'", file=sys.stderr)
    return C.EXIT_USAGE


def broken_pipe() -> int:
    """The reader went away (`... | head`): stop quietly, and keep Python's exit-time flush from raising again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return C.EXIT_BROKEN_PIPE
