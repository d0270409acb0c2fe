"""Printing for people (tables that fit the terminal) and for scripts (JSON, CSV)."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from collections.abc import Sequence
from typing import Any

#: Columns whose values people copy into the next command (ids, URIs, hashes): never shortened.
IDENTIFIER_COLUMNS = frozenset({"job_id", "pair_id", "item", "artifact", "artifact_id", "checkpoint_id", "uri",
                                "sha256", "worker", "ref", "via"})
#: Narrowest a shortened (non-identifier) column may get, its header aside.
MIN_CUT = 6


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def dumps(obj: Any) -> str:
    def walk(o):
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return _clean(o)

    return json.dumps(walk(obj), indent=2, default=str)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def terminal_width() -> int:
    """Columns of the terminal ($COLUMNS first; 80 when there is no terminal, e.g. in a pipe)."""
    return shutil.get_terminal_size((80, 24)).columns


def is_identifier(column: str) -> bool:
    return column in IDENTIFIER_COLUMNS or column.endswith("_id")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, width: int | None = None) -> str:
    """Rows as aligned columns that fit `width` (default: the terminal's).

    Only free-text columns are shortened (middle-cut with '~'), never below their header, so two column names stay
    distinct. Identifiers are printed whole; when they cannot fit, each row becomes a block of `name  value` lines.
    """
    if not rows:
        return "(none)"
    width = width or terminal_width()
    columns = list(columns or rows[0].keys())
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    floor = [w if is_identifier(c) else min(w, max(len(c), MIN_CUT)) for c, w in zip(columns, widths, strict=True)]

    def total() -> int:
        return sum(widths) + 2 * (len(widths) - 1)

    while total() > width:
        cuttable = [i for i, w in enumerate(widths) if w > floor[i]]
        if not cuttable:
            return records(columns, cells)
        i = max(cuttable, key=lambda k: widths[k])
        widths[i] -= 1

    def cut(s: str, w: int) -> str:
        if len(s) <= w:
            return s.ljust(w)
        keep = w - 1
        return s[: keep // 2] + "~" + s[len(s) - (keep - keep // 2):]

    lines = ["  ".join(cut(c, w) for c, w in zip(columns, widths, strict=False)).rstrip()]
    for row in cells:
        lines.append("  ".join(cut(x, w) for x, w in zip(row, widths, strict=False)).rstrip())
    return "\n".join(lines)


def records(columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """The narrow layout: one `name  value` line per column, a blank line between rows; nothing is cut."""
    pad = max(len(c) for c in columns)
    return "\n\n".join("\n".join(f"{c:<{pad}}  {v}" for c, v in zip(columns, row, strict=True)) for row in cells)


def write_csv(rows: Sequence[dict[str, Any]], out=None) -> None:
    out = out or sys.stdout
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    w = csv.DictWriter(out, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: _clean(r.get(k)) for k in keys})
