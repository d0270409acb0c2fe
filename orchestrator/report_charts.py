"""The report page's charts, drawn with matplotlib and inlined as SVG: lines, histograms, shard durations per worker.

matplotlib is imported inside the functions: only `orchestrator report` pays for it, not the query commands. The
figures are plain `matplotlib.figure.Figure` objects written by the SVG backend, so no GUI backend (and no pyplot
state) is involved.

Every data artist carries an id, ``chart-<title slug>-<what>-<n>``, and its path holds every plotted point: the
tests read the data back from the page. Charts render the same bytes for the same data (fixed hash salt, no date),
so two reports of a finished job differ only in the time they were made.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from orchestrator.report_html import esc, fmt

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
#: Shard bar colours by class: done, straggler, failed.
SHARD_COLOURS = {"ok": "#5b8def", "slow": "#f08c2e", "failed": "#d64545"}

#: matplotlib settings for every chart. Text stays text (small, selectable, searchable); paths are not simplified, so
#: a curve has a vertex per logged point; offsets on the tick labels ("+1e5") would hide the real steps.
RC = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 8.25,  # 11 px on the page (1 pt of the SVG's view box is 4/3 px)
    "path.simplify": False,
    "axes.formatter.useoffset": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#667",
    "axes.labelcolor": "#556",
    "xtick.color": "#445",
    "ytick.color": "#445",
    "grid.color": "#e4e7ec",
    "legend.frameon": False,
}
#: No creator (it names a URL) and no date: the same data gives the same bytes.
SVG_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}
_DECIMALS = re.compile(r"(\.\d\d)\d+")


def chart_id(title: str) -> str:
    """The id of a chart's figure and the prefix of its artists' ids: ``chart-`` and the title's words."""
    return "chart-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _plain(text: str) -> str:
    """Text matplotlib shows as written: a `$` would start math mode."""
    return str(text).replace("$", r"\$")


@contextmanager
def _figure(title: str, width: int, height: int) -> Iterator[tuple[Any, Any]]:
    """A figure of `width` x `height` page px with one axes, under RC; the title salts the SVG's ids, which keeps
    them stable between renders and distinct between the charts of one page."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({**RC, "svg.hashsalt": title}):
        fig = Figure(figsize=(width / 96, height / 96), dpi=96, layout="constrained")
        yield fig, fig.add_subplot()


def _html(fig: Any, title: str, width: int, height: int, tips: dict[str, str]) -> str:
    """The figure as an inline <svg> in a <figure> with the title as caption; `tips` (artist id -> text) become
    hover tooltips."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata=SVG_METADATA)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]  # the XML declaration and DOCTYPE do not belong inside HTML
    # matplotlib numbers its groups (figure_1, text_3, ...) alike in every chart; nothing refers to them
    svg = re.sub(r'<g id="[A-Za-z0-9.]+_\d+">', "<g>", svg)
    # coordinates to 0.01 pt (1/75 px, below what a screen shows) and no indentation: a third of a curve's bytes
    svg = re.sub(r'( (?:d|x|y|transform)=")([^"]*)"', lambda m: m[1] + _DECIMALS.sub(r"\1", m[2]) + '"', svg)
    svg = re.sub(r"\n +", "\n", svg)
    # shown at the size asked for in page px; the view box keeps matplotlib's points
    size = f'width="{width}" height="{height}" role="img" aria-label="{esc(title)}"'
    svg = re.sub(r'^<svg ([^>]*?)width="[^"]*" height="[^"]*"', lambda m: f"<svg {m[1]}{size}", svg, count=1)
    svg = svg.replace(">", f"><title>{esc(title)}</title>", 1)
    for gid, tip in tips.items():
        svg = svg.replace(f'<g id="{gid}">', f'<g id="{gid}"><title>{esc(tip)}</title>', 1)
    return f'<figure class="chart" id="{chart_id(title)}">{svg.strip()}<figcaption>{esc(title)}</figcaption></figure>'


def svg_lines(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str = "step", ylabel: str = "",
              width: int = 640, height: int = 260) -> str:
    """Line chart of one or more (x, y) series; a log y axis when all values are positive and span > 50x.

    The k-th series is the artist ``<chart id>-line-<k>``; a series of one point is drawn as a dot.
    """
    clean = {name: [(x, y) for x, y in s if math.isfinite(y)] for name, s in series.items()}
    ys = [y for s in clean.values() for _, y in s]
    if not ys:
        return ""
    cid = chart_id(title)
    with _figure(title, width, height) as (fig, ax):
        for k, (name, s) in enumerate(clean.items()):
            if not s:
                continue
            xs, vs = zip(*s, strict=True)
            ax.plot(xs, vs, color=PALETTE[k % len(PALETTE)], linewidth=1.6, label=_plain(name),
                    marker="o" if len(s) == 1 else None, markersize=4, gid=f"{cid}-line-{k}")
        if min(ys) > 0 and max(ys) / min(ys) > 50:
            from matplotlib.ticker import FuncFormatter, NullFormatter

            ax.set_yscale("log")
            # decades as numbers (0.01, 1e-05), as the tables print them; plain text is also cheaper to lay out
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(float(v))))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(_plain(xlabel))
        ax.set_ylabel(_plain(ylabel))
        ax.grid(axis="y")
        if len(series) > 1:
            ax.legend(loc="best")
        return _html(fig, title, width, height, {})


def histogram_counts(values: list[float], bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the finite `values` in `bins` equal-width bins over their range (a width of 1 when they
    are all equal); empty arrays when there is none."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return np.zeros(0, np.int64), np.zeros(0)
    lo, hi = min(vals), max(vals)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.histogram(vals, bins=bins, range=(lo, hi))


def svg_histogram(values: list[float], title: str, xlabel: str, bins: int = 20, width: int = 420,
                  height: int = 220) -> str:
    """Histogram of `values` in `bins` equal-width bins (histogram_counts).

    Bin i, when not empty, is the artist ``<chart id>-bin-<i>``, with its range and count as tooltip.
    """
    counts, edges = histogram_counts(values, bins)
    if not len(counts):
        return ""
    from matplotlib.ticker import MaxNLocator

    cid = chart_id(title)
    tips: dict[str, str] = {}
    with _figure(title, width, height) as (fig, ax):
        for i, (c, a, b) in enumerate(zip(counts, edges[:-1], edges[1:], strict=True)):
            if c:
                gid = f"{cid}-bin-{i}"
                ax.bar(a, int(c), width=b - a, align="edge", color="#5b8def", edgecolor="white", linewidth=0.5,
                       gid=gid)
                tips[gid] = f"{fmt(a)}-{fmt(b)}: {c}"
        ax.set_xlim(edges[0], edges[-1])
        ax.set_ylim(0, max(1, int(counts.max())) * 1.05)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(_plain(xlabel))
        ax.set_ylabel("pairs")
        ax.grid(axis="y")
        ax.set_axisbelow(True)
        return _html(fig, title, width, height, tips)


def svg_gantt(bars: list[dict[str, Any]], title: str, width: int = 860) -> str:
    """Shard durations per worker on a time axis: one row per worker, one bar per shard attempt.

    bars: {"worker", "start", "end" (seconds since the job started), "short" (the text in the bar), "label",
    "cls" ("ok" | "slow" | "failed")}. Bar k is the artist ``<chart id>-<cls>-<short>`` (``-<k>`` when two bars
    would share it), with its label and duration as tooltip.
    """
    if not bars:
        return ""
    workers = sorted({b["worker"] for b in bars})
    row = {w: r for r, w in enumerate(workers)}
    height = 60 + 22 * len(workers)
    t1 = max(max(b["end"] for b in bars), 1e-3)
    # the bars' room on the page, for deciding which labels fit inside their bar (estimated before layout)
    plot_px = max(100.0, width - 24 - min(260, 12 + 7 * max(len(w) for w in workers)))
    cid = chart_id(title)
    tips: dict[str, str] = {}
    with _figure(title, width, height) as (fig, ax):
        for k, b in enumerate(bars):
            gid = f"{cid}-{b['cls']}-{b['short']}"
            if gid in tips:
                gid = f"{gid}-{k}"
            span = b["end"] - b["start"]
            ax.barh(row[b["worker"]], max(span, t1 * 0.002), left=b["start"], height=0.72,
                    color=SHARD_COLOURS.get(b["cls"], SHARD_COLOURS["ok"]), gid=gid)
            tips[gid] = f"{b['label']}: {span:.2f} s"
            if span / t1 * plot_px > 7 * len(str(b["short"])) + 4:
                ax.text(b["start"] + span / 2, row[b["worker"]], _plain(b["short"]), ha="center", va="center",
                        color="white", fontsize=7.5, clip_on=True)
        ax.set_xlim(0, t1 * 1.01)
        ax.set_ylim(len(workers) - 0.5, -0.5)  # the first worker on top
        ax.set_yticks(range(len(workers)), [_plain(w) for w in workers])
        ax.tick_params(axis="y", length=0)
        ax.set_xlabel("seconds since the job started")
        ax.grid(axis="x")
        ax.set_axisbelow(True)
        return _html(fig, title, width, height, tips)
