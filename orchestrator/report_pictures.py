"""The report's "Pictures" section: what fits the job's kind.

Invert: the inputs, their latents z_0 and z_t, and the VAE decodes the workers made at run time (workers/previews.py:
no model is loaded here). Training: the loss. Evaluation: RGB | predicted IR | real IR grids and per-pair
histograms. Sampling: the sample grids. FID: the FID/IS table (with a note when the sample is small) and the grids
of the sample job it scored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.report_charts import svg_histogram, svg_lines
from orchestrator.report_html import esc, fmt, table
from orchestrator.report_images import (
    ENLARGED,
    THUMB,
    embed_file,
    fit_side,
    img_tag,
    latent_tile,
    png_bytes,
    to_u8,
)
from shared import constants as C
from shared.settings import Settings

if TYPE_CHECKING:
    from orchestrator.report import ReportData

#: FIDs from fewer samples than this (either side) are biased upwards and noisy.
FID_SMALL_SAMPLE = 2000
#: Summary metrics the FID table shows (the metrics section leaves them out).
FID_TABLE_METRICS = ("fid", "is_mean", "is_std", "feature_extractor", "n_real", "n_fake")
RANDOM_MODEL_NOTE = ("The decodes come from a randomly initialised model (a test fixture, `orchestrator fixtures "
                     "tiny-sd`): they look like noise by design and say nothing about the pipeline.")


def is_preview(a: dict[str, Any]) -> bool:
    return bool((a.get("meta") or {}).get("preview"))


def image_artifacts(settings: Settings, artifacts: list[dict[str, Any]], limit: int) -> list[str]:
    """Figures of the job's image artifacts (previews aside: the examples table shows those)."""
    from shared.storage import open_storage

    storage = open_storage(settings)
    out = []
    for a in [a for a in artifacts if a["kind"] == C.ARTIFACT_IMAGE and not is_preview(a)][:limit]:
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


def _cell(png: bytes | None, alt: str, missing: str = "-") -> str:
    return f"<td>{img_tag(png, alt, display=THUMB)}</td>" if png else f'<td class="muted">{esc(missing)}</td>'


def invert_examples(settings: Settings, data: ReportData, n: int = 4, decode: bool = True) -> str:
    """The first `n` pairs (in shard order): inputs, latents z_0 and z_t, and the workers' VAE decodes of both."""
    import torch
    from safetensors import safe_open

    from shared.storage import input_path, open_storage
    from shared.store import store
    from workers.ml.m3fd import Pair, load_image_pair

    rows = store(settings).first_pairs(data.job["id"], n)
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
    previews = {((a.get("meta") or {}).get("pair_id"), a["meta"].get("latent")): a
                for a in data.artifacts if is_preview(a)} if decode else {}
    inv = (data.job.get("spec") or {}).get("inversion", {})
    random_model = any(a["meta"].get("random_model") for a in previews.values())
    label = " (random model)" if random_model else ""
    head = ["pair", "input (what the VAE saw)", "z_0 (4 channels)", f"z_t, t = {inv.get('t_end')}",
            f"VAE decode of z_0{label}", f"VAE decode of z_t{label}"]
    body = []
    for i, (pid, rgb_path, ir_path, _, _) in enumerate(rows):
        try:
            pair = Pair(pid, input_path(rgb_path), input_path(ir_path))
            rgb, ir, _ = load_image_pair(pair, int(inv.get("size", 512)), inv.get("resize_to"))
            inputs = {"rgb": to_u8((rgb + 1) / 2), "ir": to_u8((ir + 1) / 2)}
        except Exception:
            inputs = {}
        for mod in ("rgb", "ir"):
            cells = [f"<th>{esc(pid)}<br>{mod.upper()}</th>"]
            src = inputs.get(mod)
            if src is not None and max(src.shape[:2]) > ENLARGED:
                src = fit_side(src, ENLARGED)
            cells.append(_cell(png_bytes(src) if src is not None else None, f"{pid} {mod} input", "image missing"))
            for key in (f"z_{mod}_0", f"z_{mod}_t"):
                tile = png_bytes(fit_side(latent_tile(lat[key][i]))) if key in lat else None
                cells.append(_cell(tile, f"{pid} {key}"))
            for key in (f"z_{mod}_0", f"z_{mod}_t"):
                a = previews.get((pid, key))
                png = embed_file(storage.resolve(a["uri"])) if a else None
                cells.append(_cell(png, f"{pid} VAE decode of {key}{label}", "not decoded" if decode else "-"))
            body.append("<tr>" + "".join(cells) + "</tr>")
    notes = []
    if random_model:
        notes.append(f'<p class="warn">{esc(RANDOM_MODEL_NOTE)}</p>')
    if decode and not previews:
        notes.append('<p class="muted">No VAE decodes were recorded for this job (the workers decode the first '
                     "pairs of a job when they invert them; jobs from before that have none).</p>")
    return (f'{"".join(notes)}<table class="imgs"><thead><tr>{"".join(f"<th>{esc(h)}</th>" for h in head)}</tr>'
            f'</thead><tbody>{"".join(body)}</tbody></table>')


def fid_table(m: dict[str, Any]) -> str:
    """FID and IS with their extractor and sample counts; a note when either sample is small."""
    rows = [{"metric": "FID", "value": m.get("fid")},
            {"metric": "IS", "value": f"{fmt(m.get('is_mean'))} +/- {fmt(m.get('is_std'))}"},
            {"metric": "feature extractor", "value": m.get("feature_extractor")},
            {"metric": "real / generated", "value": f"{fmt(m.get('n_real'))} / {fmt(m.get('n_fake'))}"}]
    out = "<h3>FID and IS</h3>" + table(rows, ["metric", "value"])
    counts = [m.get(k) for k in ("n_real", "n_fake") if isinstance(m.get(k), (int, float))]
    if counts and min(counts) < FID_SMALL_SAMPLE:
        out += (f'<p class="warn small-sample">Small sample: FID from {fmt(min(counts))} images (fewer than '
                f"{FID_SMALL_SAMPLE:,}) is biased upwards and noisy. Compare it only with FIDs computed on the same "
                "numbers of images with the same feature extractor.</p>")
    return out


def _invert_examples(settings: Settings, data: ReportData, examples: int, decode: bool) -> str:
    return "<h3>Latent and decoded examples</h3>" + invert_examples(settings, data, examples, decode)


def _loss(settings: Settings, data: ReportData, examples: int, decode: bool) -> str:
    loss = data.curves.get("loss") or []
    if len(loss) > 1:
        return svg_lines({"loss": loss}, "Training loss", "step", "loss", width=860, height=320)
    if loss:
        return f'<p class="one-point">Training loss: {esc(fmt(loss[0][1]))} (logged once, at step {loss[0][0]})</p>'
    return '<p class="muted">No loss logged yet.</p>'


def _eval_grids(settings: Settings, data: ReportData, examples: int, decode: bool) -> str:
    out = ["<h3>RGB | predicted IR | real IR</h3>"]
    out += image_artifacts(settings, data.artifacts, 4) or ['<p class="muted">No grid recorded.</p>']
    for name in ("psnr", "ssim"):
        vals = list(data.per_item.get(name, {}).values())
        base = data.per_item.get(f"{name}_baseline", {})
        if vals:
            out.append(svg_histogram(vals, f"{name.upper()} per test pair (translator)", name))
        if base:
            out.append(svg_histogram(list(base.values()), f"{name.upper()} per test pair (identity baseline)", name))
    psnr = data.per_item.get("psnr", {})
    if psnr:
        worst = [{"pair": k, "psnr": v, "ssim": data.per_item.get("ssim", {}).get(k)}
                 for k, v in sorted(psnr.items(), key=lambda kv: kv[1])[:5]]
        out.append("<h3>Lowest-PSNR pairs</h3>" + table(worst, ["pair", "psnr", "ssim"]))
    return "".join(out)


def _sample_grids(settings: Settings, data: ReportData, examples: int, decode: bool) -> str:
    grids = image_artifacts(settings, data.artifacts, 4) or ['<p class="muted">No grid recorded.</p>']
    return "<h3>Sample grids</h3>" + "".join(grids)


def _fid_table(settings: Settings, data: ReportData, examples: int, decode: bool) -> str:
    """The FID/IS table, then the grids of the sample job it scored."""
    from orchestrator.report import gather

    out = [fid_table(data.summary)]
    samples = next((i["ref"] for i in data.inputs if i["kind"] == "job" and i["role"] == "samples"), None)
    if samples:
        out.append(f"<h3>Samples (job {esc(samples)})</h3>")
        out += image_artifacts(settings, gather(settings, samples).artifacts, 2) or [
            '<p class="muted">No sample grid recorded.</p>']
    return "".join(out)


def _images(settings: Settings, data: ReportData, examples: int, decode: bool) -> str:
    extra = image_artifacts(settings, data.artifacts, 8)
    return "".join(["<h3>Images</h3>", *extra]) if extra else ""


#: The picture blocks a kind names in its ``pictures`` (kinds/base.py PICTURES), in the order it names them.
BLOCKS = {"invert_examples": _invert_examples, "loss": _loss, "eval_grids": _eval_grids,
          "sample_grids": _sample_grids, "fid_table": _fid_table, "images": _images}


def section_pictures(settings: Settings, data: ReportData, examples: int, decode: bool) -> str:
    """The pictures that the job's kind asks for (see the module docstring)."""
    import kinds

    kind = kinds.find(data.job["kind"])
    out = ['<section id="pictures"><h2>Pictures</h2>',
           '<p class="muted">Click a picture to enlarge it; click elsewhere to close it.</p>']
    for name in kind.pictures if kind is not None else ("images",):
        out.append(BLOCKS[name](settings, data, examples, decode))
    return "".join(out) + "</section>"
