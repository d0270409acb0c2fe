"""The job kinds: one module per kind in this package, each holding ``KIND = Kind(...)`` (kinds/base.py).

Every module here whose name does not start with ``_`` (and is not ``base`` or ``checks``) is a kind; modules named
in ORCH_EXTRA_KINDS (comma-separated, e.g. ``benchmarks.bench_kind``) are kinds too, for kinds that only some
processes need. The task names, the Celery routes, the CLI's `submit` subcommands, the training entry points and
the report's sections are all read from here; docs/adding-a-kind.md says how to add one.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from functools import cache

from kinds.base import Kind, Plan, check, option, resolve
from shared.errors import UserError

__all__ = ["Kind", "Plan", "all_kinds", "find", "get", "names", "option", "resolve", "task_for_kind", "task_routes",
           "training_kinds"]

_NOT_KINDS = {"base", "checks"}
EXTRA_ENV = "ORCH_EXTRA_KINDS"


@cache
def _here() -> tuple[str, ...]:
    """The kind modules of this package (the folder is read once per process: a worker asks on every claim)."""
    return tuple(sorted(f"kinds.{m.name}" for m in pkgutil.iter_modules(__path__)
                        if not m.name.startswith("_") and m.name not in _NOT_KINDS))


def _modules() -> tuple[str, ...]:
    extra = tuple(m.strip() for m in os.environ.get(EXTRA_ENV, "").split(",") if m.strip())
    return _here() + extra


@cache
def _registry(modules: tuple[str, ...]) -> dict[str, Kind]:
    out: dict[str, Kind] = {}
    for name in modules:
        kind = getattr(importlib.import_module(name), "KIND", None)
        if not isinstance(kind, Kind):
            raise ValueError(f"{name} declares no KIND = Kind(...)")
        check(kind)
        if kind.name in out:
            raise ValueError(f"two modules declare the kind {kind.name!r}")
        out[kind.name] = kind
    tasks: dict[str, tuple[str, str]] = {}
    for k in out.values():  # kinds may share a task (the training kinds share train.run), never with other routes
        seen = tasks.setdefault(k.task, (k.queue, k.work))
        if seen != (k.queue, k.work):
            raise ValueError(f"task {k.task!r} of kind {k.name!r} differs in queue or work from another kind's")
    return out


def all_kinds() -> dict[str, Kind]:
    """{name: Kind}, in name order."""
    return _registry(_modules())


def find(name: str) -> Kind | None:
    """The kind, or None for a name no module declares (a job from an older version, say)."""
    return all_kinds().get(name)


def names() -> tuple[str, ...]:
    return tuple(all_kinds())


def get(name: str) -> Kind:
    try:
        return all_kinds()[name]
    except KeyError:
        raise UserError(f"unknown job kind {name!r}: use one of {', '.join(names())}") from None


def task_for_kind() -> dict[str, str]:
    return _task_for_kind(_modules())


@cache
def _task_for_kind(modules: tuple[str, ...]) -> dict[str, str]:
    return {k.name: k.task for k in _registry(modules).values()}


def task_routes() -> dict[str, dict[str, str]]:
    """Celery's task_routes: each kind's task to its queue."""
    return {k.task: {"queue": k.queue} for k in all_kinds().values()}


def training_kinds() -> tuple[str, ...]:
    return tuple(k.name for k in all_kinds().values() if k.training)
