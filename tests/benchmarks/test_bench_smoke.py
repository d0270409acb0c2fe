"""Every benchmark script runs end to end at a tiny size and prints its table (nothing here is timed).

Server parts skip without Redis/PostgreSQL and fail when CI is set (tests.conftest.require_servers). Also here: the
embedded broker's transport (workers/fs_transport.py), whose speed the overhead benchmark measures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from queue import Empty

import pytest

import kinds
from tests.conftest import require_servers

REPO = Path(__file__).resolve().parents[2]


def tables(path: Path) -> dict[str, list[dict]]:
    """The JSON lines a benchmark appended: {title: rows}."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["title"]] = rec["rows"]
    return out


def only(found: dict[str, list[dict]], fragment: str) -> list[dict]:
    hits = [rows for title, rows in found.items() if fragment in title]
    assert len(hits) == 1, (fragment, list(found))
    return hits[0]


def test_overhead_embedded_and_loop(tmp_path, capsys):
    from benchmarks import overhead

    out = tmp_path / "o.jsonl"
    assert overhead.main(["--sizes", "4", "--columns", "loop,embedded", "--json", str(out)]) == 0
    rows = only(tables(out), "overhead per shard")
    by = {r["column"]: r for r in rows}
    assert set(by) == {"loop", "system/embedded"}
    assert by["loop"]["overhead_ms_per_shard"] == 0 and by["system/embedded"]["wall_s"] > 0
    assert by["system/embedded"]["cpu_overhead_ms_per_shard"] is not None
    assert "system/embedded" in capsys.readouterr().out


@pytest.mark.server
def test_overhead_servers_and_raw_celery(tmp_path):
    require_servers()
    from benchmarks import overhead

    out = tmp_path / "o.jsonl"
    assert overhead.main(["--sizes", "4", "--columns", "loop,servers,celery-redis", "--json", str(out)]) == 0
    found = tables(out)
    cols = {r["column"] for r in only(found, "overhead per shard")}
    assert cols == {"loop", "system/servers", "celery/redis"}
    ratio = only(found, "ratio")
    assert ratio[0]["system"] == "system/servers" and ratio[0]["x celery/redis"] is not None


def test_overhead_ray_column(tmp_path):
    pytest.importorskip("ray")
    from benchmarks import overhead

    out = tmp_path / "o.jsonl"
    assert overhead.main(["--sizes", "4", "--columns", "loop,ray", "--json", str(out)]) == 0
    assert {r["column"] for r in only(tables(out), "overhead per shard")} == {"loop", "ray"}


def test_bench_job_records_one_metric_per_shard(embedded):
    """The `bench` kind through the real exactly-once path, in process."""
    from orchestrator import jobs, queries
    from workers.runner import run_shard
    from workers.tasks.bench import bench_work, kernel

    job_id = jobs.create_job(embedded, "bench", {"size": 8, "repeats": 2}, 3)
    for i in range(3):
        run_shard(embedded, job_id, i, bench_work)
    assert run_shard(embedded, job_id, 1, bench_work)["skipped"] == "already done"
    assert jobs.get_job(embedded, job_id).state == "succeeded"
    rows = queries.results(embedded, job_id)
    assert [r["item"] for r in rows] == ["shard-0", "shard-1", "shard-2"]
    assert rows[1]["checksum"] == pytest.approx(kernel(1, 8, 2))
    assert kinds.get("bench").task == "bench.shard"


def test_submit_embedded(tmp_path):
    from benchmarks import submit

    out = tmp_path / "s.jsonl"
    assert submit.main(["--shards", "20", "--backends", "embedded", "--json", str(out)]) == 0
    rows = only(tables(out), "create + enqueue")
    assert [r["enqueue"] for r in rows] == ["batched", "per-message"]
    assert all(r["shards"] == 20 and r["items"] == 20 and r["total_s"] > 0 for r in rows)


@pytest.mark.server
def test_submit_servers(tmp_path):
    require_servers()
    from benchmarks import submit

    out = tmp_path / "s.jsonl"
    assert submit.main(["--shards", "20", "--backends", "servers", "--no-reference", "--json", str(out)]) == 0
    assert only(tables(out), "create + enqueue")[0]["backend"] == "servers"


@pytest.mark.server
def test_db_scale_tiny(tmp_path, capsys):
    require_servers()
    from benchmarks import db_scale

    out = tmp_path / "d.jsonl"
    assert db_scale.main(["--scale", "0.001", "--runs", "2", "--explain", "--json", str(out)]) == 0
    found = tables(out)
    rows = {r["query"]: r for r in only(found, "CLI queries on")}
    assert rows["results INVERT --limit 50"]["rows"] == 10 and rows["metrics EVAL"]["rows"] == 9
    assert only(found, "WITHOUT ix_metrics_job_step_item")
    text = capsys.readouterr().out
    assert "ix_metrics_job_step_item" in text and "Index" in text and "Execution Time" in text


def test_scaling_one_worker(tmp_path):
    from benchmarks import scaling

    out = tmp_path / "c.jsonl"
    assert scaling.main(["--pairs", "4", "--shards", "2", "--batch", "2", "--workers", "1", "--json", str(out)]) == 0
    (row,) = only(tables(out), "CPU inversion")
    assert row["workers"] == 1 and row["speedup"] == 1.0 and row["wall_s"] > 0
    assert row["plain_wall_s"] > 0 and row["plain_speedup"] == 1.0  # the plain-process baseline ran too


def test_inversion_cpu_and_no_gpu(tmp_path, capsys):
    import torch

    from benchmarks import inversion

    out = tmp_path / "i.jsonl"
    assert inversion.main(["--quick", "--pairs", "4", "--batch", "2", "--json", str(out)]) == 0
    rows = {r["path"].split(" (")[0]: r for r in only(tables(out), "inversion on CPU")}
    assert set(rows) == {"worker batched", "plain diffusers loop", "seed approach", "load+invert, sequential",
                         "load+invert, overlapped"}
    assert all(r["images_per_s"] > 0 for r in rows.values())
    assert 0 < rows["load+invert, overlapped"]["busy"] <= 1.0
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert inversion.main(["--gpu"]) == 0
        assert "no GPU" in capsys.readouterr().out


def test_inversion_peak_table():
    from benchmarks.inversion import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Some Future GPU") is None


def test_ncsn_sampling_cpu_and_no_gpu(tmp_path, capsys):
    import torch

    from benchmarks import ncsn_sampling

    out = tmp_path / "n.jsonl"
    assert ncsn_sampling.main(["--batch", "4", "--steps-each", "1", "--base", "8", "--json", str(out)]) == 0
    rows = only(tables(out), "NCSN annealed Langevin")
    assert [r["variant"] for r in rows] == ["straightforward loop", "worker (anneal_langevin)", "in-place"]
    assert all(r["steps_run"] == 10 and r["samples_per_s_1000_steps"] > 0 for r in rows)
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert ncsn_sampling.main(["--gpu"]) == 0
        assert "no GPU" in capsys.readouterr().out


def test_ncsn_train_speed_quick(tmp_path):
    from benchmarks import ncsn_train_speed

    out = tmp_path / "t.jsonl"
    assert ncsn_train_speed.main(["--quick", "--no-compile", "--json", str(out)]) == 0
    rows = only(tables(out), "NCSN training step on CPU")
    assert len(rows) == len(ncsn_train_speed.VARIANTS) - 1 and all(r["steps_per_s"] > 0 for r in rows)
    assert {r["base"] for r in rows} == {8, 16, 24, 32} and any(r["channels_last"] for r in rows)


def test_ncsn_in_place_sampler_matches_the_worker_update():
    """The tuned variant computes the same chain as anneal_langevin given the same noise (float32, CPU)."""
    import torch

    from benchmarks.ncsn_sampling import build, in_place
    from workers.ml.score import anneal_langevin

    model, sigmas = build(8, "cpu")
    x = torch.rand(2, 1, 28, 28)
    torch.manual_seed(1)
    ours = in_place(model, x, sigmas[:2], 2)
    torch.manual_seed(1)
    ref = anneal_langevin(lambda y, s: model(y, s), x, sigmas[:2], n_steps_each=2, step_lr=2e-5, rule="ncsn")
    assert torch.allclose(ours, ref, atol=1e-5)


def test_ssim_border_conventions(capsys):
    """Identical images score 1 under both conventions; the valid-window mean is the map without its 5 px border."""
    import torch

    from benchmarks import ssim_border

    a = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    whole, valid = ssim_border.both_ssims(a, a)
    assert torch.allclose(whole, torch.ones(2), atol=1e-5) and torch.allclose(valid, torch.ones(2), atol=1e-5)
    b = (a + 0.2 * torch.rand(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    from torchmetrics.functional.image import structural_similarity_index_measure

    from workers.ml.image_metrics import psnr_ssim

    whole, valid = ssim_border.both_ssims(b, a)
    assert torch.allclose(whole, psnr_ssim(b, a)[1], atol=1e-6)  # the figure the eval jobs report
    _, full = structural_similarity_index_measure(b, a, data_range=1.0, reduction="none", return_full_image=True)
    assert torch.allclose(valid, full[..., 5:27, 5:27].mean(dim=(1, 2, 3)))
    assert ssim_border.main(["--quick"]) == 0
    assert "RGB luminance" in capsys.readouterr().out


@pytest.mark.slow
def test_translator_quality_quick_learns(tmp_path, capsys):
    """invert -> train-translator -> eval-translator through worker processes; the held-out loss falls."""
    from benchmarks import translator_quality

    out = tmp_path / "t.json"
    assert translator_quality.main(["--quick", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())
    assert [r["protocol"] for r in recs] == ["honest", "seed"]
    r = recs[0]
    assert r["n_train"] + r["n_test"] == 20 and r["epochs"] == 6
    assert r["val_loss_last"] < 0.8 * r["val_loss_first"]
    assert "latent MSE per epoch" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_without_gpu(tmp_path):
    import torch

    script = REPO / "benchmarks" / "gpu.sh"
    assert os.access(script, os.X_OK)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu.sh runs for real there")
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable), "OUT": str(tmp_path)}
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "no GPU"
    checker = shutil.which("shellcheck")
    if checker:
        lint = subprocess.run([checker, str(script)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout


# -- the embedded broker's transport -----------------------------------------------------------------------------------


def _channel(folder: Path):
    from kombu import Connection

    for sub in ("in", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conn = Connection("filesystem://", transport="workers.fs_transport:Transport", transport_options={
        "data_folder_in": str(folder / "in"), "data_folder_out": str(folder / "in"),
        "processed_folder": str(folder / "processed"), "control_folder": str(folder / "control")})
    return conn, conn.channel()


def test_fs_transport_writes_atomically_and_keeps_order(tmp_path):
    conn, ch = _channel(tmp_path)
    try:
        for i in range(5):
            ch._put("q", {"n": i})
        names = sorted(os.listdir(tmp_path / "in"))
        assert len(names) == 5 and all(n.endswith(".q.msg") and not n.startswith(".") for n in names)
        assert [ch._get("q")["n"] for _ in range(5)] == [0, 1, 2, 3, 4]
        with pytest.raises(Empty):
            ch._get("q")
        assert os.listdir(tmp_path / "processed") == []  # store_processed off: taken files are removed
    finally:
        conn.release()


def test_fs_transport_concurrent_consumers_take_each_message_once(tmp_path):
    n = 300
    conn, ch = _channel(tmp_path)
    for i in range(n):
        ch._put("q", {"n": i})
    taken: list[list[int]] = [[], [], []]

    def consume(k: int) -> None:
        c, chan = _channel(tmp_path)
        try:
            while True:
                try:
                    taken[k].append(chan._get("q")["n"])
                except Empty:
                    return
        finally:
            c.release()

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conn.release()
    everything = sorted(x for part in taken for x in part)
    assert everything == list(range(n))  # nothing lost, nothing twice


def _bind_at_once(folder: str, k: int, barrier, errors) -> None:
    """One process: wait for the others, then bind queue ``q<k>`` to the shared exchange ``ex``."""
    conn, ch = _channel(Path(folder))
    try:
        barrier.wait(30)
        ch._queue_bind("ex", f"q{k}", None, f"q{k}")
    except Exception as exc:  # reported to the parent, which asserts there were none
        errors.put(f"{k}: {exc!r}")
    finally:
        conn.release()


def test_fs_transport_concurrent_binds_keep_every_binding(tmp_path):
    """Workers starting together all bind their queues to the same exchange tables. kombu's stock bind creates the
    table empty and writes it only after locking it, so a process binding at the same moment could read the empty
    file and fail to start (JSONDecodeError), or truncate another's binding. Every round starts from no table."""
    import multiprocessing

    ctx, n = multiprocessing.get_context("fork"), 6
    for round_ in range(15):
        folder = tmp_path / f"r{round_}"
        barrier, errors = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_bind_at_once, args=(str(folder), k, barrier, errors)) for k in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        assert not failures, failures
        assert [p.exitcode for p in procs] == [0] * n
        conn, ch = _channel(folder)
        try:
            assert sorted(q.queue for q in ch._read_table("ex")) == sorted(f"q{k}" for k in range(n))
        finally:
            conn.release()


def test_fs_transport_reads_an_empty_table_as_no_bindings(tmp_path):
    """A table another process has just created, and not yet written, is no bindings rather than a decode error."""
    conn, ch = _channel(tmp_path)
    try:
        (tmp_path / "control" / "ex.exchange").write_bytes(b"")
        assert ch.get_table("ex") == []
        ch._queue_bind("ex", "rk", None, "q")
        assert [q.queue for q in ch._read_table("ex")] == ["q"]
    finally:
        conn.release()


def test_fs_transport_delete_drops_only_its_binding(tmp_path):
    conn, ch = _channel(tmp_path)
    try:
        for q in ("a", "b"):
            ch._queue_bind("ex", q, None, q)
        ch._put("a", {"n": 1})
        ch._delete("a", "ex", "a", None)
        assert [q.queue for q in ch._read_table("ex")] == ["b"]
        with pytest.raises(Empty):
            ch._get("a")  # deleting a queue purges it
        ch._delete("c", "nothing-bound", "c", None)  # no table: nothing to drop, no error
        assert not (tmp_path / "control" / "nothing-bound.exchange").exists()
    finally:
        conn.release()
