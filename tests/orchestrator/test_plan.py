"""Submit says what it will cost: a one-line warning for upscaled images, and the plan of an invert job."""

from __future__ import annotations

from types import SimpleNamespace

from kinds import invert as plan
from orchestrator.submit import submitter
from tests.conftest import embedded_settings
from tests.orchestrator.conftest import create_only, invert_args

submit_invert = submitter("invert")


def test_submit_warns_in_one_line_when_images_are_smaller_than_the_crop(tmp_path, tiny_sd, m3fd_small, capsys):
    s = embedded_settings(tmp_path / "orch")
    s.ensure_local_folders()
    create_only(submit_invert, s, invert_args(m3fd_small, tiny_sd, shards=4, size=512))
    err = capsys.readouterr().err.splitlines()
    warn = [line for line in err if line.startswith("warning:")]
    assert len(warn) == 1, err
    assert "images are 128x96 px, smaller than --size 512" in warn[0] and "--size 96 matches them" in warn[0]
    # the plan: 20 pairs in 4 shards of 5, one batch of 8 per shard, 20 U-Net calls per batch (t=400, stride 20)
    lines = [line for line in err if line.startswith("plan:")]
    assert lines == ["plan: 20 pairs in 4 shards (5 each), 512 px crops, t = 400 on a 50-step schedule (20 U-Net "
                     "calls per batch of up to 8 pairs): about 80 U-Net calls in all"]

    create_only(submit_invert, s, invert_args(m3fd_small, tiny_sd, shards=3, size=64, batch_size=2))
    err = capsys.readouterr().err
    assert "warning" not in err  # 64 px crops of 128x96 images: nothing is upscaled
    assert "20 pairs in 3 shards (6-7 each), 64 px crops" in err and "about 220 U-Net calls" in err  # 4+4+3 batches


def test_plan_counts_the_seed_code_schedule_and_a_resize():
    cfg = SimpleNamespace(t_end=399, stride=1, steps=1000, size=512, image_size=256)
    p = plan.invert_plan(10, 2, 8, cfg)
    assert p["unet_calls_per_batch"] == 399 and p["batches"] == 2 and p["unet_calls"] == 798
    assert "512 px crops, resized to 256 px" in plan.format_invert_plan(p)
    assert plan.upscale_warning([(1024, 768), (640, 512)], 512) is None
    assert plan.upscale_warning([], 512) is None
