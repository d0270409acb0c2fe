"""SVG charts for the report page: lines, histograms, and shard durations per worker."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from orchestrator.report_html import esc, fmt

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 12) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _axes(x0: float, x1: float, y0: float, y1: float, w: int, h: int, pad: tuple[int, int, int, int],
          xlabel: str, ylabel: str, log_y: bool = False, y_ticks: bool = True,
          integer_y: bool = False) -> tuple[list[str], Any, Any]:
    """Axis lines, ticks and labels; returns (svg parts, x->px, y->px)."""
    left, right, top, bottom = pad
    tf = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    ty0, ty1 = tf(y0), tf(y1)
    if ty1 <= ty0:
        ty1 = ty0 + 1.0
    if x1 <= x0:
        x1 = x0 + 1.0

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y: float) -> float:
        return h - bottom - (tf(y) - ty0) / (ty1 - ty0) * (h - top - bottom)

    out = [f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" class="ax"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" class="ax"/>']
    for t in nice_ticks(x0, x1):
        out.append(f'<line x1="{px(t):.1f}" y1="{h - bottom}" x2="{px(t):.1f}" y2="{h - bottom + 4}" class="ax"/>'
                   f'<text x="{px(t):.1f}" y="{h - bottom + 16}" text-anchor="middle">{fmt(t)}</text>')
    if not y_ticks:
        yt: list[float] = []
    elif log_y:
        yt = [10.0 ** e for e in range(math.ceil(ty0), math.floor(ty1) + 1)]
    else:
        yt = [t for t in nice_ticks(y0, y1) if y0 - 1e-12 <= t <= y1 + 1e-12 and (not integer_y or t == int(t))]
    for t in yt:
        out.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{w - right}" y2="{py(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{fmt(t)}</text>')
    out.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 4}" text-anchor="middle" class="lbl">'
               f'{esc(xlabel)}</text>')
    out.append(f'<text x="12" y="{(top + h - bottom) / 2:.0f}" text-anchor="middle" class="lbl" '
               f'transform="rotate(-90 12 {(top + h - bottom) / 2:.0f})">{esc(ylabel)}</text>')
    return out, px, py


def svg_lines(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str = "step", ylabel: str = "",
              width: int = 640, height: int = 260) -> str:
    """Line chart of one or more (x, y) series; a log y axis when all values are positive and span > 50x."""
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    if not pts:
        return ""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    y0, y1 = min(ys), max(ys)
    log_y = y0 > 0 and y1 / y0 > 50
    if not log_y:
        padding = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 1.0
        y0, y1 = y0 - padding, y1 + padding
    parts, px, py = _axes(min(xs), max(xs), y0, y1, width, height, (62, 12, 28, 34), xlabel, ylabel, log_y)
    for k, (name, s) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s if math.isfinite(y))
        if len(s) == 1:
            x, y = s[0]
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        else:
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        if len(series) > 1:
            parts.append(f'<text x="{width - 16}" y="{40 + 14 * k}" text-anchor="end" fill="{color}">{esc(name)}</text>')
    return _svg(width, height, title, parts)


def svg_histogram(values: list[float], title: str, xlabel: str, bins: int = 20, width: int = 420,
                  height: int = 220) -> str:
    """Histogram of `values` in `bins` equal-width bins."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(vals, bins=bins, range=(lo, hi))
    parts, px, py = _axes(lo, hi, 0, max(1, int(counts.max())), width, height, (44, 10, 28, 34), xlabel, "pairs",
                          integer_y=True)
    for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if c:
            parts.append(f'<rect x="{px(a):.1f}" y="{py(c):.1f}" width="{max(1.0, px(b) - px(a) - 1):.1f}" '
                         f'height="{py(0) - py(c):.1f}" class="bar"><title>{fmt(a)}-{fmt(b)}: {c}</title></rect>')
    return _svg(width, height, title, parts)


def svg_gantt(bars: list[dict[str, Any]], title: str, width: int = 860) -> str:
    """Shard durations per worker on a time axis: one row per worker, one bar per shard attempt.

    bars: {"worker", "start", "end" (seconds since the job started), "label", "cls" ("ok" | "slow" | "failed")}.
    """
    if not bars:
        return ""
    workers = sorted({b["worker"] for b in bars})
    row_h, top, bottom, left = 22, 26, 34, min(260, 12 + 7 * max(len(w) for w in workers))
    height = top + bottom + row_h * len(workers)
    t1 = max(b["end"] for b in bars)
    parts, px, _ = _axes(0.0, max(t1, 1e-3), 0, 1, width, height, (left, 12, top, bottom),
                         "seconds since the job started", "", y_ticks=False)
    for r, w in enumerate(workers):
        y = top + r * row_h
        parts.append(f'<text x="{left - 6}" y="{y + row_h * 0.7:.1f}" text-anchor="end">{esc(w)}</text>')
        for b in (b for b in bars if b["worker"] == w):
            x0, x1 = px(b["start"]), px(b["end"])
            parts.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(1.5, x1 - x0):.1f}" height="{row_h - 6}" '
                         f'class="{b["cls"]}"><title>{esc(b["label"])}: {b["end"] - b["start"]:.2f} s</title></rect>')
            if x1 - x0 > 7 * len(str(b["short"])) + 4:
                parts.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{y + row_h * 0.68:.1f}" text-anchor="middle" '
                             f'class="inbar">{esc(b["short"])}</text>')
    return _svg(width, height, title, parts)


def _svg(w: int, h: int, title: str, parts: list[str]) -> str:
    return (f'<figure><svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
            f'role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>{"".join(parts)}</svg>'
            f"<figcaption>{esc(title)}</figcaption></figure>")
