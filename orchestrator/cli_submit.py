"""The `orchestrator submit KIND` parsers, one per registered kind, built from its options dataclass (kinds/)."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def _add_common_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit 1 unless it succeeded")
    p.add_argument("--json", action="store_true", help='print {"job_id": ...} (with --wait: the final status)')


def add_kind_options(p: argparse.ArgumentParser, options: type) -> None:
    """One ``--name-with-dashes`` argument per field of a kind's options dataclass."""
    for f in dataclasses.fields(options):
        meta = f.metadata["cli"]
        flag = "--" + f.name.replace("_", "-")
        if meta["flag"]:
            p.add_argument(flag, action="store_true", help=meta["help"])
            continue
        kw: dict[str, typing.Any] = {"help": meta["help"], "choices": meta["choices"]}
        if meta["required"]:
            kw["required"] = True
        else:
            kw["default"] = f.default
        if meta["type"] is not None:  # kinds/base.py check(): every int or float option names its converter
            kw["type"] = meta["type"]
        p.add_argument(flag, **kw)


def add_submit_parsers(sub) -> None:
    import kinds

    p = sub.add_parser("submit", help="create a job and enqueue its shards")
    subs = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in kinds.all_kinds().values():
        kp = subs.add_parser(kind.name, help=kind.help)
        add_kind_options(kp, kind.options)
        _add_common_submit(kp)
