"""`orchestrator watch JOB`: live progress of a job from the results DB until it ends.

On a terminal: progress bars redrawn in place by `rich` (its Live display and progress bars), one for the job (shards
done plus the running shards' fractions, rate, ETA) and one per running shard or training run (items done, rate,
ETA; epoch, step, loss for training). Elsewhere (a pipe, a log file, CI): plain lines, one whenever something
changed; `--json`: one JSON object per change. The frame's text (what each line says, and what a narrow terminal
drops) is built once, here; rich draws it.
Progress comes from each shard's `progress` column, which the worker's heartbeat writes (every lease/4 seconds), so
it works the same on every broker and needs no Flower.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TextIO

from orchestrator.watch_view import JobView, ShardView, snapshot  # noqa: F401 (re-exported)
from shared import constants as C
from shared.settings import Settings
from shared.status import JobState, ShardState

#: Keys of a shard's progress that are bookkeeping, not something to show.
_HIDDEN = {"job_id", "shard", "done", "total", "epoch", "loss", "resumed_from", "world_size", "unit"}


# -- rates ------------------------------------------------------------------------------------------------------------


class RateTracker:
    """Items per second of each running shard, from the progress watch itself saw change.

    The first reading of a shard is the baseline, so a training run resumed at step 5000 is not credited with 5000
    steps in its first seconds; until a second reading differs, a `*_per_s` rate the worker reported (not for
    training, whose samples/s is not steps/s) or done/elapsed stands in.
    """

    def __init__(self) -> None:
        self._first: dict[tuple[int, int], tuple[float, float]] = {}

    def rate(self, shard: ShardView, now: float, training: bool) -> float | None:
        """Items (steps when training) per second of `shard` at monotonic time `now`; None while unknown."""
        key = (shard.index, shard.attempts)
        first = self._first.setdefault(key, (now, shard.done))
        dt, dd = now - first[0], shard.done - first[1]
        if dt > 0 and dd > 0:
            return dd / dt
        if not training and not shard.progress.get("unit"):  # a `*_per_s` rate counts items, not the unit
            for k, v in shard.progress.items():
                if k.endswith("_per_s") and isinstance(v, (int, float)) and v > 0:
                    return float(v)
        if shard.started_at is not None and shard.done > 0 and not shard.progress.get("resumed_from"):
            secs = (datetime.now(timezone.utc) - shard.started_at).total_seconds()
            return shard.done / secs if secs > 0 else None
        return None


def eta_of(shard: ShardView, rate: float | None) -> float | None:
    """Seconds left of a running shard at `rate` units per second (None while unknown)."""
    return (shard.total - shard.done) / rate if rate and shard.total > shard.done else None


def describe_running(view: JobView, shard: ShardView, rate: float | None) -> str:
    """A running shard for `status`: done/total, rate and ETA as `watch` has them, or how long it ran without any."""
    p = shard.progress
    if not p.get("done") and not p.get("total"):
        since = (view.now - shard.started_at).total_seconds() if shard.started_at else None
        return f"started {fmt_duration(since)} ago, no progress reported yet" if since is not None else "starting"
    unit = unit_of(shard, view.training)
    parts = [f"{int(shard.done)}/{int(shard.total)} {unit} ({100 * shard.fraction:.0f}%)" if shard.total
             else f"{int(shard.done)} {unit}"]
    if rate:
        parts.append(f"{rate:.3g}/s")
    eta = eta_of(shard, rate)
    if eta is not None:
        parts.append(f"ETA {fmt_duration(eta)}")
    parts += [f"{k}={fmt_num(v)}" for k, v in p.items() if k not in _HIDDEN and v is not None]
    return ", ".join(parts)


def unit_of(shard: ShardView, training: bool) -> str:
    """What the shard counts: steps for training, else the noun of its `<noun>_per_s` rate (pairs, samples)."""
    if training:
        return "steps"
    if shard.progress.get("unit"):  # U-Net calls, Langevin steps: progress that moves inside a batch
        return str(shard.progress["unit"]).replace("_", " ")
    for k in shard.progress:
        if k.endswith("_per_s"):
            return k[: -len("_per_s")]
    return "items"


# -- formatting -------------------------------------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    """45s, 3m05s, 2h03m; '-' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_num(v: Any) -> str:
    """Floats to 4 significant digits (a loss of 0.041234 reads 0.04123), anything else as str."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def bar(fraction: float, width: int) -> str:
    """[#####.....] of `width` cells inside the brackets."""
    width = max(1, width)
    n = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * n + "." * (width - n) + "]"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "~"


@dataclass(frozen=True)
class BarLine:
    """A line with a bar: `head [bar] tail` in `width` columns; ``str()`` is its plain-text form."""

    head: str
    fraction: float
    bar_cells: int
    tail: str
    width: int

    def __str__(self) -> str:
        return _fit(f"{self.head} {bar(self.fraction, self.bar_cells)} {self.tail}", self.width)


def _with_bar(head: str, fraction: float, parts: list[str], width: int, max_bar: int = 30, reserve: int = 48,
              optional: tuple[str, ...] = ()) -> BarLine:
    """`head [bar] parts...` in `width` columns.

    The bar's width depends only on the terminal (so it does not jump between frames): what is left after `reserve`
    columns for the parts, between 8 and `max_bar` cells. Trailing parts that do not fit are dropped (the last
    first); `optional` parts are added only where room is left.
    """
    bw = max(8, min(max_bar, width - len(head) - 4 - reserve))
    parts = list(parts)

    def length(ps: list[str]) -> int:
        return len(head) + bw + 4 + len("  ".join(ps))

    while len(parts) > 1 and length(parts) > width:
        parts.pop()
    for extra in optional:
        if length([*parts, extra]) <= width:
            parts.append(extra)
    return BarLine(head, fraction, bw, "  ".join(parts), width)


def shard_line(view: JobView, shard: ShardView, rate: float | None, width: int) -> BarLine:
    """One running shard (or training run) with its bar, counts, rate and ETA, fitted to `width`.

    What matters most comes first and survives a narrow terminal: done/total, ETA, then loss/epoch or the rate;
    the worker is shown only where room is left.
    """
    p = shard.progress
    unit = unit_of(shard, view.training)
    head = f"  {'run' if view.training else f'shard {shard.index}':<9}"
    eta = eta_of(shard, rate)
    parts = []
    if view.training:
        parts.append(f"step {int(shard.done)}/{int(shard.total)}" if shard.total else f"step {int(shard.done)}")
        if shard.total:
            parts.append(f"ETA {fmt_duration(eta)}")
        if p.get("loss") is not None:
            parts.append(f"loss {fmt_num(p['loss'])}")
        if p.get("epoch") is not None:
            parts.append(f"epoch {p['epoch']}")
        if p.get("samples_per_s"):
            parts.append(f"{fmt_num(p['samples_per_s'])} samples/s")
    else:
        parts.append(f"{int(shard.done)}/{int(shard.total)} {unit}" if shard.total else f"{int(shard.done)} {unit}")
        if shard.total:
            parts.append(f"ETA {fmt_duration(eta)}")
        if rate:
            parts.append(f"{rate:.3g}/s")
        parts += [f"{k}={fmt_num(v)}" for k, v in p.items()
                  if k not in _HIDDEN and not k.endswith("_per_s") and v is not None][:2]
    worker = (shard.worker or "").split(":", 1)[0]
    return _with_bar(head, shard.fraction, parts, width, max_bar=20, reserve=50,
                     optional=(f"on {worker}",) if worker else ())


def job_line(view: JobView, width: int) -> BarLine:
    """The job's bar: shards done, running, failed, pace and ETA."""
    parts = [f"{100.0 * view.fraction:3.0f}%", f"{view.shards_done}/{view.shards_total} shards"]
    running = view.by_state.get(ShardState.RUNNING.value, 0)
    if running:
        parts.append(f"{running} running")
    if view.shards_failed:
        parts.append(f"{view.shards_failed} failed")
    if not view.training and view.elapsed > 0 and view.fraction > 0 and not view.finished:
        parts.append(f"{view.fraction * view.shards_total / view.elapsed * 60:.3g} shards/min")
    if not view.finished:
        parts.append(f"ETA {fmt_duration(view.eta)}")
    return _with_bar("  job      ", view.fraction, parts, width, max_bar=30, reserve=48)


def header_line(view: JobView, width: int) -> str:
    """`JOB  KIND  STATE  ELAPSED`."""
    return _fit(f"{view.job_id}  {view.kind}  {view.state}  {fmt_duration(view.elapsed)}", width)


def render_frame(view: JobView, rates: dict[int, float | None], width: int = 80, max_shards: int = 12) -> list[str]:
    """The lines of one redraw as plain text, each at most `width` characters."""
    return [str(line) for line in frame_lines(view, rates, width, max_shards)]


def frame_lines(view: JobView, rates: dict[int, float | None], width: int = 80,
                max_shards: int = 12) -> list[str | BarLine]:
    """The lines of one redraw (text, or a line with a bar), each at most `width` characters."""
    lines: list[str | BarLine] = [header_line(view, width), job_line(view, width)]
    for sh in view.running[:max_shards]:
        lines.append(shard_line(view, sh, rates.get(sh.index), width))
    if len(view.running) > max_shards:
        lines.append(f"  ... and {len(view.running) - max_shards} more running")
    if not view.running and not view.finished:
        queued = view.by_state.get(ShardState.QUEUED.value, 0) + view.by_state.get(ShardState.PENDING.value, 0)
        lines.append(_fit(f"  waiting for a worker ({queued} shard(s) queued)", width))
    if view.finished:
        lines.append(_fit(final_line(view), width))
    return lines


def final_line(view: JobView) -> str:
    """The last line: end state, shards, wall time and the first line of the error, if any."""
    text = f"{view.job_id}: {view.state} ({view.shards_done}/{view.shards_total} shards) in {fmt_duration(view.elapsed)}"
    if view.error:
        text += f"; error: {view.error.splitlines()[0]}"
    return text


def plain_line(view: JobView, rates: dict[int, float | None]) -> str:
    """One line for logs: the job, then each running shard's done/total (training: step, epoch, loss)."""
    text = f"{view.job_id} {view.state} {view.shards_done}/{view.shards_total} shards ({100.0 * view.fraction:.0f}%)"
    if view.training and view.running:
        sh = view.running[0]
        p = sh.progress
        text += f" step {int(sh.done)}/{int(sh.total)}"
        if p.get("epoch") is not None:
            text += f" epoch {p['epoch']}"
        if p.get("loss") is not None:
            text += f" loss {fmt_num(p['loss'])}"
    elif view.running:
        text += " | " + " ".join(f"s{sh.index} {int(sh.done)}/{int(sh.total)}" for sh in view.running[:8])
        if len(view.running) > 8:
            text += f" +{len(view.running) - 8}"
    return text


def as_record(view: JobView, rates: dict[int, float | None]) -> dict[str, Any]:
    """The view as a JSON-able dict (for --json)."""
    running = []
    for sh in view.running:
        r = rates.get(sh.index)
        eta = eta_of(sh, r)
        running.append({"shard": sh.index, "worker": sh.worker, "attempts": sh.attempts,
                        "done": sh.progress.get("done"), "total": sh.progress.get("total"),
                        "rate_per_s": round(r, 6) if r else None, "eta_s": round(eta, 3) if eta else None,
                        **{k: v for k, v in sh.progress.items() if k not in ("job_id", "shard", "done", "total")}})
    eta = view.eta
    return {"job_id": view.job_id, "kind": view.kind, "state": view.state, "shards_total": view.shards_total,
            "shards_done": view.shards_done, "shards_failed": view.shards_failed, "shards_by_state": view.by_state,
            "fraction": round(view.fraction, 6), "elapsed_s": round(view.elapsed, 3),
            "eta_s": round(eta, 3) if eta is not None else None, "running": running, "error": view.error}


def _change_key(view: JobView, rates: dict[int, float | None], as_json: bool) -> str:
    """What must differ between two readings for a new plain line or JSON record (not the clock)."""
    if not as_json:
        return plain_line(view, rates)
    rec = as_record(view, rates)
    for k in ("elapsed_s", "eta_s"):
        rec.pop(k)
    for r in rec["running"]:
        r.pop("rate_per_s")
        r.pop("eta_s")
    return json.dumps(rec, default=str, sort_keys=True)


# -- the loop ---------------------------------------------------------------------------------------------------------


def watch(settings: Settings, job_id: str, out: TextIO | None = None, interval: float = 1.0,
          timeout: float | None = None, as_json: bool = False, tty: bool | None = None,
          width: int | None = None) -> int:
    """Follow the job until it ends (or `timeout` seconds pass); exit status 0 if it succeeded, else 1.

    `tty` None asks `out.isatty()`; `width` None asks the terminal (80 when unknown).
    """
    out = out or sys.stdout
    tty = (not as_json) and (out.isatty() if tty is None else tty)
    rates_of = RateTracker()
    screen = None
    if tty:
        from orchestrator.watch_screen import Screen, rich_frame

        screen = Screen(out, width)
    last_plain = None
    deadline = None if timeout is None else time.monotonic() + timeout
    view = snapshot(settings, job_id)
    try:
        while True:
            now = time.monotonic()
            rates = {sh.index: rates_of.rate(sh, now, view.training) for sh in view.running}
            if screen is not None:
                screen.draw(rich_frame(view, rates, max(40, screen.width - 1)))
            else:
                key = _change_key(view, rates, as_json)
                if key != last_plain:
                    if as_json:
                        out.write(json.dumps(as_record(view, rates), default=str) + "\n")
                    else:
                        out.write(time.strftime("%H:%M:%S ") + plain_line(view, rates) + "\n")
                    out.flush()
                    last_plain = key
            if view.finished:
                if screen is None and not as_json:
                    out.write(final_line(view) + "\n")
                    out.flush()
                return C.EXIT_OK if view.state == JobState.SUCCEEDED else C.EXIT_JOB_FAILED
            if deadline is not None and time.monotonic() > deadline:
                if not as_json:
                    out.write(f"{job_id}: still {view.state} after {timeout:g} s (timeout)\n")
                    out.flush()
                return C.EXIT_JOB_FAILED
            time.sleep(interval)
            view = snapshot(settings, job_id)
    finally:
        if screen is not None:
            screen.close()
