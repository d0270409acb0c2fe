"""M3FD visible/infrared pairs: discovery, validation, the seeded train/test split, loading (synthetic pairs in
the same layout: workers/fixtures/m3fd.py).

Layouts (docs/background.md s.2, TarDAL's README):

- flat ``M3FD_Detection``: ``root/Vis/00000.png``, ``root/Ir/00000.png`` (same names), optional ``root/Annotation``;
  the pair id is the file stem (``"00000"``).
- scene tree: ``root/<group>/<scene>/{Vis,Ir}`` with groups such as Challenge, Daytime, Night, Overcast (any group
  name is accepted); the pair id is ``"<group>/<scene>/<stem>"``.

Folder names match case-insensitively (``vis``/``VIS``); images may be .png, .jpg, .jpeg or .bmp in any case.
A Vis image's partner is the Ir image with the same stem (its extension may differ); extra Ir images are ignored.
An entry with an image suffix that is not a regular file (a dangling symlink, a symlink loop, a FIFO, a device, a
folder, a link into /proc, /sys or /dev) is never skipped silently: it is an error naming it, or, when the caller
collects rejections (``--skip-bad``), its pair is rejected with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from shared.errors import UserError
from shared.paths import check_input_path, not_regular
from shared.storage import input_path

#: Image suffixes accepted for both modalities (compared lower-case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: Folder names of the two modalities (compared lower-case).
VIS_DIR = "vis"
IR_DIR = "ir"
#: M3FD's six object classes (used for synthetic annotations).
M3FD_CLASSES = ("People", "Car", "Bus", "Motorcycle", "Lamp", "Truck")


@dataclass(frozen=True)
class Pair:
    """One registered visible/infrared pair; ``pair_id`` is stable across runs and machines.

    ``rgb``/``ir`` are local Paths or, for a dataset in object storage, ``shared.s3.ObjectPath``s."""

    pair_id: str
    rgb: Path
    ir: Path


# -- discovery -------------------------------------------------------------------------------------------------------


def _child_dir(folder: Path, name: str) -> Path | None:
    """The sub-folder of ``folder`` whose name equals ``name`` case-insensitively (exact match preferred)."""
    exact = folder / name
    if exact.is_dir():
        return exact
    for child in sorted(folder.iterdir()):
        if child.is_dir() and child.name.lower() == name:
            return child
    return None


#: (pair id, file, reason) of an input that was refused.
Rejected = tuple[str, str, str]


def _images(folder: Path, prefix: str, bad: list[Rejected] | None) -> list[Path]:
    """The image entries of ``folder`` that are regular files; any other image entry raises UserError naming it,
    or, with ``bad``, is appended there."""
    good = []
    for p in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        why = not_regular(p) if isinstance(p, Path) else None  # an object-storage key is always a plain object
        if why is None:
            good.append(p)
            continue
        reason = f"image '{p}' {why}: replace it with a regular image file or pass --skip-bad"
        if bad is None:
            raise UserError(reason)
        bad.append((prefix + p.stem, str(p), reason))
    return good


def _pairs_in(vis: Path, ir: Path, prefix: str, bad: list[Rejected] | None = None) -> list[Pair]:
    """Match every image of ``vis`` to the ``ir`` image with the same stem; UserError when one is missing."""
    by_stem: dict[str, Path] = {}
    n_bad = len(bad) if bad is not None else 0
    for p in _images(ir, prefix, bad):
        by_stem.setdefault(p.stem, p)
    refused = {pid for pid, _f, _r in (bad or [])[n_bad:]}  # Ir entries refused: their pairs are rejected with them
    pairs = []
    for v in _images(vis, prefix, bad):
        if prefix + v.stem in refused:
            continue
        partner = by_stem.get(v.stem)
        if partner is None:
            raise UserError(
                f"visible image '{v}' has no infrared partner: expected {ir / v.stem}"
                f"{{{','.join(IMAGE_SUFFIXES)}}}; add it or remove the visible image"
            )
        pairs.append(Pair(pair_id=prefix + v.stem, rgb=v, ir=partner))
    return pairs


def find_pairs(root: str | Path, bad: list[Rejected] | None = None) -> list[Pair]:
    """All visible/infrared pairs under ``root``, sorted by pair id (deterministic).

    Accepts the flat M3FD_Detection layout (``root/Vis``, ``root/Ir``) or the scene tree
    (``root/<group>/<scene>/{Vis,Ir}``); see the module docstring. Raises UserError (one line) when the folder is
    empty, missing, under /proc, /sys or /dev, has neither layout, a visible image lacks its infrared partner, an
    image entry is not a regular file (unless ``bad`` collects those), or no pair is found.
    """
    check_input_path("--data", str(root))
    root = input_path(root).expanduser()  # a local folder or s3://bucket/prefix
    if not root.is_dir():
        raise UserError(f"dataset folder '{root}' does not exist: give the path of an M3FD folder")
    vis, ir = _child_dir(root, VIS_DIR), _child_dir(root, IR_DIR)
    pairs: list[Pair] = []
    if vis is not None and ir is not None:
        pairs = _pairs_in(vis, ir, prefix="", bad=bad)
    else:
        found_tree = False
        for group in sorted(p for p in root.iterdir() if p.is_dir()):
            for scene in sorted(p for p in group.iterdir() if p.is_dir()):
                svis, sir = _child_dir(scene, VIS_DIR), _child_dir(scene, IR_DIR)
                if svis is None or sir is None:
                    continue
                found_tree = True
                pairs.extend(_pairs_in(svis, sir, prefix=f"{group.name}/{scene.name}/", bad=bad))
        if not found_tree and (vis is not None or ir is not None):
            have, lack = ("Vis", "Ir") if vis is not None else ("Ir", "Vis")
            raise UserError(
                f"dataset '{root}' has {have}/ but no {lack}/: M3FD_Detection needs both side by side"
            )
        if not found_tree:
            raise UserError(
                f"no M3FD layout in '{root}': expected Vis/ and Ir/ (M3FD_Detection) or <group>/<scene>/Vis "
                "and <group>/<scene>/Ir (scene tree)"
            )
    if not pairs:
        raise UserError(f"dataset '{root}' has no visible images (.png/.jpg/.jpeg/.bmp) in its Vis folders")
    pairs.sort(key=lambda p: p.pair_id)
    return pairs


def _imread(path: Path) -> np.ndarray:
    """``cv2.imread(path, IMREAD_UNCHANGED)``, or UserError naming the file when it is missing, empty or corrupt.

    An object-storage image (``ObjectPath``) is fetched with one GET and decoded from memory."""
    if not isinstance(path, Path):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"image '{path}' does not exist: restore it or remove its pair") from None
        if not data:
            raise UserError(f"image '{path}' is empty (0 bytes): re-copy it or remove its pair")
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        why = not_regular(path)  # checked before opening: a FIFO would block the reader forever
        if why is not None:
            raise UserError(f"image '{path}' {why}: restore it or remove its pair")
        if path.stat().st_size == 0:
            raise UserError(f"image '{path}' is empty (0 bytes): re-copy it or remove its pair")
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:  # OpenCV returns None (no exception) for undecodable files
        raise UserError(
            f"image '{path}' cannot be decoded (corrupt or unsupported format): re-copy it or remove its pair"
        )
    return img


def check_image(path: str | Path) -> None:
    """Raise UserError naming ``path`` if it is missing, empty (0 bytes) or not decodable by OpenCV."""
    read_image(path)


def read_image(path) -> np.ndarray:
    """The decoded image (OpenCV's channel order and dtype) of a local path or s3:// location; UserError if bad."""
    return _imread(path if hasattr(path, "read_bytes") else input_path(path))


# -- split -----------------------------------------------------------------------------------------------------------


def split_pairs(pair_ids: list[str], seed: int = 42, test_fraction: float = 0.2) -> dict[str, str]:
    """Map each pair id to ``"train"`` or ``"test"``: a deterministic function of (set of ids, seed, fraction).

    Rule (recorded with the job): sort the ids; ``perm = numpy.random.default_rng(seed).permutation(n)``;
    ``n_test = floor(n * test_fraction + 0.5)``; the ids at positions ``perm[:n_test]`` of the sorted list are
    "test", all others "train". The input order does not matter. M3FD has no official split; 80/20 with seed 42
    is the seed project's (and common) practice: 4,200 pairs -> 3,360 / 840.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"test fraction {test_fraction} is outside [0, 1): use e.g. 0.2")
    ids = sorted(pair_ids)
    if len(set(ids)) != len(ids):
        dup = next(a for a, b in zip(ids, ids[1:], strict=False) if a == b)
        raise UserError(f"pair id '{dup}' appears twice: pair ids must be unique")
    n = len(ids)
    n_test = math.floor(n * test_fraction + 0.5)
    perm = np.random.default_rng(seed).permutation(n)
    test = {ids[i] for i in perm[:n_test]}
    return {pid: ("test" if pid in test else "train") for pid in ids}


# -- loading ---------------------------------------------------------------------------------------------------------


def _read01(path: Path, gray: bool) -> np.ndarray:
    """Image as float32 in [0, 1]: (H, W) if ``gray`` else (H, W, 3) in RGB order.

    Conversions: uint16 is divided by 65535 (i.e. scaled to the 8-bit range by /257, then /255); uint8 by 255;
    float images are clipped to [0, 1]. An alpha channel (BGRA) is dropped. A colour image read as IR is
    converted with OpenCV's BGR->GRAY (M3FD's IR is 24-bit grey, so all channels are equal); a grey image read
    as RGB is repeated to three channels.
    """
    img = _imread(path)
    if img.dtype == np.uint8:
        x = img.astype(np.float32) / 255.0
    elif img.dtype == np.uint16:
        x = img.astype(np.float32) / 65535.0
    else:
        x = np.clip(img.astype(np.float32), 0.0, 1.0)
    if x.ndim == 3 and x.shape[2] == 4:
        x = x[:, :, :3]
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[:, :, 0]
    if gray:
        return cv2.cvtColor(x, cv2.COLOR_BGR2GRAY) if x.ndim == 3 else x
    return cv2.cvtColor(x, cv2.COLOR_BGR2RGB) if x.ndim == 3 else np.repeat(x[:, :, None], 3, axis=2)


def _crop_resize(x: np.ndarray, size: int, resize_to: int | None) -> np.ndarray:
    """Centre square crop of side ``size`` (short side first scaled up to ``size`` if smaller), then resize."""
    h, w = x.shape[:2]
    if min(h, w) < size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = cv2.resize(x, (nw, nh), interpolation=cv2.INTER_CUBIC)
        h, w = x.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[top : top + size, left : left + size]
    if resize_to is not None and resize_to != size:
        # INTER_AREA averages when shrinking (antialiased, like torchvision's Resize on PIL images).
        interp = cv2.INTER_AREA if resize_to < size else cv2.INTER_CUBIC
        x = cv2.resize(x, (resize_to, resize_to), interpolation=interp)
    return np.clip(x, 0.0, 1.0)


def load_image_pair(
    pair: Pair, size: int, resize_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load and preprocess one pair for the VAE.

    The two images must have the same size (M3FD pairs are registered); otherwise UserError names both files.
    Preprocessing (each image independently): centre crop to a ``size`` x ``size`` square (an image whose short
    side is below ``size`` is first scaled up so that it equals ``size``), then resize to ``resize_to`` if given.
    The IR image is read as grey and repeated to three channels (the SD VAE expects RGB).

    Returns ``(rgb, ir, ir01)``, each (3, S, S) float32 with S = resize_to or size: rgb and ir in [-1, 1] (VAE
    input), ir01 in [0, 1] (the real infrared pixels the metrics compare against).
    """
    if size < 8:
        raise UserError(f"crop size {size} px is too small: use at least 8 (e.g. 512)")
    rgb_full, ir_full = _read01(pair.rgb, gray=False), _read01(pair.ir, gray=True)
    if rgb_full.shape[:2] != ir_full.shape[:2]:
        # M3FD pairs are registered pixel to pixel; cropping two sizes independently would misalign them
        raise UserError(
            f"pair {pair.pair_id}: {pair.rgb} is {rgb_full.shape[1]}x{rgb_full.shape[0]} but {pair.ir} is "
            f"{ir_full.shape[1]}x{ir_full.shape[0]}: registered pairs must have the same size (fix or use --skip-bad)"
        )
    rgb = _crop_resize(rgb_full, size, resize_to)  # (S, S, 3)
    ir = _crop_resize(ir_full, size, resize_to)  # (S, S)
    rgb_t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    ir01 = torch.from_numpy(np.ascontiguousarray(ir))[None].repeat(3, 1, 1)
    return rgb_t * 2.0 - 1.0, ir01 * 2.0 - 1.0, ir01
