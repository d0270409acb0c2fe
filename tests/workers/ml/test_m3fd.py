"""M3FD discovery, validation, split, loading and the synthetic generator."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from shared.errors import UserError
from workers.fixtures.m3fd import ir_from_scene, make_scene, write_synthetic
from workers.ml.m3fd import Pair, check_image, find_pairs, load_image_pair, split_pairs


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# -- discovery -------------------------------------------------------------------------------------------------------


def test_flat_layout_is_found_sorted(m3fd_dir: Path) -> None:
    pairs = find_pairs(m3fd_dir)
    assert [p.pair_id for p in pairs] == [f"{i:05d}" for i in range(6)]
    assert pairs[2].rgb == m3fd_dir / "Vis" / "00002.png"
    assert pairs[2].ir == m3fd_dir / "Ir" / "00002.png"
    assert len(list((m3fd_dir / "Annotation").glob("*.xml"))) == 6


def test_scene_tree_layout_with_mixed_extensions(tmp_path: Path, m3fd_dir: Path) -> None:
    for group, scene, stems in [("Daytime", "road1", ["00000", "00001"]), ("Night", "alley", ["00002"])]:
        (tmp_path / group / scene / "Vis").mkdir(parents=True)
        (tmp_path / group / scene / "ir").mkdir(parents=True)  # folder names match case-insensitively
        for stem in stems:
            shutil.copy(m3fd_dir / "Vis" / f"{stem}.png", tmp_path / group / scene / "Vis" / f"{stem}.PNG")
            img = cv2.imread(str(m3fd_dir / "Ir" / f"{stem}.png"))
            cv2.imwrite(str(tmp_path / group / scene / "ir" / f"{stem}.jpg"), img)
    (tmp_path / "notes").mkdir()  # unrelated folders are ignored
    pairs = find_pairs(tmp_path)
    assert [p.pair_id for p in pairs] == ["Daytime/road1/00000", "Daytime/road1/00001", "Night/alley/00002"]
    assert pairs[2].ir.suffix == ".jpg"


def test_missing_partner_is_named(tmp_path: Path, m3fd_dir: Path) -> None:
    shutil.copytree(m3fd_dir, tmp_path / "d")
    (tmp_path / "d" / "Ir" / "00003.png").unlink()
    with pytest.raises(UserError) as err:
        find_pairs(tmp_path / "d")
    msg = _one_line(err)
    assert "00003.png" in msg and "infrared partner" in msg and str(tmp_path / "d" / "Ir" / "00003") in msg


def test_missing_folder_and_wrong_layout(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        find_pairs(tmp_path / "nope")
    (tmp_path / "x" / "images").mkdir(parents=True)
    with pytest.raises(UserError) as err:
        find_pairs(tmp_path / "x")
    assert "expected Vis/ and Ir/ (M3FD_Detection) or <group>/<scene>/Vis" in _one_line(err)
    (tmp_path / "half" / "Vis").mkdir(parents=True)
    with pytest.raises(UserError, match="has Vis/ but no Ir/"):
        find_pairs(tmp_path / "half")
    (tmp_path / "e" / "Vis").mkdir(parents=True)
    (tmp_path / "e" / "Ir").mkdir()
    with pytest.raises(UserError, match="no visible images"):
        find_pairs(tmp_path / "e")


def test_corrupt_and_empty_images_are_refused(tmp_path: Path, m3fd_dir: Path) -> None:
    check_image(m3fd_dir / "Vis" / "00000.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UserError) as err:
        check_image(empty)
    assert "empty.png" in _one_line(err) and "0 bytes" in str(err.value)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(UserError) as err:
        check_image(bad)
    assert "bad.png" in _one_line(err) and "cannot be decoded" in str(err.value)
    # load_image_pair checks too
    with pytest.raises(UserError, match="bad.png"):
        load_image_pair(Pair("x", rgb=bad, ir=m3fd_dir / "Ir" / "00000.png"), size=64)


# -- split -----------------------------------------------------------------------------------------------------------


def test_split_is_deterministic_80_20_and_order_free() -> None:
    ids = [f"{i:05d}" for i in range(100)]
    a = split_pairs(ids, seed=42)
    assert a == split_pairs(list(reversed(ids)), seed=42)
    assert sum(v == "test" for v in a.values()) == 20 and sum(v == "train" for v in a.values()) == 80
    assert a != split_pairs(ids, seed=7)
    # the documented rule
    perm = np.random.default_rng(42).permutation(100)
    assert {k for k, v in a.items() if v == "test"} == {ids[i] for i in perm[:20]}
    assert sum(v == "test" for v in split_pairs([f"{i}" for i in range(4200)]).values()) == 840


def test_split_rejects_bad_input() -> None:
    with pytest.raises(UserError, match="test fraction"):
        split_pairs(["a"], test_fraction=1.0)
    with pytest.raises(UserError, match="twice"):
        split_pairs(["a", "b", "a"])


# -- synthetic data --------------------------------------------------------------------------------------------------


def test_synthetic_ir_is_a_fixed_function_of_the_scene(tmp_path: Path) -> None:
    ids = write_synthetic(tmp_path / "a", n_pairs=3, seed=5)
    write_synthetic(tmp_path / "b", n_pairs=2, seed=5)
    assert ids == ["00000", "00001", "00002"]
    for stem in ("00000", "00001"):  # same seed -> same files, whatever n_pairs
        assert (tmp_path / "a" / "Ir" / f"{stem}.png").read_bytes() == (
            tmp_path / "b" / "Ir" / f"{stem}.png"
        ).read_bytes()
    ir = cv2.imread(str(tmp_path / "a" / "Ir" / "00001.png"), cv2.IMREAD_UNCHANGED)
    vis = cv2.imread(str(tmp_path / "a" / "Vis" / "00001.png"))
    assert ir.shape == (96, 128) and ir.dtype == np.uint8 and vis.shape == (96, 128, 3)
    rgb, temp, box = make_scene(np.random.default_rng([5, 1]), 128, 96)
    assert np.array_equal(ir, ir_from_scene(rgb, temp))
    assert np.corrcoef(ir.ravel().astype(float), temp.ravel())[0, 1] > 0.8
    # the visible image is the scene itself (what a translator sees), and IR is not noise
    assert np.abs(vis[..., ::-1] / 255.0 - rgb).max() < 1 / 255
    assert ir.std() > 10
    xml = (tmp_path / "a" / "Annotation" / "00001.xml").read_text()
    assert f"<xmin>{box[0]}</xmin>" in xml and f"<name>{box[4]}</name>" in xml


def test_different_seeds_give_different_scenes(tmp_path: Path) -> None:
    write_synthetic(tmp_path / "a", n_pairs=1, seed=1)
    write_synthetic(tmp_path / "b", n_pairs=1, seed=2)
    assert (tmp_path / "a" / "Vis" / "00000.png").read_bytes() != (
        tmp_path / "b" / "Vis" / "00000.png"
    ).read_bytes()


# -- loading ---------------------------------------------------------------------------------------------------------


def test_load_image_pair_shapes_and_ranges(m3fd_dir: Path) -> None:
    pair = find_pairs(m3fd_dir)[0]
    rgb, ir, ir01 = load_image_pair(pair, size=64)
    for x in (rgb, ir, ir01):
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and x.is_contiguous()
    assert rgb.min() >= -1 and rgb.max() <= 1 and ir01.min() >= 0 and ir01.max() <= 1
    assert torch.allclose(ir, ir01 * 2 - 1)
    assert torch.equal(ir01[0], ir01[1]) and torch.equal(ir01[0], ir01[2])
    rgb2, _, ir2 = load_image_pair(pair, size=96, resize_to=32)
    assert rgb2.shape == (3, 32, 32) and ir2.shape == (3, 32, 32)


def _write(path: Path, img: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), img)
    return path


def test_centre_crop_and_colour_order(tmp_path: Path) -> None:
    # 40 wide x 20 high; column index encoded in the red channel, row index in green.
    h, w = 20, 40
    bgr = np.zeros((h, w, 3), np.uint8)
    bgr[..., 2] = np.arange(w, dtype=np.uint8)[None, :] * 5
    bgr[..., 1] = np.arange(h, dtype=np.uint8)[:, None] * 10
    vis = _write(tmp_path / "v.png", bgr)
    ir = _write(tmp_path / "i.png", bgr[..., 2].copy())
    rgb, _, ir01 = load_image_pair(Pair("p", vis, ir), size=16)
    rgb01 = (rgb + 1) / 2
    # centre 16x16 of 40x20: columns 12..27, rows 2..17
    assert torch.allclose(rgb01[0, 0], torch.arange(12, 28).float() * 5 / 255, atol=1e-6)
    assert torch.allclose(rgb01[1, :, 0], torch.arange(2, 18).float() * 10 / 255, atol=1e-6)
    assert torch.allclose(rgb01[2], torch.zeros(16, 16))
    assert torch.allclose(ir01[0, 0], torch.arange(12, 28).float() * 5 / 255, atol=1e-6)


def test_small_images_are_scaled_up_before_cropping(tmp_path: Path) -> None:
    img = np.full((10, 20, 3), 200, np.uint8)
    p = _write(tmp_path / "s.png", img)
    rgb, ir, ir01 = load_image_pair(Pair("s", p, p), size=32)
    assert rgb.shape == (3, 32, 32) and ir01.shape == (3, 32, 32)
    assert torch.allclose(ir01, torch.full_like(ir01, 200 / 255), atol=1e-3)


def test_16_bit_and_rgba_images(tmp_path: Path) -> None:
    ir16 = _write(tmp_path / "ir16.png", np.full((24, 24), 32768, np.uint16))
    bgra = np.zeros((24, 24, 4), np.uint8)
    bgra[..., 2] = 255  # red
    bgra[..., 3] = 0  # fully transparent: alpha is dropped, colour kept
    vis = _write(tmp_path / "rgba.png", bgra)
    assert cv2.imread(str(ir16), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert cv2.imread(str(vis), cv2.IMREAD_UNCHANGED).shape == (24, 24, 4)
    rgb, _, ir01 = load_image_pair(Pair("x", vis, ir16), size=16)
    assert torch.allclose(ir01, torch.full_like(ir01, 32768 / 65535), atol=1e-6)
    assert torch.allclose(rgb[0], torch.ones(16, 16)) and torch.allclose(rgb[1:], -torch.ones(2, 16, 16))
    # a 16-bit colour image as RGB, and an RGBA image read as IR (grey)
    vis16 = _write(tmp_path / "v16.png", np.full((24, 24, 3), 65535, np.uint16))
    rgb16, _, ir_from_rgba = load_image_pair(Pair("y", vis16, vis), size=16)
    assert torch.allclose(rgb16, torch.ones_like(rgb16))
    assert torch.allclose(ir_from_rgba, torch.full_like(ir_from_rgba, 0.299), atol=2e-3)
