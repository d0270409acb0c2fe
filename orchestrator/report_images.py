"""Images for the report page: PNG bytes and data URIs, thumbnails that enlarge on click, latent tiles."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.report_html import esc

#: Display side (px) of example images: enough to judge them, small enough to keep the page light.
THUMB = 144
#: Longest side (px) of an embedded example: what the enlarged view shows (inputs larger than this are shrunk).
ENLARGED = 512
#: Embedded image files above this many bytes are re-encoded smaller.
MAX_EMBED_BYTES = 3_000_000


def png_bytes(img: np.ndarray) -> bytes:
    """PNG of an (H, W) grey or (H, W, 3) RGB uint8 image."""
    import cv2

    arr = np.ascontiguousarray(img if img.ndim == 2 else img[:, :, ::-1])  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def data_uri(png: bytes) -> str:
    """A `data:image/png;base64,...` URI: the page carries its images."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def img_tag(png: bytes, alt: str, css: str = "", min_side: int = 0, display: int = 0) -> str:
    """An <img> with the PNG inline that enlarges on click (CSS :focus, no script).

    `display`: shown with its longer side at this many px (the PNG may hold more, for the enlarged view).
    `min_side`: images smaller than this are shown enlarged by a whole factor (up to 4).
    """
    w, h = png_size(png)
    if display:
        s = display / max(1, w, h)
        size = f' width="{max(1, round(w * s))}" height="{max(1, round(h * s))}"'
    else:
        k = max(1, min(4, min_side // max(1, w, h))) if min_side else 1
        size = f' width="{w * k}" height="{h * k}"' if k > 1 else ""
    cls = f"{css} zoom".strip()
    return (f'<img src="{data_uri(png)}" alt="{esc(alt)}" title="{esc(alt)} (click to enlarge)" class="{cls}" '
            f'tabindex="0"{size}>')


def fit_side(img: np.ndarray, side: int = THUMB) -> np.ndarray:
    """Scale so the longer side is `side` px: nearest-neighbour up (latents stay crisp), area average down."""
    import cv2

    h, w = img.shape[:2]
    s = side / max(h, w)
    if abs(s - 1.0) < 1e-6:
        return img
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_NEAREST if s > 1 else cv2.INTER_AREA)


def to_u8(x01: Any) -> np.ndarray:
    """(3, H, W) or (H, W) float in [0, 1] (tensor or array) -> (H, W, 3) / (H, W) uint8."""
    a = np.asarray(x01.detach().cpu().float().numpy() if hasattr(x01, "detach") else x01, dtype=np.float32)
    if a.ndim == 3:
        a = a.transpose(1, 2, 0)
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def latent_tile(z: Any) -> np.ndarray:
    """A (4, h, w) latent as a 2 x 2 tile of its channels, each stretched over its own 1st-99th percentile."""
    a = np.asarray(z.detach().cpu().float().numpy() if hasattr(z, "detach") else z, dtype=np.float32)
    c, h, w = a.shape
    cols = 2 if c > 1 else 1
    rows = -(-c // cols)
    tile = np.zeros((rows * h, cols * w), np.uint8)
    for k in range(c):
        lo, hi = np.percentile(a[k], [1, 99])
        ch = (a[k] - lo) / (hi - lo) if hi > lo else np.zeros_like(a[k])
        r, col = divmod(k, cols)
        tile[r * h : (r + 1) * h, col * w : (col + 1) * w] = np.rint(np.clip(ch, 0, 1) * 255)
    return tile


def embed_file(path: Path, max_side: int = 1024) -> bytes | None:
    """The PNG bytes of an image file (re-encoded smaller when it is large); None if it is missing or unreadable."""
    import cv2

    try:
        data = path.read_bytes()
    except OSError:
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) <= MAX_EMBED_BYTES:
        return data
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return None
    if img.ndim == 3:
        img = img[:, :, 2::-1]  # BGR(A) -> RGB for png_bytes
    return png_bytes(fit_side(img, min(max_side, max(img.shape[:2]))))
