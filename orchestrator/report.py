"""`orchestrator report JOB`: one self-contained HTML page of what a job did, for people.

The page holds everything inline (no network, no scripts): images as PNG data URIs (cv2.imencode + base64), charts as
SVG. Sections: what the job did (a sentence from its spec, then the spec), lineage (inputs and the jobs that used this
one), timings (a chart of shard durations per worker, where stragglers stand out, and the slowest shards), metrics
(summary table and curves), and the pictures that fit the kind: latents and VAE decodes for invert, loss curves for
training, RGB | predicted IR | real IR grids and per-pair PSNR/SSIM histograms for evaluation, sample grids and the
FID/IS table for NCSN.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.report_charts import svg_gantt, svg_histogram, svg_lines  # noqa: F401 (re-exported)
from orchestrator.report_html import esc, fmt, fmt_seconds, page
from orchestrator.report_html import table as _table
from orchestrator.report_images import THUMB, embed_file, img_tag, latent_tile, png_bytes  # noqa: F401 (re-exported)
from orchestrator.report_pictures import FID_TABLE_METRICS, section_pictures
from shared.settings import Settings

#: A shard is a straggler when it took longer than this many times the median shard (and at least 1 s longer).
STRAGGLER_FACTOR = 1.5


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=timezone.utc)  # SQLite returns naive datetimes; everything stored is UTC


# -- data -------------------------------------------------------------------------------------------------------------


@dataclass
class ReportData:
    """What one report shows: the job row, its shards, metrics, artifacts, checkpoints and lineage (as dicts)."""

    job: dict[str, Any]
    shards: list[dict[str, Any]]
    summary: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]]
    per_item: dict[str, dict[str, float]]
    artifacts: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    inputs: list[dict[str, Any]]
    used_by: list[dict[str, Any]]


def gather(settings: Settings, job_id: str) -> ReportData:
    """Everything the page shows (the Store's report_rows, read in one session, and the summary metrics)."""
    from orchestrator.queries import summary_metrics
    from shared.store import store

    summary = summary_metrics(settings, job_id)
    r = store(settings).report_rows(job_id)
    return ReportData(r.job, r.shards, summary, r.curves, r.per_item, r.artifacts, r.checkpoints, r.inputs,
                      r.used_by)


def _dt(v: Any) -> datetime | None:
    if v is None:
        return None
    return _aware(datetime.fromisoformat(v) if isinstance(v, str) else v)


def shard_timings(data: ReportData) -> dict[str, Any]:
    """Per-shard durations (last attempt), their median/p95/max, and which shards straggled."""
    t0 = _dt(data.job.get("started_at")) or _dt(data.job.get("created_at"))
    rows = []
    for sh in data.shards:
        a, b = _dt(sh.get("started_at")), _dt(sh.get("finished_at"))
        if a is None or b is None or t0 is None:
            continue
        rows.append({"index": sh["index"], "worker": sh.get("worker") or "?", "state": sh["state"],
                     "attempts": sh.get("attempts", 0), "start": (a - t0).total_seconds(),
                     "end": (b - t0).total_seconds(), "seconds": (b - a).total_seconds()})
    secs = sorted(r["seconds"] for r in rows)
    med = float(np.median(secs)) if secs else None
    for r in rows:
        r["straggler"] = bool(med is not None and len(rows) > 2 and r["seconds"] > STRAGGLER_FACTOR * med
                              and r["seconds"] - med >= 1.0)
    return {"rows": rows, "median": med, "p95": float(np.percentile(secs, 95)) if secs else None,
            "max": secs[-1] if secs else None, "busy": sum(secs), "workers": len({r["worker"] for r in rows})}


# -- sections ---------------------------------------------------------------------------------------------------------



def describe(data: ReportData) -> str:
    """One or two sentences of what the job did: the kind's own ``describe`` (kinds/)."""
    import kinds

    kind = kinds.find(data.job["kind"])
    if kind is None:
        return f"A {data.job['kind']} job of {data.job['shards_total']} shard(s)."
    return kind.describe(data)


def section_summary(data: ReportData) -> str:
    """What it did: the sentence, state, counts, times and the full spec."""
    j = data.job
    t = shard_timings(data)
    c, a, b = _dt(j.get("created_at")), _dt(j.get("started_at")), _dt(j.get("finished_at"))
    # shard time is the workers' own measure of the work, the figure shard_seconds_total sums; the wall-clock
    # spans of the shards (with claims, model loading and recording) are in the timeline below
    busy = data.summary.get("shard_seconds_total")
    facts = [("state", j["state"]), ("shards", f"{j['shards_done']}/{j['shards_total']} done, "
                                               f"{j['shards_failed']} failed"),
             ("created", j.get("created_at")), ("started", j.get("started_at")), ("finished", j.get("finished_at")),
             ("queue wait", fmt_seconds((a - c).total_seconds()) if a and c else "-"),
             ("run time", fmt_seconds((b - a).total_seconds()) if a and b else "-"),
             ("shard time (sum)", fmt_seconds(busy) if busy is not None else
              fmt_seconds(t["busy"]) if t["rows"] else "-")]
    if j.get("error"):
        facts.append(("error", j["error"].splitlines()[0]))
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(fmt(v))}</dd>" for k, v in facts)
    spec = json.dumps(j.get("spec") or {}, indent=2, default=str)
    return (f'<section id="summary"><h2>What it did</h2><p class="lead">{esc(describe(data))}</p>'
            f"<dl>{dl}</dl><details><summary>Full spec</summary><pre>{esc(spec)}</pre></details></section>")


def _used_by_once(used_by: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per consuming job: a job that used both this job and its checkpoint is listed once, with both."""
    rows: dict[str, dict[str, Any]] = {}
    for r in used_by:
        seen = rows.setdefault(r["job_id"], {**r, "role": [], "via": []})
        for key in ("role", "via"):
            if r[key] not in seen[key]:
                seen[key].append(r[key])
    return [{**r, "role": ", ".join(r["role"]), "via": ", ".join(r["via"])} for r in rows.values()]


def section_lineage(data: ReportData) -> str:
    """The job's inputs and the jobs that consumed it."""
    return ('<section id="lineage"><h2>Lineage</h2><h3>Inputs</h3>'
            + _table(data.inputs, ["role", "kind", "ref", "detail"])
            + "<h3>Used by</h3>" + _table(_used_by_once(data.used_by), ["job_id", "kind", "state", "role", "via"])
            + "</section>")


def section_timings(data: ReportData) -> str:
    """Shard durations per worker (stragglers marked), their statistics and the slowest shards."""
    t = shard_timings(data)
    if not t["rows"]:
        return '<section id="timings"><h2>Timings</h2><p class="muted">No shard has finished yet.</p></section>'
    bars = [{"worker": r["worker"], "start": r["start"], "end": r["end"], "short": str(r["index"]),
             "label": f"shard {r['index']} ({r['state']}, attempt {r['attempts']})",
             "cls": "failed" if r["state"] == "failed" else "slow" if r["straggler"] else "ok"} for r in t["rows"]]
    chart = svg_gantt(bars, "Shard durations per worker (orange: stragglers, red: failed)")
    slow = sorted(t["rows"], key=lambda r: -r["seconds"])[:10]
    for r in slow:
        r["seconds_fmt"] = f"{r['seconds']:.2f}"
        r["vs_median"] = f"{r['seconds'] / t['median']:.2f}x" if t["median"] else "-"
    stragglers = [r["index"] for r in t["rows"] if r["straggler"]]
    stats = (f"{len(t['rows'])} shards on {t['workers']} worker process(es); median {fmt(t['median'])} s, "
             f"p95 {fmt(t['p95'])} s, max {fmt(t['max'])} s; "
             + (f"stragglers (> {STRAGGLER_FACTOR}x median): shards {', '.join(map(str, stragglers))}"
                if stragglers else "no stragglers"))
    return (f'<section id="timings"><h2>Timings</h2><p>{esc(stats)}</p>{chart}<h3>Slowest shards</h3>'
            + _table(slow, ["index", "worker", "state", "attempts", "seconds_fmt", "vs_median"],
                     ["shard", "worker", "state", "attempts", "seconds", "vs median"]) + "</section>")


def section_metrics(data: ReportData) -> str:
    """Summary metrics, one curve per metric logged more than once (a single value is shown as a number), and
    checkpoints. What the pictures section shows (a training loss, the FID table) is not repeated here."""
    import kinds

    kind = kinds.find(data.job["kind"])
    pictures = kind.pictures if kind is not None else ()
    hidden = set(FID_TABLE_METRICS) if "fid_table" in pictures else set()
    rows = [{"name": k, "value": v} for k, v in data.summary.items() if k not in hidden]
    out = ['<section id="metrics"><h2>Metrics</h2>', _table(rows, ["name", "value"]) if rows else
           '<p class="muted">Shown with the pictures below.</p>']
    curves = {n: c for n, c in data.curves.items() if not (n == "loss" and "loss" in pictures)}
    once = [{"name": n, "step": c[0][0], "value": c[0][1]} for n, c in sorted(curves.items()) if len(c) == 1]
    names = sorted((n for n, c in curves.items() if len(c) > 1), key=lambda n: (n != "loss", n))
    for name in names[:8]:
        out.append(svg_lines({name: curves[name]}, f"{name} per step", "step", name))
    if len(names) > 8:
        out.append(f'<p class="muted">{len(names) - 8} more curves: {esc(", ".join(names[8:]))}</p>')
    if once:
        out.append("<h3>Logged once</h3>" + _table(once, ["name", "step", "value"]))
    if data.checkpoints:
        out.append("<h3>Checkpoints</h3>" + _table(data.checkpoints, ["id", "step", "epoch", "reason", "created_at"]))
    return "".join(out) + "</section>"


def render_report(settings: Settings, job_id: str, examples: int = 4, decode: bool = True) -> str:
    """The report page of `job_id` as one HTML string (no model is loaded: invert decodes come from the workers)."""
    data = gather(settings, job_id)
    j = data.job
    sections = [section_summary(data), section_lineage(data), section_timings(data), section_metrics(data),
                section_pictures(settings, data, examples, decode)]
    nav = [("summary", "What it did"), ("lineage", "Lineage"), ("timings", "Timings"), ("metrics", "Metrics"),
           ("pictures", "Pictures")]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return page(f"{j['id']} ({j['kind']})", j, now, nav, sections)


def write_report(settings: Settings, job_id: str, out: str | Path | None = None, examples: int = 4,
                 decode: bool = True) -> Path:
    """Render the report and write it atomically to `out` (default report-JOB.html); returns the path."""
    import os
    import tempfile

    path = Path(out or f"report-{job_id}.html").expanduser()
    html = render_report(settings, job_id, examples, decode)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(html)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is meant to be shared like any other file
    os.replace(tmp, path)
    return path
