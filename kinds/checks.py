"""Checks that run before anything is enqueued: each failure is one line naming the thing and the fix."""

from __future__ import annotations

from pathlib import Path

from shared.errors import UserError

#: Magic numbers of the image formats the datasets use.
_SIGNATURES = {
    ".png": (b"\x89PNG\r\n\x1a\n",),
    ".jpg": (b"\xff\xd8\xff",),
    ".jpeg": (b"\xff\xd8\xff",),
    ".bmp": (b"BM",),
}
#: Up to this many images are fully decoded at submission; beyond, only headers are checked here and the worker that
#: meets a bad file fails its shard naming the file (or skips it with --skip-bad).
FULL_DECODE_LIMIT = 512


def check_image_header(path: Path) -> None:
    """`path`: a local Path or an object-storage `ObjectPath` (both have stat and open)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e.strerror}; check the file's permissions") from e
    if size == 0:
        raise UserError(f"image {path} is empty (0 bytes): replace or remove it")
    sigs = _SIGNATURES.get(path.suffix.lower())
    if sigs and not any(head.startswith(sig) for sig in sigs):
        raise UserError(f"image {path} is not a valid {path.suffix.lstrip('.').upper()} file: replace or remove it")


def check_pairs(pairs: list, skip_bad: bool = False) -> tuple[list, list[tuple[str, str, str]]]:
    """Check every pair's files: headers always; full decode and equal RGB/IR sizes for small datasets.

    Returns (good pairs, [(pair_id, file, reason)] of skipped ones). Without `skip_bad` the first bad file raises
    UserError naming it.
    """
    from shared.storage import input_path
    from workers.ml.m3fd import read_image

    full = 2 * len(pairs) <= FULL_DECODE_LIMIT
    good, bad = [], []
    for pair in pairs:
        try:
            for path in (pair.rgb, pair.ir):
                check_image_header(path if hasattr(path, "read_bytes") else input_path(path))
            if full:
                a = read_image(pair.rgb).shape[:2]
                b = read_image(pair.ir).shape[:2]
                if a != b:
                    raise UserError(f"pair {pair.pair_id}: {pair.rgb} is {a[1]}x{a[0]} but {pair.ir} is {b[1]}x{b[0]}: "
                                    "registered pairs must have the same size (fix them or pass --skip-bad)")
            good.append(pair)
        except UserError as e:
            if not skip_bad:
                raise
            bad.append((pair.pair_id, str(pair.rgb), str(e)))
    if not good:
        raise UserError(f"all {len(pairs)} pairs have bad images (first: {bad[0][2]}): fix the dataset")
    return good, bad


def check_shards(shards: int, n_items: int, what: str = "pairs") -> None:
    if shards < 1:
        raise UserError(f"--shards must be at least 1 (got {shards})")
    if shards > n_items:
        raise UserError(f"--shards {shards} is more than the {n_items} {what}: use --shards {n_items} or fewer")


def check_positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be positive (got {value})")


def plan_contiguous(n_items: int, shards: int) -> list[tuple[int, int]]:
    """Split n items into `shards` contiguous [start, stop) ranges whose sizes differ by at most one."""
    return [(i * n_items // shards, (i + 1) * n_items // shards) for i in range(shards)]
