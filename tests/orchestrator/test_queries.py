"""The CLI's queries: pages come from SQL (LIMIT/OFFSET in the statement) and add up to the whole listing."""

from __future__ import annotations

from orchestrator import jobs, queries
from shared.db import session_scope
from workers.recording import record_metrics


def test_per_item_results_page_in_sql_and_add_up(backend):
    """An evaluation's per-item metrics: every page holds whole items (all their metrics), in item order, and the
    pages together are the full listing, whatever the page size; the job's summary row is never an item."""
    job_id = jobs.create_job(backend, "eval-translator", {}, 1)
    with session_scope(backend) as s:
        record_metrics(s, job_id, [(n, float(i), -1, f"p{i:03d}") for i in range(7) for n in ("psnr", "ssim")], 0)
        record_metrics(s, job_id, {"psnr": 1.0})
    full = queries.results(backend, job_id)
    assert [r["item"] for r in full] == [f"p{i:03d}" for i in range(7)]
    assert full[3] == {"item": "p003", "psnr": 3.0, "ssim": 3.0}
    for limit in (1, 3, 10):
        pages = [queries.results(backend, job_id, limit, offset) for offset in range(0, 7, limit)]
        assert all(len(p) <= limit for p in pages)
        assert [r for p in pages for r in p] == full
    assert queries.results(backend, job_id, 3, 7) == []


def test_keyset_pages_match_offset_pages(backend):
    """`--after KEY` (the last key of the previous page) walks the same pages as offsets, for per-item metrics."""
    job_id = jobs.create_job(backend, "eval-translator", {}, 1)
    with session_scope(backend) as s:
        record_metrics(s, job_id, [(n, float(i), -1, f"p{i:03d}") for i in range(7) for n in ("psnr", "ssim")], 0)
    full = queries.results(backend, job_id)
    pages, after = [], None
    while page := queries.results(backend, job_id, 3, after=after):
        pages.append(page)
        after = page[-1]["item"]
    assert [r for p in pages for r in p] == full and len(pages) == 3


def test_keyset_pages_of_invert_pairs(tmp_path, tiny_sd, m3fd_small):
    from tests.conftest import embedded_settings
    from tests.orchestrator.conftest import run_invert_inline

    s = embedded_settings(tmp_path / "orch")
    job_id = run_invert_inline(s, m3fd_small, tiny_sd, shards=2)
    full = queries.results(s, job_id)
    ids = [r["pair_id"] for r in full]
    assert ids == sorted(ids) and len(ids) > 4
    assert queries.results(s, job_id, 4, after=ids[1]) == full[2:6]
    assert queries.results(s, job_id, 4, after=ids[-1]) == []
