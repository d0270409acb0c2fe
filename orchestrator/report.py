"""`orchestrator report JOB`: one self-contained HTML page of what a job did, for people.

The page holds everything inline (no network, no scripts): images as PNG data URIs (cv2.imencode + base64), charts as
SVG. Sections: what the job did (a sentence from its spec, then the spec), lineage (inputs and the jobs that used this
one), timings (a chart of shard durations per worker, where stragglers stand out, and the slowest shards), metrics
(summary table and curves), and the pictures that fit the kind: latents and VAE decodes for invert, loss curves for
training, RGB | predicted IR | real IR grids and per-pair PSNR/SSIM histograms for evaluation, sample grids and the
FID/IS table for NCSN.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from shared import constants as C
from shared.settings import Settings

#: Display side (px) of example images: enough to judge them, small enough to keep the page light.
THUMB = 144
#: Embedded image files above this many bytes are re-encoded smaller.
MAX_EMBED_BYTES = 3_000_000
#: A shard is a straggler when it took longer than this many times the median shard (and at least 1 s longer).
STRAGGLER_FACTOR = 1.5
TRAIN_KINDS = (C.KIND_TRAIN_TRANSLATOR, C.KIND_TRAIN_NCSN, C.KIND_TRAIN_CLASSIFIER)


def esc(v: Any) -> str:
    """HTML-escaped text of `v` (attributes included)."""
    return html.escape(str(v), quote=True)


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=timezone.utc)  # SQLite returns naive datetimes; everything stored is UTC


def fmt(v: Any) -> str:
    """A value for a table cell: '-' for None, floats to 4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def fmt_seconds(s: float | None) -> str:
    """12.3 s, 4 min 5 s, 2 h 3 min."""
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {s % 60:.0f} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


# -- images -----------------------------------------------------------------------------------------------------------


def png_bytes(img: np.ndarray) -> bytes:
    """PNG of an (H, W) grey or (H, W, 3) RGB uint8 image."""
    import cv2

    arr = np.ascontiguousarray(img if img.ndim == 2 else img[:, :, ::-1])  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def data_uri(png: bytes) -> str:
    """A `data:image/png;base64,...` URI: the page carries its images."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def img_tag(png: bytes, alt: str, css: str = "", min_side: int = 0) -> str:
    """An <img> with the PNG inline; images smaller than `min_side` are shown enlarged by a whole factor."""
    w, h = png_size(png)
    k = max(1, min(4, min_side // max(1, w, h))) if min_side else 1
    size = f' width="{w * k}" height="{h * k}"' if k > 1 else ""
    cls = f' class="{css}"' if css else ""
    return f'<img src="{data_uri(png)}" alt="{esc(alt)}" title="{esc(alt)}"{cls}{size}>'


def fit_side(img: np.ndarray, side: int = THUMB) -> np.ndarray:
    """Scale so the longer side is `side` px: nearest-neighbour up (latents stay crisp), area average down."""
    import cv2

    h, w = img.shape[:2]
    s = side / max(h, w)
    if abs(s - 1.0) < 1e-6:
        return img
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_NEAREST if s > 1 else cv2.INTER_AREA)


def to_u8(x01: Any) -> np.ndarray:
    """(3, H, W) or (H, W) float in [0, 1] (tensor or array) -> (H, W, 3) / (H, W) uint8."""
    a = np.asarray(x01.detach().cpu().float().numpy() if hasattr(x01, "detach") else x01, dtype=np.float32)
    if a.ndim == 3:
        a = a.transpose(1, 2, 0)
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def latent_tile(z: Any) -> np.ndarray:
    """A (4, h, w) latent as a 2 x 2 tile of its channels, each stretched over its own 1st-99th percentile."""
    a = np.asarray(z.detach().cpu().float().numpy() if hasattr(z, "detach") else z, dtype=np.float32)
    c, h, w = a.shape
    cols = 2 if c > 1 else 1
    rows = -(-c // cols)
    tile = np.zeros((rows * h, cols * w), np.uint8)
    for k in range(c):
        lo, hi = np.percentile(a[k], [1, 99])
        ch = (a[k] - lo) / (hi - lo) if hi > lo else np.zeros_like(a[k])
        r, col = divmod(k, cols)
        tile[r * h : (r + 1) * h, col * w : (col + 1) * w] = np.rint(np.clip(ch, 0, 1) * 255)
    return tile


def embed_file(path: Path, max_side: int = 1024) -> bytes | None:
    """The PNG bytes of an image file (re-encoded smaller when it is large); None if it is missing or unreadable."""
    import cv2

    try:
        data = path.read_bytes()
    except OSError:
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) <= MAX_EMBED_BYTES:
        return data
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return None
    if img.ndim == 3:
        img = img[:, :, 2::-1]  # BGR(A) -> RGB for png_bytes
    return png_bytes(fit_side(img, min(max_side, max(img.shape[:2]))))


# -- SVG charts -------------------------------------------------------------------------------------------------------

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
    """Everything the page shows, read in one session."""
    from sqlalchemy import or_, select

    from orchestrator.queries import _job_or_error, summary_metrics
    from shared.db import ensure_schema, session_scope
    from shared.models import Artifact, Checkpoint, Job, Lineage, Metric, Shard

    ensure_schema(settings)
    summary = summary_metrics(settings, job_id)
    with session_scope(settings) as s:
        job = _job_or_error(s, job_id).to_dict()
        shards = [r.to_dict() for r in s.execute(select(Shard).where(Shard.job_id == job_id)
                                                 .order_by(Shard.index)).scalars()]
        curves: dict[str, list[tuple[int, float]]] = {}
        per_item: dict[str, dict[str, float]] = {}
        for name, value, step, item in s.execute(
            select(Metric.name, Metric.value, Metric.step, Metric.item).where(Metric.job_id == job_id)
            .order_by(Metric.name, Metric.step)
        ).all():
            if item != C.NO_ITEM:
                per_item.setdefault(name, {})[item] = value
            elif step >= 0:
                curves.setdefault(name, []).append((step, value))
        artifacts = [a.to_dict() for a in s.execute(select(Artifact).where(Artifact.job_id == job_id)
                                                    .order_by(Artifact.shard_index, Artifact.id)).scalars()]
        checkpoints = [c.to_dict() for c in s.execute(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                                      .order_by(Checkpoint.step)).scalars()]
        inputs = []
        for kind, ref, role in s.execute(select(Lineage.input_kind, Lineage.input_ref, Lineage.role)
                                         .where(Lineage.job_id == job_id).order_by(Lineage.id)).all():
            row = {"kind": kind, "ref": ref, "role": role, "detail": ""}
            if kind == "job":
                other = s.get(Job, ref)
                row["detail"] = f"{other.kind}, {other.state}" if other else "not in this DB"
            elif kind == "checkpoint" and ref.isdigit():
                ck = s.get(Checkpoint, int(ref))
                row["detail"] = f"step {ck.step} of job {ck.job_id}" if ck else "not in this DB"
            inputs.append(row)
        my_ckpts = [str(c["id"]) for c in checkpoints]
        conds = [(Lineage.input_kind == "job") & (Lineage.input_ref == job_id)]
        if my_ckpts:
            conds.append((Lineage.input_kind == "checkpoint") & Lineage.input_ref.in_(my_ckpts))
        used_by = [{"job_id": j, "kind": k, "state": st, "role": role, "via": f"{ik} {ref}"}
                   for j, k, st, role, ik, ref in s.execute(
                       select(Job.id, Job.kind, Job.state, Lineage.role, Lineage.input_kind, Lineage.input_ref)
                       .join(Lineage, Lineage.job_id == Job.id).where(or_(*conds)).order_by(Job.created_at)).all()]
    return ReportData(job, shards, summary, curves, per_item, artifacts, checkpoints, inputs, used_by)


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


def _table(rows: list[dict[str, Any]], cols: list[str], headers: list[str] | None = None) -> str:
    if not rows:
        return '<p class="muted">(none)</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in (headers or cols))
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def describe(data: ReportData) -> str:
    """One or two sentences of what the job did, from its kind, spec and summary metrics."""
    j, sp, m = data.job, data.job.get("spec") or {}, data.summary
    kind, n = j["kind"], j["shards_total"]
    if kind == C.KIND_INVERT:
        inv = sp.get("inversion", {})
        return (f"Encoded {fmt(m.get('pairs', sp.get('pairs')))} M3FD pairs ({fmt(m.get('pairs_train'))} train / "
                f"{fmt(m.get('pairs_test'))} test) from {sp.get('data')} with the VAE of {sp.get('model')} "
                f"({inv.get('latent')} latents of {inv.get('size')} px crops) and DDIM-inverted RGB and IR latents "
                f"to t = {inv.get('t_end')} ({inv.get('steps')}-step schedule), in {n} shards.")
    if kind in TRAIN_KINDS:
        what = {C.KIND_TRAIN_TRANSLATOR: f"the latent U-Net translator z_rgb_t -> z_ir_t on the "
                                         f"{sp.get('train_pairs', '?')} train pairs of job {sp.get('latents')}",
                C.KIND_TRAIN_NCSN: f"a noise conditional score network on MNIST ({sp.get('data')})",
                C.KIND_TRAIN_CLASSIFIER: f"the MNIST feature classifier ({sp.get('data')})"}[kind]
        loss = data.curves.get("loss", [])
        tail = f", last logged loss {fmt(loss[-1][1])}" if loss else ""
        return (f"Trained {what} with {sp.get('gpus', 1)} DDP process(es): {fmt(m.get('steps'))} steps, "
                f"{len(data.checkpoints)} checkpoint(s){tail}.")
    if kind == C.KIND_EVAL_TRANSLATOR:
        return (f"Evaluated translator checkpoint {sp.get('checkpoint_id')} (job {sp.get('train_job')}) on "
                f"{fmt(m.get('pairs', sp.get('test_pairs')))} test pairs of job {sp.get('latents')} in {n} shards: "
                f"PSNR {fmt(m.get('psnr'))} dB, SSIM {fmt(m.get('ssim'))} (identity baseline PSNR "
                f"{fmt(m.get('psnr_baseline'))} dB, SSIM {fmt(m.get('ssim_baseline'))}).")
    if kind == C.KIND_SAMPLE:
        return (f"Drew {sp.get('n')} digits by annealed Langevin dynamics from NCSN checkpoint "
                f"{sp.get('checkpoint_id')} (job {sp.get('train_job')}), seed {sp.get('seed', 0)}, in {n} shards.")
    if kind == C.KIND_EVAL_FID:
        return (f"Compared the {sp.get('n_fake')} samples of job {sp.get('samples')} with {sp.get('reference')} "
                f"({sp.get('reference_split')} split) using {m.get('feature_extractor', sp.get('feature_extractor'))}"
                f" features: FID {fmt(m.get('fid'))}, IS {fmt(m.get('is_mean'))} +/- {fmt(m.get('is_std'))}.")
    return f"A {kind} job of {n} shard(s)."


def section_summary(data: ReportData) -> str:
    """What it did: the sentence, state, counts, times and the full spec."""
    j = data.job
    t = shard_timings(data)
    a, b = _dt(j.get("started_at")), _dt(j.get("finished_at"))
    facts = [("state", j["state"]), ("shards", f"{j['shards_done']}/{j['shards_total']} done, "
                                               f"{j['shards_failed']} failed"),
             ("created", j.get("created_at")), ("started", j.get("started_at")), ("finished", j.get("finished_at")),
             ("wall time", fmt_seconds((b - a).total_seconds()) if a and b else "-"),
             ("shard time (sum)", fmt_seconds(t["busy"]) if t["rows"] else "-")]
    if j.get("error"):
        facts.append(("error", j["error"].splitlines()[0]))
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(fmt(v))}</dd>" for k, v in facts)
    spec = json.dumps(j.get("spec") or {}, indent=2, default=str)
    return (f'<section id="summary"><h2>What it did</h2><p class="lead">{esc(describe(data))}</p>'
            f"<dl>{dl}</dl><details><summary>Full spec</summary><pre>{esc(spec)}</pre></details></section>")


def section_lineage(data: ReportData) -> str:
    """The job's inputs and the jobs that consumed it."""
    return ('<section id="lineage"><h2>Lineage</h2><h3>Inputs</h3>'
            + _table(data.inputs, ["role", "kind", "ref", "detail"])
            + "<h3>Used by</h3>" + _table(data.used_by, ["job_id", "kind", "state", "role", "via"]) + "</section>")


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
    """Summary metrics, one curve per logged metric, and checkpoints."""
    rows = [{"name": k, "value": v} for k, v in data.summary.items()]
    out = ['<section id="metrics"><h2>Metrics</h2>', _table(rows, ["name", "value"])]
    names = sorted(data.curves, key=lambda n: (n != "loss", n))
    for name in names[:8]:
        out.append(svg_lines({name: data.curves[name]}, f"{name} per step", "step", name))
    if len(names) > 8:
        out.append(f'<p class="muted">{len(names) - 8} more curves: {esc(", ".join(names[8:]))}</p>')
    if data.checkpoints:
        out.append("<h3>Checkpoints</h3>" + _table(data.checkpoints, ["id", "step", "epoch", "reason", "created_at"]))
    return "".join(out) + "</section>"


def _image_artifacts(settings: Settings, artifacts: list[dict[str, Any]], limit: int) -> list[str]:
    from shared.storage import open_storage

    storage = open_storage(settings)
    out = []
    for a in [a for a in artifacts if a["kind"] == C.ARTIFACT_IMAGE][:limit]:
        meta = a.get("meta") or {}
        caption = f"{meta.get('what', 'image')} (shard {a.get('shard_index')}, {a['uri']})"
        try:
            png = embed_file(storage.resolve(a["uri"]))
        except Exception:
            png = None
        if png is None:
            out.append(f'<p class="warn">missing image {esc(a["uri"])}</p>')
        else:
            tag = img_tag(png, caption, "art", min_side=320)
            out.append(f"<figure>{tag}<figcaption>{esc(caption)}</figcaption></figure>")
    return out


def invert_examples(settings: Settings, data: ReportData, n: int = 4, decode: bool = True,
                    device: str = "cpu") -> str:
    """RGB and IR inputs of shard 0's first `n` pairs, their latents z_0 and z_t, and the VAE decodes of both."""
    import torch
    from safetensors import safe_open
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.models import Artifact, Item
    from shared.storage import input_path, open_storage
    from workers.ml.m3fd import Pair, load_image_pair

    with session_scope(settings) as s:
        rows = s.execute(select(Item.pair_id, Item.rgb_path, Item.ir_path, Item.position, Artifact.uri)
                         .join(Artifact, Artifact.id == Item.artifact_id)
                         .where(Item.job_id == data.job["id"]).order_by(Item.shard_index, Item.position)
                         .limit(n)).all()
    if not rows:
        return '<p class="muted">No latents recorded yet.</p>'
    storage = open_storage(settings)
    z: dict[str, list[torch.Tensor]] = {k: [] for k in ("z_rgb_0", "z_ir_0", "z_rgb_t", "z_ir_t")}
    files: dict[str, Any] = {}
    for _, _, _, pos, uri in rows:
        if uri not in files:
            with safe_open(str(storage.resolve(uri)), framework="pt") as f:
                files[uri] = {k: f.get_tensor(k) for k in z if k in f.keys()}
        for k in z:
            if k in files[uri]:
                z[k].append(files[uri][k][pos])
    lat = {k: torch.stack(v) for k, v in z.items() if len(v) == len(rows)}
    inv = (data.job.get("spec") or {}).get("inversion", {})
    notes, decoded = [], {}
    if decode:
        try:
            decoded = _vae_decode((data.job.get("spec") or {}).get("model"), lat, device)
        except Exception as e:
            notes.append(f"VAE decodes skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    head = ["pair", "input (what the VAE saw)", "z_0 (4 channels)", f"z_t, t = {inv.get('t_end')}",
            "VAE decode of z_0", "VAE decode of z_t"]
    body = []
    for i, (pid, rgb_path, ir_path, _, _) in enumerate(rows):
        try:
            pair = Pair(pid, input_path(rgb_path), input_path(ir_path))
            rgb, ir, _ = load_image_pair(pair, int(inv.get("size", 512)),
                                         inv.get("resize_to"))
            inputs = {"rgb": to_u8((rgb + 1) / 2), "ir": to_u8((ir + 1) / 2)}
        except Exception:
            inputs = {}
        for mod in ("rgb", "ir"):
            cells = [f"<th>{esc(pid)}<br>{mod.upper()}</th>"]
            src = inputs.get(mod)
            cells.append(f"<td>{img_tag(png_bytes(fit_side(src)), f'{pid} {mod} input')}</td>" if src is not None
                         else '<td class="muted">image missing</td>')
            for key in (f"z_{mod}_0", f"z_{mod}_t"):
                cells.append(f"<td>{img_tag(png_bytes(fit_side(latent_tile(lat[key][i]))), f'{pid} {key}')}</td>"
                             if key in lat else '<td class="muted">-</td>')
            for key in (f"z_{mod}_0", f"z_{mod}_t"):
                cells.append(f"<td>{img_tag(png_bytes(fit_side(to_u8(decoded[key][i]))), f'{pid} decode {key}')}"
                             "</td>" if key in decoded else '<td class="muted">-</td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
    note = "".join(f'<p class="warn">{esc(x)}</p>' for x in notes)
    return (f'{note}<table class="imgs"><thead><tr>{"".join(f"<th>{esc(h)}</th>" for h in head)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _vae_decode(model: str | None, lat: dict[str, Any], device: str) -> dict[str, Any]:
    """Decode latents with the VAE alone of the job's SD model (no U-Net or text encoder is loaded)."""
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKL

    from workers.ml.inversion import decode
    from workers.ml.sd import resolve_model

    if not model:
        raise ValueError("the job's spec names no model")
    import importlib.util

    fast = importlib.util.find_spec("accelerate") is not None  # diffusers' low-memory loading needs accelerate
    vae = AutoencoderKL.from_pretrained(resolve_model(model), subfolder="vae", local_files_only=True,
                                        torch_dtype=torch.float32, low_cpu_mem_usage=fast).to(device).eval()
    parts = SimpleNamespace(vae=vae, device=torch.device(device), dtype=torch.float32,
                            scaling_factor=float(vae.config.scaling_factor))
    return {k: decode(parts, v, max_batch=4).cpu() for k, v in lat.items()}


def section_pictures(settings: Settings, data: ReportData, examples: int, decode: bool, device: str) -> str:
    """The pictures that fit the job's kind (see the module docstring)."""
    kind = data.job["kind"]
    out = ['<section id="pictures"><h2>Pictures</h2>']
    if kind == C.KIND_INVERT:
        out.append("<h3>Latent and decoded examples</h3>")
        out.append(invert_examples(settings, data, examples, decode, device))
    elif kind in TRAIN_KINDS:
        loss = data.curves.get("loss")
        out.append(svg_lines({"loss": loss}, "Training loss", "step", "loss", width=860, height=320) if loss
                   else '<p class="muted">No loss logged yet.</p>')
    elif kind == C.KIND_EVAL_TRANSLATOR:
        out.append("<h3>RGB | predicted IR | real IR</h3>")
        out += _image_artifacts(settings, data.artifacts, 4) or ['<p class="muted">No grid recorded.</p>']
        for name in ("psnr", "ssim"):
            vals = list(data.per_item.get(name, {}).values())
            base = data.per_item.get(f"{name}_baseline", {})
            if vals:
                out.append(svg_histogram(vals, f"{name.upper()} per test pair (translator)", name))
            if base:
                out.append(svg_histogram(list(base.values()), f"{name.upper()} per test pair (identity baseline)",
                                         name))
        psnr = data.per_item.get("psnr", {})
        if psnr:
            worst = [{"pair": k, "psnr": v, "ssim": data.per_item.get("ssim", {}).get(k)}
                     for k, v in sorted(psnr.items(), key=lambda kv: kv[1])[:5]]
            out.append("<h3>Lowest-PSNR pairs</h3>" + _table(worst, ["pair", "psnr", "ssim"]))
    elif kind == C.KIND_SAMPLE:
        out.append("<h3>Sample grids</h3>")
        out += _image_artifacts(settings, data.artifacts, 4) or ['<p class="muted">No grid recorded.</p>']
    elif kind == C.KIND_EVAL_FID:
        m = data.summary
        rows = [{"metric": "FID", "value": m.get("fid")},
                {"metric": "IS", "value": f"{fmt(m.get('is_mean'))} +/- {fmt(m.get('is_std'))}"},
                {"metric": "feature extractor", "value": m.get("feature_extractor")},
                {"metric": "real / generated", "value": f"{fmt(m.get('n_real'))} / {fmt(m.get('n_fake'))}"}]
        out.append("<h3>FID and IS</h3>" + _table(rows, ["metric", "value"]))
        samples = next((i["ref"] for i in data.inputs if i["kind"] == "job" and i["role"] == "samples"), None)
        if samples:
            out.append(f"<h3>Samples (job {esc(samples)})</h3>")
            out += _image_artifacts(settings, gather(settings, samples).artifacts, 2) or [
                '<p class="muted">No sample grid recorded.</p>']
    if kind not in (C.KIND_EVAL_TRANSLATOR, C.KIND_SAMPLE):
        extra = _image_artifacts(settings, data.artifacts, 8)
        if extra:
            out += ["<h3>Images</h3>", *extra]
    return "".join(out) + "</section>"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:20px 28px;color:#1d2327;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}nav a{margin-right:14px}.lead{font-size:15px}
table{border-collapse:collapse;margin:6px 0 12px}th,td{border:1px solid #dde;padding:3px 8px;text-align:left;
vertical-align:middle}thead th{background:#f3f5f8}table.imgs td,table.imgs th{text-align:center}
table.imgs img{image-rendering:pixelated;display:block;margin:auto}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px}dt{color:#667}dd{margin:0}
pre{background:#f6f8fa;padding:10px;overflow:auto;max-height:360px}.muted{color:#889}.warn{color:#a15c00}
figure{margin:10px 0;display:inline-block;vertical-align:top}figcaption{color:#556;font-size:12px}
img.art{max-width:100%;image-rendering:pixelated}
svg text{font:11px system-ui,sans-serif;fill:#334}svg .lbl{fill:#556}svg .ax{stroke:#667}
svg .grid{stroke:#e4e7ec}svg .bar{fill:#5b8def}svg .ok{fill:#5b8def}svg .slow{fill:#f08c2e}svg .failed{fill:#d64545}
svg .inbar{fill:#fff;font-size:10px}.badge{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;
background:#778}.succeeded{background:#2a8a4a}.failed{background:#c33}.running{background:#2f6fd6}
"""


def render_report(settings: Settings, job_id: str, examples: int = 4, decode: bool = True,
                  device: str = "cpu") -> str:
    """The report page of `job_id` as one HTML string."""
    data = gather(settings, job_id)
    j = data.job
    sections = [section_summary(data), section_lineage(data), section_timings(data), section_metrics(data),
                section_pictures(settings, data, examples, decode, device)]
    nav = "".join(f'<a href="#{s}">{t}</a>' for s, t in (("summary", "What it did"), ("lineage", "Lineage"),
                                                          ("timings", "Timings"), ("metrics", "Metrics"),
                                                          ("pictures", "Pictures")))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{esc(j["id"])} ({esc(j["kind"])})</title>'
            f"<style>{CSS}</style></head><body><header><h1>{esc(j['id'])} "
            f'<span class="badge {esc(j["state"])}">{esc(j["state"])}</span></h1><div class="muted">{esc(j["kind"])}'
            f" job, report made {now}</div></header><nav>{nav}</nav>{''.join(sections)}</body></html>\n")


def write_report(settings: Settings, job_id: str, out: str | Path | None = None, examples: int = 4,
                 decode: bool = True, device: str = "cpu") -> Path:
    """Render the report and write it atomically to `out` (default report-JOB.html); returns the path."""
    import os
    import tempfile

    path = Path(out or f"report-{job_id}.html").expanduser()
    page = render_report(settings, job_id, examples, decode, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(page)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is meant to be shared like any other file
    os.replace(tmp, path)
    return path
