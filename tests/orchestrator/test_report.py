"""`orchestrator report`: self-contained HTML pages of real jobs, rendered in headless Chromium.

The pipeline invert -> train-translator (torchrun, 1 process) -> eval-translator runs in-process on the tiny fixtures;
the NCSN pages use a sample job and an eval-fid job recorded with the real recording helpers (real MNIST digits as
the samples), since training an NCSN here would cost a minute. Chromium checks that every image decodes and every
chart draws; the charts' numbers are read back from the page's SVG paths (orchestrator/report_charts.py gives each
plotted artist an id).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from orchestrator import jobs, queries
from orchestrator import report as rp
from orchestrator import submit as submit_mod
from orchestrator.report_charts import chart_id
from orchestrator.report_pictures import RANDOM_MODEL_NOTE
from shared import constants as C
from tests.conftest import CI, embedded_settings
from tests.orchestrator.conftest import invert_args
from tests.orchestrator.test_report_charts import (
    artist_path,
    assert_affine,
    assert_curve,
    assert_histogram,
    without_namespaces,
)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]

#: Appended to a copy of a page: once everything loaded, count the images that really decoded, the charts, the
#: charts laid out with a size and at least one plotted artist of non-empty extent, and the plotted artists.
CHECK_JS = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  const charts = [...document.querySelectorAll("figure.chart svg")];
  const artists = s => [...s.querySelectorAll('g[id^="chart-"] > path, g[id^="chart-"] use')];
  const d = document.createElement("pre"); d.id = "page-check";
  d.textContent = JSON.stringify({images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    charts: charts.length,
    drawn: charts.filter(s => s.getBoundingClientRect().width > 100 && artists(s).some(a => {
      const b = a.getBBox(); return b.width > 0 || b.height > 0; })).length,
    artists: document.querySelectorAll('figure.chart g[id^="chart-"]').length,
    text: document.body.innerText.length});
  document.body.appendChild(d);
});</script>"""


def chromium_path() -> str:
    """Debian's chromium; skip without it, fail when CI is set (.ci/run installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        msg = "chromium not installed (apt-get install -y chromium)"
        if CI:
            pytest.fail(f"{msg}, and CI is set: the browser tests must run in CI")
        pytest.skip(msg)
    return path


def run_chromium(url: str, tmp: Path, *, screenshot: Path | None = None, dump_dom: bool = False,
                 window: str = "1280,900", timeout: float = 90.0) -> str:
    """Load `url` in a fresh headless Chromium profile; return the serialised DOM (dump_dom) or ''."""
    exe = chromium_path()
    profile = tmp / f"chromium-profile-{uuid.uuid4().hex[:8]}"
    args = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window}",
            "--virtual-time-budget=5000"]
    if screenshot is not None:
        args.append(f"--screenshot={screenshot}")
    if dump_dom:
        args.append("--dump-dom")
    env = {**os.environ, "HOME": str(tmp)}  # chromium writes caches under HOME
    try:
        out = subprocess.run([*args, url], capture_output=True, text=True, timeout=timeout, env=env)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if screenshot is not None:
        assert screenshot.is_file() and screenshot.stat().st_size > 1000, out.stderr[-2000:]
    return out.stdout


def check_page(html_path: Path, tmp: Path, screenshot: Path | None = None, window: str = "1280,900") -> dict:
    """Render a copy of the page with CHECK_JS in Chromium (saving a screenshot if asked); return its counts."""
    probe = tmp / f"probe-{html_path.name}"
    probe.write_text(html_path.read_text().replace("</body>", CHECK_JS + "</body>"))
    dom = run_chromium(probe.as_uri(), tmp, dump_dom=True, screenshot=screenshot, window=window)
    m = re.search(r'<pre id="page-check">([^<]*)</pre>', dom)
    assert m, dom[-2000:]
    return json.loads(m.group(1).replace("&quot;", '"'))


def screenshot_is_not_blank(png: Path) -> None:
    import cv2

    img = cv2.imread(str(png))
    assert img is not None and img.std() > 5.0  # a blank page would be one flat colour


def _create_only(fn, settings, args):
    orig = submit_mod.jobs.submit
    submit_mod.jobs.submit = lambda st, kind, spec, n, *rows: jobs.create_job(st, kind, spec, n, *rows)
    try:
        return fn(settings, args)
    finally:
        submit_mod.jobs.submit = orig


def _record_ncsn_jobs(s) -> tuple[str, str]:
    """A finished sample job (2 shards of real MNIST digits as samples) and an eval-fid job that consumed it."""
    from shared.storage import Storage
    from workers import bookkeeping as bk
    from workers.ml.mnist import load_mnist
    from workers.recording import record_artifact, record_metrics
    from workers.tasks.ncsn import GRID_SAMPLES, digits_grid_png

    digits, _ = load_mnist("mnist:embedded", "test")
    storage = Storage(s.storage)
    sample_id = jobs.create_job(s, "sample", {"n": 128, "shards": 2, "seed": 3, "checkpoint_id": 1,
                                                   "train_job": "train-x"}, 2,
                                lineage=[("checkpoint", "1", "score-model")])
    for i in range(2):
        owner = bk.make_owner()
        assert bk.claim_shard(s, sample_id, i, owner).ok
        grid = storage.write_bytes(f"jobs/{sample_id}/samples/shard-{i:05d}.png",
                                   digits_grid_png(digits[i * 64 : i * 64 + GRID_SAMPLES]))
        assert bk.complete_shard(s, sample_id, i, owner,
                                 lambda ss, g=grid, k=i: record_artifact(ss, sample_id, k, C.ARTIFACT_IMAGE, g,
                                                                         {"what": "sample grid"}),
                                 {"n": 64, "seconds": 0.5})
    fid_id = jobs.create_job(s, "eval-fid", {"samples": sample_id, "reference": "mnist:embedded",
                                                  "reference_split": "test", "n_fake": 128,
                                                  "features": "mnist-classifier",
                                                  "feature_extractor": "mnist-classifier (checkpoint 2)"}, 1,
                             lineage=[("job", sample_id, "samples"), ("data", "mnist:embedded", "reference")])
    owner = bk.make_owner()
    assert bk.claim_shard(s, fid_id, 0, owner).ok
    values = {"fid": 12.5, "is_mean": 8.25, "is_std": 0.5, "n_real": 1000.0, "n_fake": 128.0}
    assert bk.complete_shard(s, fid_id, 0, owner, lambda ss: record_metrics(ss, fid_id, values),
                             {**values, "feature_extractor": "mnist-classifier (checkpoint 2)"})
    return sample_id, fid_id


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_sd, m3fd_small):
    """invert (4 shards) -> train-translator -> eval-translator (2 shards), plus sample -> eval-fid."""
    from workers.runner import run_shard
    from workers.tasks.evaluate import eval_translator_work
    from workers.tasks.invert import invert_work
    from workers.tasks.train import train_work

    s = embedded_settings(tmp_path_factory.mktemp("report") / "orch")
    s.ensure_local_folders()
    inv = _create_only(submit_mod.submitter("invert"), s, invert_args(m3fd_small, tiny_sd, shards=4))
    for i in range(4):  # this process is the worker
        run_shard(s, inv, i, invert_work)
    assert jobs.get_job(s, inv).state == "succeeded"
    targs = argparse.Namespace(latents=inv, preset="readme", epochs=4, lr=3e-3, weight_decay=0.0, batch_size=4,
                               gpus=1, base_channels=8, depth=2, amp=False, checkpoint_every=0, max_steps=None,
                               log_every=1, seed=0)
    train = _create_only(submit_mod.submitter("train-translator"), s, targs)
    run_shard(s, train, 0, train_work)
    assert jobs.get_job(s, train).state == "succeeded"
    ckpt = int(queries.summary_metrics(s, train)["final_checkpoint_id"])
    ev = _create_only(submit_mod.submitter("eval-translator"), s, argparse.Namespace(checkpoint=ckpt, shards=2,
                                                                               batch_size=4))
    for i in range(2):
        run_shard(s, ev, i, eval_translator_work)
    assert jobs.get_job(s, ev).state == "succeeded"
    sample, fid = _record_ncsn_jobs(s)
    return {"settings": s, "invert": inv, "train": train, "eval": ev, "sample": sample, "fid": fid}


@pytest.mark.slow
def test_invert_report_shows_latents_decodes_timings_and_renders(pipeline, tmp_path):
    s, inv = pipeline["settings"], pipeline["invert"]
    out = rp.write_report(s, inv, tmp_path / "invert.html", examples=3)
    page = out.read_text()
    # self-contained: every image is a data URI, nothing is fetched (the only URLs are the SVG namespaces)
    assert re.findall(r'(?:src|href)="(?!data:|#)', page) == []
    assert "http://" not in without_namespaces(page) and "https://" not in page
    assert "<script" not in page
    # 3 pairs x (RGB, IR) x (input, z_0, z_t, decode z_0, decode z_t)
    assert page.count('src="data:image/png;base64,') == 3 * 2 * 5
    # the decodes are the workers' preview artifacts (no model is loaded here), labelled as a random model's
    assert "not decoded" not in page
    assert len(re.findall(r'alt="[^"]* VAE decode of z_rgb_0 \(random model\)"', page)) == 3
    assert RANDOM_MODEL_NOTE in page
    # every picture is at least 128 px on the page and enlarges on click (focusable, CSS :focus)
    tags = re.findall(r"<img [^>]*>", page)
    assert len(tags) == 30 and all('class="zoom" tabindex="0"' in t for t in tags)
    assert all(max(int(w), int(h)) >= 128 for t in tags for w, h in re.findall(r'width="(\d+)" height="(\d+)"', t))
    gantt = chart_id("Shard durations per worker (orange: stragglers, red: failed)")
    assert len(re.findall(rf'<g id="{gantt}-(?:ok|slow)-\d+">', page)) == 4  # one bar per shard, none failed
    assert "Used by" in page and pipeline["train"] in page and pipeline["eval"] in page  # lineage downstream
    shot = tmp_path / "report-invert.png"
    counts = check_page(out, tmp_path, screenshot=shot, window="1280,2000")
    assert counts["images"] == counts["decoded"] == 30, counts
    assert counts["charts"] == counts["drawn"] == page.count('<figure class="chart"') >= 1, counts
    assert counts["artists"] == len(re.findall(r'<g id="chart-', page)), counts
    screenshot_is_not_blank(shot)


@pytest.mark.slow
def test_training_and_evaluation_reports(pipeline, tmp_path):
    s = pipeline["settings"]
    train = rp.write_report(s, pipeline["train"], tmp_path / "train.html")
    page = train.read_text()
    loss = queries.metric_history(s, pipeline["train"], "loss")
    assert len(loss) >= 4
    # the loss curve, drawn once (under Pictures), with a vertex per logged step at its value
    assert_curve(page, f"{chart_id('Training loss')}-line-0", loss)
    assert page.count("<figcaption>Training loss</figcaption>") == 1 and "loss per step" not in page
    others = sum(len(c) > 1 for n, c in rp.gather(s, pipeline["train"]).curves.items() if n != "loss")
    assert page.count(' per step</figcaption></figure>') == min(8, others)  # a curve per other metric logged often
    # a finished job gives the same page each time, but for the time it was made
    made = re.compile(r"report made [^<]*")
    assert made.sub("", rp.render_report(s, pipeline["train"])) == made.sub("", page)
    assert "Checkpoints" in page and pipeline["invert"] in page  # lineage: trained on the invert job's latents
    # the eval job used this job twice (its checkpoint and the job itself): one "Used by" row naming both
    assert page.count(pipeline["eval"]) == 1
    row = re.search(rf"<tr><td>{pipeline['eval']}</td>.*?</tr>", page).group(0)
    assert "translator" in row and "training" in row and "checkpoint" in row and "job " in row
    counts = check_page(train, tmp_path)
    assert counts["charts"] == counts["drawn"] == page.count('<figure class="chart"'), counts
    assert counts["images"] == counts["decoded"]

    ev = rp.write_report(s, pipeline["eval"], tmp_path / "eval.html")
    page = ev.read_text()
    assert "RGB | predicted IR | real IR" in page
    assert "PSNR per test pair (translator)" in page and "SSIM per test pair (identity baseline)" in page
    m = queries.summary_metrics(s, pipeline["eval"])
    assert f"PSNR {m['psnr']:.4g} dB" in page  # the sentence of what it did quotes the recorded summary
    per_item = rp.gather(s, pipeline["eval"]).per_item
    for name in ("psnr", "ssim"):
        assert_histogram(page, f"{name.upper()} per test pair (translator)", list(per_item[name].values()))
        assert_histogram(page, f"{name.upper()} per test pair (identity baseline)",
                         list(per_item[f"{name}_baseline"].values()))
    assert made.sub("", rp.render_report(s, pipeline["eval"])) == made.sub("", page)
    counts = check_page(ev, tmp_path, screenshot=tmp_path / "report-eval.png", window="1280,1800")
    assert counts["images"] >= 1 and counts["decoded"] == counts["images"], counts
    assert counts["charts"] == counts["drawn"] >= 4, counts  # the four histograms at least
    screenshot_is_not_blank(tmp_path / "report-eval.png")


@pytest.mark.slow
def test_ncsn_reports_show_sample_grids_and_fid_table(pipeline, tmp_path):
    s = pipeline["settings"]
    sample = rp.write_report(s, pipeline["sample"], tmp_path / "sample.html")
    assert sample.read_text().count("<figcaption>sample grid (shard") == 2
    fid = rp.write_report(s, pipeline["fid"], tmp_path / "fid.html")
    page = fid.read_text()
    assert "<h3>FID and IS</h3>" in page and "<td>12.5</td>" in page and "8.25 +/- 0.5" in page
    assert page.count("<td>12.5</td>") == 1  # the FID table only, not the metrics table again
    assert 'class="warn small-sample"' in page and "FID from 128 images" in page  # 128 generated < 2,000
    assert "mnist-classifier (checkpoint 2)" in page
    assert f"Samples (job {pipeline['sample']})" in page  # grids come from the sample job named in the lineage
    for path in (sample, fid):
        counts = check_page(path, tmp_path)
        assert counts["images"] == counts["decoded"] >= 2, counts


@pytest.mark.slow
def test_report_cli_writes_the_file_and_rejects_unknown_jobs(pipeline, tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main

    s = pipeline["settings"]
    monkeypatch.setenv("ORCH_HOME", str(s.home))
    for var in ("ORCH_BROKER_URL", "ORCH_DATABASE_URL", "ORCH_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "r.html"
    assert main(["report", pipeline["fid"], "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == str(out.resolve()) and printed["bytes"] == out.stat().st_size > 1000
    assert main(["report", "nope-123"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no job 'nope-123'") and "\n" not in err


def test_stragglers_are_the_shards_far_above_the_median():
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    durations = [2.0, 2.1, 1.9, 2.2, 9.0, 2.0]
    shards = [{"index": i, "worker": f"w{i % 2}", "state": "done", "attempts": 1,
               "started_at": (t0 + timedelta(seconds=i)).isoformat(),
               "finished_at": (t0 + timedelta(seconds=i + d)).isoformat()} for i, d in enumerate(durations)]
    data = rp.ReportData({"started_at": t0.isoformat(), "created_at": t0.isoformat()}, shards, {}, {}, {}, [], [],
                         [], [])
    t = rp.shard_timings(data)
    assert [r["index"] for r in t["rows"] if r["straggler"]] == [4]
    assert t["median"] == pytest.approx(2.05) and t["max"] == pytest.approx(9.0)
    svg = rp.svg_gantt([{"worker": r["worker"], "start": r["start"], "end": r["end"], "short": str(r["index"]),
                         "label": f"shard {r['index']}", "cls": "slow" if r["straggler"] else "ok"}
                        for r in t["rows"]], "g")
    assert re.findall(r'<g id="chart-g-slow-(\d+)">', svg) == ["4"]
    assert re.findall(r'<g id="chart-g-ok-(\d+)">', svg) == ["0", "1", "2", "3", "5"]
    assert '<g id="chart-g-slow-4"><title>shard 4: 9.00 s</title>' in svg
    # each bar spans its shard's start and end on one linear time axis
    bars = {r["index"]: artist_path(svg, f"chart-g-{'slow' if r['straggler'] else 'ok'}-{r['index']}")
            for r in t["rows"]}
    assert_affine([bars[r["index"]][:, 0].min() for r in t["rows"]] + [bars[r["index"]][:, 0].max() for r in t["rows"]],
                  [r["start"] for r in t["rows"]] + [r["end"] for r in t["rows"]])


def test_latent_tile():
    z = np.stack([np.full((4, 5), k, np.float32) + np.arange(20, dtype=np.float32).reshape(4, 5)
                  for k in range(4)])
    tile = rp.latent_tile(z)
    assert tile.shape == (8, 10) and tile.dtype == np.uint8 and tile.min() == 0 and tile.max() == 255


def test_one_point_curves_are_numbers_and_large_fids_carry_no_note():
    data = rp.ReportData({"id": "eval-x", "kind": "eval-translator"}, [], {"psnr": 21.5},
                         {"lr": [(0, 0.001)], "grad_norm": [(0, 1.0), (1, 0.5)]}, {}, [], [], [], [])
    html = rp.section_metrics(data)
    assert html.count("<svg") == 1 and "grad_norm per step" in html and "lr per step" not in html
    assert "<h3>Logged once</h3>" in html and "<td>lr</td><td>0</td><td>0.001</td>" in html
    from orchestrator.report_pictures import fid_table

    assert "small-sample" not in fid_table({"fid": 3.0, "n_real": 10000, "n_fake": 5000})
    assert "small-sample" in fid_table({"fid": 3.0, "n_real": 10000, "n_fake": 1999})
