"""Printing for people (tables that fit 80 columns) and for scripts (JSON, CSV)."""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from typing import Any


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


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, width: int = 80) -> str:
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    # shrink the widest columns (middle-truncating) until the table fits
    while sum(widths) + 2 * (len(widths) - 1) > width and max(widths) > 8:
        widths[widths.index(max(widths))] -= 1

    def cut(s: str, w: int) -> str:
        if len(s) <= w:
            return s.ljust(w)
        keep = w - 1
        return s[: keep // 2] + "~" + s[len(s) - (keep - keep // 2):]

    lines = ["  ".join(cut(c, w) for c, w in zip(columns, widths, strict=False)).rstrip()]
    for row in cells:
        lines.append("  ".join(cut(x, w) for x, w in zip(row, widths, strict=False)).rstrip())
    return "\n".join(lines)


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
