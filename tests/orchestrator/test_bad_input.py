"""Bad input is refused with one clear line and exit status 2 before any row exists; --skip-bad records instead."""

from __future__ import annotations

import shutil
import string
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import func, select

from orchestrator.cli import main
from shared.db import ensure_schema, session_scope
from shared.models import Item, Job, Rejection, Shard
from tests.conftest import embedded_settings


def n_rows(home: Path) -> int:
    s = embedded_settings(home)
    ensure_schema(s)
    with session_scope(s) as ss:
        return sum(ss.execute(select(func.count()).select_from(m)).scalar_one() for m in (Job, Shard, Item, Rejection))


def refused(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


@pytest.fixture
def data(tmp_path, m3fd_small) -> Path:
    d = tmp_path / "m3fd"
    shutil.copytree(m3fd_small, d)
    return d


def test_each_bad_input_is_one_line_exit_2_and_no_rows(home, capsys, data, tiny_sd, tmp_path):
    base = ["submit", "invert", "--model", str(tiny_sd), "--size", "64"]
    refused(capsys, base + ["--data", str(tmp_path / "nope")], "nope")
    (tmp_path / "empty").mkdir()
    refused(capsys, base + ["--data", str(tmp_path / "empty")], "empty")
    refused(capsys, base + ["--data", str(data), "--shards", "0"], "--shards")
    refused(capsys, base + ["--data", str(data), "--shards", "21"], "--shards 21", "20")
    refused(capsys, ["submit", "invert", "--data", str(data), "--model", str(tmp_path / "no-model")], "no-model")
    refused(capsys, base + ["--data", str(data), "--shards", "2", "--t", "410"], "410")
    refused(capsys, base + ["--data", str(data), "--shards", "2", "--t", "1000"])
    refused(capsys, base + ["--data", str(data), "--batch-size", "0"], "--batch-size")
    refused(capsys, base + ["--data", str(data), "--shards", "x"], "--shards")
    (data / "Ir" / "00003.png").unlink()  # an RGB image without its IR partner: named
    refused(capsys, base + ["--data", str(data)], "00003.png")
    assert n_rows(home) == 0


@pytest.mark.parametrize("damage", ["zero-byte", "truncated", "garbage", "mismatched-size"])
def test_bad_image_named_or_skipped_and_recorded(home, capsys, data, tiny_sd, damage):
    victim = data / "Vis" / "00005.png"
    if damage == "zero-byte":
        victim.write_bytes(b"")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "garbage":
        victim.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    else:
        cv2.imwrite(str(victim), np.zeros((50, 60, 3), np.uint8))
    base = ["submit", "invert", "--model", str(tiny_sd), "--size", "64", "--data", str(data), "--shards", "2"]
    refused(capsys, base, "00005")
    assert n_rows(home) == 0
    assert main(base + ["--skip-bad", "--json"]) == 0
    s = embedded_settings(home)
    with session_scope(s) as ss:
        rej = ss.execute(select(Rejection.kind, Rejection.ref, Rejection.reason)).all()
        items = ss.execute(select(func.count()).select_from(Item)).scalar_one()
    assert len(rej) == 1 and rej[0][0] == "skipped_input" and "00005" in rej[0][1] and items == 19


@pytest.mark.parametrize("mode", ["rgba", "16-bit", "gray-as-rgb"])
def test_other_image_modes_are_converted(tmp_path, mode):
    """RGBA drops alpha, 16-bit scales to [0, 1], a grey file used as RGB becomes 3 equal channels."""
    from workers.ml.m3fd import Pair, load_image_pair

    rgb, ir = tmp_path / "rgb.png", tmp_path / "ir.png"
    img = (np.arange(32 * 32 * 3) % 256).astype(np.uint8).reshape(32, 32, 3)
    if mode == "rgba":
        cv2.imwrite(str(rgb), np.dstack([img, np.full((32, 32), 7, np.uint8)]))
    elif mode == "16-bit":
        cv2.imwrite(str(rgb), img.astype(np.uint16) * 257)
    else:
        cv2.imwrite(str(rgb), img[:, :, 0])
    cv2.imwrite(str(ir), img[:, :, 0].astype(np.uint16) * 257)
    x, y, y01 = load_image_pair(Pair("p", rgb, ir), 32)
    assert x.shape == (3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert float(y01.min()) >= 0 and float(y01.max()) <= 1
    if mode == "16-bit":  # 16-bit scales to the same picture as 8-bit
        ref = tmp_path / "ref.png"
        cv2.imwrite(str(ref), img)
        x8, _, _ = load_image_pair(Pair("p", ref, ir), 32)
        assert np.allclose(x.numpy(), x8.numpy(), atol=1e-4)
    if mode == "gray-as-rgb":
        assert np.allclose(x[0].numpy(), x[1].numpy()) and np.allclose(x[1].numpy(), x[2].numpy())


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shards=st.one_of(st.integers(max_value=0), st.integers(min_value=21, max_value=10**9)),
    t=st.one_of(st.none(), st.integers(min_value=-5, max_value=5000).filter(lambda v: v % 20 or v <= 0 or v >= 1000)),
    batch=st.one_of(st.none(), st.integers(max_value=0)),
    junk=st.text(alphabet=string.printable.strip(), max_size=12),
)
def test_property_invalid_specs_leave_no_rows(home, capsys, m3fd_small, tiny_sd, shards, t, batch, junk):
    argv = ["submit", "invert", "--data", str(m3fd_small), "--model", str(tiny_sd), "--shards", str(shards)]
    if t is not None:
        argv += ["--t", str(t)]
    if batch is not None:
        argv += ["--batch-size", str(batch)]
    if junk and junk[0] == "-":
        argv += [junk]  # an unknown flag-like word
    refused(capsys, argv)
    assert n_rows(home) == 0


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile=st.sampled_from(["'; DROP TABLE jobs; --", "x' OR '1'='1", "\\\\", "%", "_", "🙂", "a" * 300])
       | st.text(min_size=1, max_size=40).filter(lambda s: not s.startswith("-") and "\x00" not in s))
def test_hostile_job_ids_are_bound_parameters(home, capsys, hostile):
    """Queries take user strings as bound parameters: nothing is injected, the tables survive, the answer is 'no job'."""
    for cmd in (["status", hostile], ["results", hostile], ["metrics", hostile], ["cancel", hostile]):
        rc = main(cmd)
        err = capsys.readouterr().err
        assert rc == 2 and "no job" in err
    s = embedded_settings(home)
    with session_scope(s) as ss:
        assert ss.execute(select(func.count()).select_from(Job)).scalar_one() == 0


@pytest.mark.parametrize("skip_bad", [False, True])
def test_image_broken_after_submission(tmp_path, data, tiny_sd, skip_bad):
    """A file that breaks between submission and its shard (decoded on a prefetch thread): without --skip-bad the
    shard fails naming the file; with it the shard finishes without that pair and records the rejection."""
    from orchestrator import jobs
    from orchestrator import submit as submit_mod
    from shared.errors import UserError
    from tests.orchestrator.conftest import create_only, invert_args
    from workers.runner import run_shard
    from workers.tasks.invert import invert_work

    s = embedded_settings(tmp_path / "orch")
    job_id = create_only(submit_mod.submitter("invert"), s, invert_args(data, tiny_sd, 1, batch_size=4,
                                                                  skip_bad=skip_bad))
    with session_scope(s) as ss:
        pairs = ss.execute(select(Item.pair_id).where(Item.job_id == job_id).order_by(Item.pair_id)).scalars().all()
    victim = pairs[6]  # in the second batch of four, loaded ahead while the first is inverted
    (data / "Vis" / f"{victim}.png").write_bytes(b"")
    if not skip_bad:
        with pytest.raises(UserError, match=victim):
            run_shard(s, job_id, 0, invert_work)
        job = jobs.get_job(s, job_id)
        assert job.state == "failed" and victim in (job.error or "")
        return
    out = run_shard(s, job_id, 0, invert_work)
    assert out["pairs"] == len(pairs) - 1 and out["skipped"] == 1
    with session_scope(s) as ss:
        rej = ss.execute(select(Rejection.ref).where(Rejection.job_id == job_id)).scalars().all()
        unset = ss.execute(select(Item.pair_id).where(Item.job_id == job_id, Item.artifact_id.is_(None))).scalars()
        assert [r for r in rej if victim in r] and len(rej) == 1 and list(unset) == [victim]
    assert jobs.get_job(s, job_id).state == "succeeded"


def test_bad_result_pages_are_refused(home, capsys):
    refused(capsys, ["results", "any-job", "--offset", "-1"], "--offset")
    refused(capsys, ["results", "any-job", "--limit", "0"], "--limit")
