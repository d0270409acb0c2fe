"""MNIST sources: the embedded real digits, IDX round trips, and one-line errors for bad inputs."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.errors import UserError
from tests.workers.ml._mnist_fixtures import embedded
from workers.fixtures import mnist as fixture_mnist
from workers.ml import mnist


def test_embedded_has_5000_real_digits_split_4000_1000() -> None:
    train_x, train_y = embedded("train")
    test_x, test_y = embedded("test")
    assert train_x.shape == (4000, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (1000, 28, 28) and test_x.dtype == np.uint8
    assert train_y.dtype == np.int64 and test_y.dtype == np.int64
    # stratified: every class present, 400 / 100 each
    assert np.bincount(train_y, minlength=10).tolist() == [400] * 10
    assert np.bincount(test_y, minlength=10).tolist() == [100] * 10
    # interleaved, so any prefix is class-balanced
    assert train_y[:20].tolist() == list(range(10)) * 2
    assert np.bincount(train_y[:1000]).tolist() == [100] * 10
    # real handwriting, not blank or noise: dark background, bright strokes, ~19% ink like MNIST
    ink = (train_x > 127).mean()
    assert 0.08 < ink < 0.3
    assert train_x.max() == 255 and np.median(train_x) == 0
    # held-out: no test digit is also a train digit
    train_set = {img.tobytes() for img in train_x}
    assert not any(img.tobytes() in train_set for img in test_x)


def test_embedded_labels_are_the_last_csv_column() -> None:
    # a digit's class is visible in its pixels: mean "1" has far less ink than mean "0"
    x, y = embedded("train")
    assert x[y == 1].mean() < 0.6 * x[y == 0].mean()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    out = fixture_mnist.write_fixture(tmp_path / "mnist", n_train=50, n_test=20, gzip=gz)
    suffix = ".gz" if gz else ""
    assert (out / f"train-images-idx3-ubyte{suffix}").is_file()
    assert (out / f"t10k-labels-idx1-ubyte{suffix}").is_file()
    mnist.check_source(str(out), splits=("train", "test"))
    for split, n in (("train", 50), ("test", 20)):
        x, y = mnist.load_mnist(str(out), split)
        ex, ey = embedded(split)
        assert x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x, ex[:n])
        np.testing.assert_array_equal(y, ey[:n])


def test_write_idx_header_is_standard(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    img_path, lbl_path = fixture_mnist.write_idx(tmp_path, images, np.array([7, 1]), "train")
    raw = img_path.read_bytes()
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    assert raw[16:] == images.tobytes()
    assert lbl_path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 1])


def test_dotted_file_names_are_accepted(tmp_path: Path) -> None:
    fixture_mnist.write_fixture(tmp_path, n_train=10, n_test=10)
    (tmp_path / "train-images-idx3-ubyte").rename(tmp_path / "train-images.idx3-ubyte")
    (tmp_path / "train-labels-idx1-ubyte").rename(tmp_path / "train-labels.idx1-ubyte")
    x, y = mnist.load_mnist(str(tmp_path), "train")
    assert x.shape == (10, 28, 28) and y.shape == (10,)


def test_gzipped_content_without_gz_suffix_is_read(tmp_path: Path) -> None:
    fixture_mnist.write_fixture(tmp_path, n_train=10, n_test=10, gzip=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / f"{name}.gz").rename(tmp_path / name)
    x, _ = mnist.load_mnist(str(tmp_path), "train")
    assert x.shape == (10, 28, 28)


def test_bad_magic_names_the_file(tmp_path: Path) -> None:
    fixture_mnist.write_fixture(tmp_path, n_train=10, n_test=10)
    # swap: a label file where the images should be
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes((tmp_path / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(UserError, match="train-images-idx3-ubyte") as err:
        mnist.load_mnist(str(tmp_path), "train")
    assert "\n" not in str(err.value) and "0x00000801" in str(err.value)
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        mnist.check_source(str(tmp_path))


def test_truncated_and_corrupt_gzip_files_name_the_file(tmp_path: Path) -> None:
    fixture_mnist.write_fixture(tmp_path, n_train=10, n_test=10)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*needs"):
        mnist.load_mnist(str(tmp_path), "train")
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz"):
        mnist.load_mnist(str(tmp_path), "test")


def test_image_label_count_mismatch(tmp_path: Path) -> None:
    fixture_mnist.write_fixture(tmp_path, n_train=10, n_test=10)
    x, y = embedded("test")
    img7, _ = fixture_mnist.write_idx(tmp_path / "other", x[:7], y[:7], "train")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(img7.read_bytes())  # 7 images, 10 labels
    with pytest.raises(UserError, match="disagree"):
        mnist.load_mnist(str(tmp_path), "train")


def test_missing_sources_and_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        mnist.load_mnist(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="does not exist"):
        mnist.check_source(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        mnist.check_source(str(tmp_path / "file"))
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        mnist.check_source(str(tmp_path))
    with pytest.raises(UserError, match="split"):
        mnist.load_mnist(mnist.EMBEDDED, "validation")
    mnist.check_source(mnist.EMBEDDED, splits=("train", "test"))


def test_fixture_size_limits(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="4000"):
        fixture_mnist.write_fixture(tmp_path, n_train=4001)


def test_gzip_output_is_deterministic(tmp_path: Path) -> None:
    a = fixture_mnist.write_fixture(tmp_path / "a", n_train=10, n_test=10, gzip=True)
    b = fixture_mnist.write_fixture(tmp_path / "b", n_train=10, n_test=10, gzip=True)
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert gzip.decompress((a / "train-labels-idx1-ubyte.gz").read_bytes())[:4] == bytes([0, 0, 8, 1])


def test_to_tensor_scales() -> None:
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    x01 = mnist.to_tensor(images, "zero_one")
    assert x01.shape == (1, 1, 2, 2) and x01.dtype == torch.float32
    torch.testing.assert_close(x01[0, 0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    x11 = mnist.to_tensor(images, "minus_one_one")
    torch.testing.assert_close(x11[0, 0], torch.tensor([[-1.0, 1.0], [-0.6, -0.2]]))
    with pytest.raises(UserError, match="scale"):
        mnist.to_tensor(images, "zero_255")  # type: ignore[arg-type]
