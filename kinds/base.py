"""What a job kind declares: its options, its submission plan, where and how it runs, and how it is reported.

A kind is one module of this package holding one ``KIND = Kind(...)``. Everything that used to be spread over
constants, Celery routes, the CLI, the task package and the report is derived from these declarations
(kinds/__init__.py). This module imports no Celery, torch or workers code: the CLI's read commands import it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared import constants as C
from shared.errors import UserError


def option(default: Any = None, help: str | None = None, *, required: bool = False, choices: Sequence | None = None,
           flag: bool = False, type: Callable | None = None) -> Any:
    """A field of a kind's options dataclass, with what its CLI flag needs (``--name-with-dashes``).

    ``flag``: a store-true switch. ``type``: the argparse converter when the annotation is not enough (int, float).
    """
    meta = {"help": help, "required": required, "choices": tuple(choices) if choices else None, "flag": flag,
            "type": type}
    return field(default=default, metadata={"cli": meta})


@dataclass
class Plan:
    """What a submission creates: the job's spec, its shards and their items, its inputs and refused inputs.

    ``notes`` are lines for the person at the terminal (stderr) before the job is created, ``summary`` one after.
    """

    spec: dict[str, Any]
    shards: int = 1
    items: Sequence[dict[str, Any]] = ()
    lineage: Sequence[tuple[str, str, str]] = ()
    rejections: Sequence[tuple[str, str, str]] = ()
    notes: list[str] = field(default_factory=list)
    summary: str | None = None


#: The report's picture blocks a kind can ask for (orchestrator/report_pictures.py draws them).
PICTURES = frozenset({"invert_examples", "loss", "eval_grids", "sample_grids", "fid_table", "images"})
#: How `orchestrator results` lists a kind's results (orchestrator/queries.py).
RESULTS = frozenset({"pairs", "checkpoints", "item_metrics"})


@dataclass(frozen=True)
class Kind:
    """One job kind. ``work``/``finalize``/``entry_point`` are "module:function" / module names, imported only by
    the worker that runs them, so that declaring a kind costs no import of torch or Celery."""

    name: str
    help: str
    options: type  # a frozen dataclass whose fields are option(...)s
    plan: Callable[[Any, Any], Plan]  # (settings, options) -> Plan; raises UserError before anything exists
    queue: str
    task: str  # the Celery task name (what Flower shows)
    work: str  # "module:function" of the shard work, (ShardContext) -> ShardOutput
    describe: Callable[[Any], str]  # (the report's data: job, summary, curves, checkpoints) -> its first sentence
    training: bool = False
    entry_point: str | None = None  # training kinds: the torchrun module
    finalize: str | None = None  # "module:function", (Session, Job) -> None, once every shard succeeded
    results: str = "item_metrics"
    pictures: tuple[str, ...] = ("images",)
    summary_extra: Callable[[Any, Any], dict[str, Any]] | None = None  # (session, job) -> more summary fields

    def parse(self, given: Any) -> Any:
        """The typed options from anything with attributes (an argparse Namespace, the options themselves) or a
        dict: fields it lacks take their defaults; a required one that is missing is a UserError."""
        if isinstance(given, self.options):
            values = dataclasses.asdict(given)
        else:
            get = given.get if isinstance(given, dict) else (lambda k, d=None: getattr(given, k, d))
            values = {f.name: get(f.name, f.default) for f in dataclasses.fields(self.options)}
        for f in dataclasses.fields(self.options):
            if f.metadata.get("cli", {}).get("required") and values.get(f.name) is None:
                raise UserError(f"{self.name} needs --{f.name.replace('_', '-')}")
        return self.options(**values)


def fmt(v: Any) -> str:
    """A value for a sentence or a table cell: '-' for None, floats to 4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def resolve(ref: str) -> Any:
    """The object named by "package.module:attribute"."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def check(kind: Kind) -> None:
    """A declaration that cannot work fails here, at import, rather than when its first message is routed."""
    if kind.queue not in C.QUEUES:
        raise ValueError(f"kind {kind.name!r}: queue {kind.queue!r} is not one the workers consume {C.QUEUES}")
    if not dataclasses.is_dataclass(kind.options) or not kind.options.__dataclass_params__.frozen:
        raise ValueError(f"kind {kind.name!r}: options must be a frozen dataclass")
    if ":" not in kind.work or (kind.finalize is not None and ":" not in kind.finalize):
        raise ValueError(f"kind {kind.name!r}: work and finalize are 'module:function' references")
    if kind.training != (kind.entry_point is not None):
        raise ValueError(f"kind {kind.name!r}: a training kind names its entry point, and only a training kind")
    for f in dataclasses.fields(kind.options):
        meta = f.metadata.get("cli")
        if meta is None:
            raise ValueError(f"kind {kind.name!r}: option {f.name!r} is not declared with option(...)")
        # annotations are strings here (PEP 563); reading them back with typing.get_type_hints would cost every CLI
        # start an eval per option, so an int or float option names its converter and this check keeps that true
        if meta["type"] is None and not meta["flag"] and any(t in str(f.type) for t in ("int", "float")):
            raise ValueError(f"kind {kind.name!r}: option {f.name!r} is a number: give option(..., type=int|float)")
    if kind.results not in RESULTS or not set(kind.pictures) <= PICTURES:
        raise ValueError(f"kind {kind.name!r}: results one of {sorted(RESULTS)}, pictures from {sorted(PICTURES)}")
