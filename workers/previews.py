"""Preview pictures of an invert job, decoded by the worker that already holds the VAE.

The report embeds these PNGs instead of loading a VAE itself: a report is then as fast for SD v1-4 at 512 px as for
the tiny fixture. Only the job's first PREVIEW_PAIRS pairs (in shard order) get previews, so the cost is a few VAE
decodes per job, paid by the first shard(s).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: Pairs of a job that get decoded previews (the report's default number of examples).
PREVIEW_PAIRS = 4
#: The latents decoded for each previewed pair, in the report's column order.
LATENT_KEYS = ("z_rgb_0", "z_rgb_t", "z_ir_0", "z_ir_t")


def previews_wanted(before: int) -> int:
    """How many of a shard's first pairs are among the job's first PREVIEW_PAIRS pairs, when `before` pairs of the
    job lie in earlier shards (shared/store_records.py's `shard_pairs`)."""
    return max(0, PREVIEW_PAIRS - int(before))


def png_of(x01: Any) -> bytes:
    """PNG of a (3, H, W) float image in [0, 1]."""
    import cv2
    import numpy as np

    a = np.rint(x01.detach().cpu().float().clamp(0, 1).numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(a[:, :, ::-1]))  # OpenCV writes BGR
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def write_previews(storage, job_id: str, parts, tensors: dict[str, Any], pair_ids: list[str], n: int,
                   random_model: bool) -> list[tuple[Any, dict[str, Any]]]:
    """Decode the first `n` pairs' latents and store one PNG per (pair, latent): [(StoredFile, meta)].

    Previews are for people, not results: when storage refuses one (full, read-only, unreachable), the shard keeps
    the pictures already written (they get rows with the shard's result, so no unrecorded file is left) and goes on
    without the rest, with a warning. The shard's own artifact was written first; whether the job can go on is for
    its next write to say.
    """
    from shared.storage import StorageError
    from workers.ml.inversion import decode

    out: list[tuple[Any, dict[str, Any]]] = []
    n = min(n, len(pair_ids))
    if n <= 0:
        return out
    for key in LATENT_KEYS:
        images = decode(parts, tensors[key][:n], max_batch=4)
        for pid, img in zip(pair_ids[:n], images, strict=True):
            try:
                stored = storage.write_bytes(f"jobs/{job_id}/previews/{pid}-{key}.png", png_of(img))
            except StorageError as e:
                log.warning("job %s: preview pictures skipped after %d of %d: %s", job_id, len(out),
                            n * len(LATENT_KEYS), e)
                return out
            out.append((stored, {"what": f"VAE decode of {key}", "preview": True, "pair_id": pid, "latent": key,
                                 "random_model": random_model}))
    return out
