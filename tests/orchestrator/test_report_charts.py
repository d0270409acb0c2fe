"""The report's charts (orchestrator/report_charts.py): what they draw is the data, read back from the SVG.

Each plotted artist carries an id; its path holds a vertex per plotted point, so a chart's coordinates are an affine
image of the numbers it was given (of their log10 on a log axis). tests/orchestrator/test_report.py reads the charts
of real reports with the same helpers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from orchestrator import report as rp
from orchestrator.report_charts import chart_id, histogram_counts


def artist_path(html: str, gid: str) -> np.ndarray:
    """The vertices (x, y, in the SVG's points) of the plotted artist `gid` on the page."""
    m = re.search(rf'<g id="{re.escape(gid)}">(?:<title>[^<]*</title>)?\s*<path d="([^"]+)"', html)
    assert m, f"no artist {gid}"
    return np.array(re.findall(r"[ML] (-?[\d.]+) (-?[\d.]+)", m.group(1)), dtype=float)


def assert_affine(px, values) -> None:
    """`px` is a * values + b with a != 0: the chart drew exactly these numbers, in this order, on a linear axis
    (to the 0.01 pt the page keeps of each coordinate)."""
    px, v = np.asarray(px, dtype=float), np.asarray(values, dtype=float)
    assert px.shape == v.shape and len(v) >= 2, (px.shape, v.shape)
    a, b = np.polyfit(v, px, 1)
    assert abs(a) > 1e-9 and np.abs(a * v + b - px).max() < 0.02, (a, b, np.abs(a * v + b - px).max())


def assert_curve(html: str, gid: str, points: list[tuple[float, float]]) -> None:
    """The line `gid` has a vertex per point, at the point's step and value (log10 of it on a log axis)."""
    xy = artist_path(html, gid)
    steps, values = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    assert len(xy) == len(points)
    assert_affine(xy[:, 0], steps)
    log = values.min() > 0 and values.max() / values.min() > 50
    assert_affine(xy[:, 1], np.log10(values) if log else values)


def assert_histogram(html: str, title: str, values: list[float]) -> None:
    """The histogram `title` has a bar per non-empty bin, at the bin's edges, as tall as its count."""
    counts, edges = histogram_counts(values)
    full = np.flatnonzero(counts)
    drawn = sorted(int(i) for i in re.findall(rf'<g id="{chart_id(title)}-bin-(\d+)">', html))
    assert drawn == full.tolist()
    bars = [artist_path(html, f"{chart_id(title)}-bin-{i}") for i in full]
    assert_affine([b[:, 0].min() for b in bars] + [b[:, 0].max() for b in bars],
                  np.concatenate([edges[full], edges[full + 1]]))
    heights = np.array([b[:, 1].max() - b[:, 1].min() for b in bars])
    assert np.allclose(heights, heights.sum() / counts.sum() * counts[full], atol=0.03)
    tips = re.findall(rf'<g id="{chart_id(title)}-bin-\d+"><title>[^<]*: (\d+)</title>', html)
    assert sum(map(int, tips)) == len(values)


def without_namespaces(html: str) -> str:
    """The page less its SVG namespace declarations: names, not addresses that are fetched."""
    return re.sub(r' xmlns(?::\w+)?="http://www\.w3\.org/[^"]*"', "", html)


def test_line_charts_draw_the_data_on_the_right_scale_and_render_the_same_twice():
    loss = [(s, 2.0 * 0.9**s) for s in range(60)]  # spans > 50x: a log axis
    lr = [(s, 1e-3 * (1 + s % 3)) for s in range(0, 60, 5)]
    html = rp.svg_lines({"loss": loss, "lr": lr, "once": [(7, 0.5)], "empty": []}, "two $curves", "step", "a $ b")
    assert html.startswith('<figure class="chart" id="chart-two-curves"><svg ')
    assert "<figcaption>two $curves</figcaption>" in html and 'aria-label="two $curves"' in html
    assert_curve(html, "chart-two-curves-line-0", loss)
    xy = artist_path(html, "chart-two-curves-line-1")
    assert len(xy) == len(lr)  # the second series shares the log axis of the first
    assert_affine(np.concatenate([artist_path(html, "chart-two-curves-line-0")[:, 1], xy[:, 1]]),
                  np.log10([v for _, v in loss + lr]))
    assert 'id="chart-two-curves-line-2"' in html and "line-3" not in html  # a dot for one point, nothing for none
    assert all(f">{name}</text>" in html for name in ("loss", "lr", "once"))  # the legend, as text
    assert ">a $ b</text>" in html  # a dollar is shown, not taken for the start of a formula
    assert "<?xml" not in html and "<!DOCTYPE" not in html and "http://" not in without_namespaces(html)
    assert html == rp.svg_lines({"loss": loss, "lr": lr, "once": [(7, 0.5)], "empty": []}, "two $curves", "step",
                                "a $ b")
    # a linear axis when the values span less than 50x; nothing to draw gives no chart
    flat = [(s, 1.0 + 0.01 * s) for s in range(10)]
    assert_curve(rp.svg_lines({"x": flat}, "x per step", "step", "x"), "chart-x-per-step-line-0", flat)
    assert rp.svg_lines({"x": [(0, float("nan"))]}, "t") == "" and rp.svg_histogram([], "h", "x") == ""
    vals = [float(v) for v in np.random.default_rng(0).normal(20, 3, 200)]
    assert_histogram(rp.svg_histogram(vals, "PSNR per test pair (translator)", "psnr"),
                     "PSNR per test pair (translator)", vals)


def test_matplotlib_is_imported_when_a_chart_is_drawn_not_with_the_module():
    """Only drawing imports matplotlib (and never pyplot: no GUI backend, no global figures); another process draws
    the same bytes."""
    code = ("import sys\nfrom orchestrator import report\nassert 'matplotlib' not in sys.modules\n"
            "print(report.svg_histogram([1.0, 2.0, 2.5], 'h', 'x'), end='')\nassert 'matplotlib' in sys.modules\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == rp.svg_histogram([1.0, 2.0, 2.5], "h", "x")
