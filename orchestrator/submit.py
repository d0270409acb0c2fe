"""`orchestrator submit KIND ...`: validate everything, plan shards, create rows, enqueue. One function per job kind."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from orchestrator import jobs
from orchestrator.validate import check_images, check_positive, check_shards, plan_contiguous
from shared import constants as C
from shared.settings import Settings


def submit_invert(settings: Settings, args: Any) -> str:
    from workers.ml import m3fd, sd
    from workers.ml.inversion import make_config

    data = Path(args.data).expanduser()
    pairs = m3fd.find_pairs(data)  # UserError: missing folder, layout, missing IR partner, empty
    check_shards(args.shards, len(pairs))
    check_positive("--batch-size", args.batch_size)
    overrides = {k: v for k, v in {"t_end": args.t, "steps": args.steps, "size": args.size}.items() if v is not None}
    cfg = make_config(args.preset, **overrides)  # UserError: t not on the schedule, bad steps/size
    sd.check_model(args.model)  # UserError: unknown path or id not in the offline cache
    check_images([p.rgb for p in pairs] + [p.ir for p in pairs])
    ids = [p.pair_id for p in pairs]
    split = m3fd.split_pairs(ids, seed=args.split_seed, test_fraction=args.test_fraction)
    items = []
    for shard, (a, b) in enumerate(plan_contiguous(len(pairs), args.shards)):
        for p in pairs[a:b]:
            items.append({"pair_id": p.pair_id, "split": split[p.pair_id], "rgb_path": str(p.rgb.resolve()),
                          "ir_path": str(p.ir.resolve()), "shard_index": shard})
    spec = {
        "data": str(data.resolve()),
        "model": args.model,
        "preset": args.preset,
        "inversion": asdict(cfg),
        "batch_size": args.batch_size,
        "split_seed": args.split_seed,
        "test_fraction": args.test_fraction,
        "split_rule": "numpy default_rng(split_seed).permutation of the sorted pair ids; the first "
                      "round(test_fraction * n) are test",
        "precision": args.precision,
        "seed": args.seed,
        "pairs": len(pairs),
    }
    lineage = [("data", spec["data"], "pairs"), ("model", args.model, "sd")]
    return jobs.submit(settings, C.KIND_INVERT, spec, args.shards, items, lineage)
