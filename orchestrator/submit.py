"""`orchestrator submit KIND ...`: validate everything, plan shards, create rows, enqueue. One function per job kind."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from orchestrator import jobs
from orchestrator.validate import check_pairs, check_positive, check_shards, plan_contiguous
from shared import constants as C
from shared.settings import Settings


def submit_invert(settings: Settings, args: Any) -> str:
    from shared.storage import input_path
    from workers.ml import m3fd, sd
    from workers.ml.inversion import make_config

    data = input_path(args.data).expanduser()  # a local folder or s3://bucket/prefix
    pairs = m3fd.find_pairs(data)  # UserError: missing folder, layout, missing IR partner, empty
    skip_bad = bool(getattr(args, "skip_bad", False))
    check_shards(args.shards, len(pairs))
    check_positive("--batch-size", args.batch_size)
    overrides = {k: v for k, v in {"t_end": args.t, "steps": args.steps, "size": args.size}.items() if v is not None}
    cfg = make_config(args.preset, **overrides)  # UserError: t not on the schedule, bad steps/size
    sd.check_model(args.model)  # UserError: unknown path or id not in the offline cache
    pairs, skipped = check_pairs(pairs, skip_bad)  # UserError naming a bad file, unless --skip-bad
    check_shards(args.shards, len(pairs))
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
        "split_rule": "workers.ml.m3fd.split_pairs(sorted pair ids, split_seed, test_fraction)",
        "skip_bad": skip_bad,
        "skipped_at_submit": len(skipped),
        "precision": args.precision,
        "seed": args.seed,
        "pairs": len(pairs),
    }
    lineage = [("data", spec["data"], "pairs"), ("model", args.model, "sd")]
    rejections = [("skipped_input", f, reason) for _pid, f, reason in skipped]
    return jobs.submit(settings, C.KIND_INVERT, spec, args.shards, items, lineage, rejections)


def _given(**kw: Any) -> dict[str, Any]:
    """Only the options the user gave: the rest comes from the preset inside the training entry point."""
    return {k: v for k, v in kw.items() if v is not None}


def _finished_job(settings: Settings, job_id: str, kind: str, flag: str):
    from shared.errors import UserError

    job = jobs.get_job(settings, job_id)
    if job.kind != kind:
        raise UserError(f"{flag} {job_id} is a {job.kind} job: give the id of a {kind} job")
    if job.state != "succeeded":
        raise UserError(f"{flag} {job_id} is {job.state}: wait for it to succeed (or resume it) first")
    return job


def submit_train_translator(settings: Settings, args: Any) -> str:
    from sqlalchemy import func, select

    from shared.db import session_scope
    from shared.errors import UserError
    from shared.models import Item

    inv = _finished_job(settings, args.latents, C.KIND_INVERT, "--latents")
    with session_scope(settings) as s:
        n_train = s.execute(select(func.count()).select_from(Item)
                            .where(Item.job_id == inv.id, Item.split == "train")).scalar_one()
    if n_train == 0:
        raise UserError(f"invert job {inv.id} has no train pairs: re-run it with a smaller --test-fraction")
    for name in ("epochs", "lr", "batch_size", "gpus", "base_channels", "depth", "checkpoint_every", "max_steps"):
        v = getattr(args, name, None)
        if v is not None and (v < 0 or (v == 0 and name not in ("checkpoint_every",))):
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {v})")
    model = _given(base_channels=args.base_channels, depth=args.depth)
    spec = _given(latents=inv.id, preset=args.preset, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                  weight_decay=args.weight_decay, seed=args.seed, checkpoint_every=args.checkpoint_every,
                  max_steps=args.max_steps, log_every=args.log_every)
    if model:
        spec["model"] = model
    spec["gpus"] = args.gpus
    spec["amp"] = bool(args.amp)
    spec["train_pairs"] = n_train
    lineage = [("job", inv.id, "latents")]
    return jobs.submit(settings, C.KIND_TRAIN_TRANSLATOR, spec, 1, (), lineage)


def submit_eval_translator(settings: Settings, args: Any) -> str:
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.errors import UserError
    from shared.models import Item
    from workers.tasks.train import job_of_checkpoint

    train_job, uri = job_of_checkpoint(settings, args.checkpoint)
    if train_job.kind != C.KIND_TRAIN_TRANSLATOR:
        raise UserError(f"checkpoint {args.checkpoint} belongs to a {train_job.kind} job: give a translator checkpoint")
    inv = _finished_job(settings, train_job.spec["latents"], C.KIND_INVERT, "latents job")
    with session_scope(settings) as s:
        test = s.execute(select(Item.pair_id, Item.rgb_path, Item.ir_path)
                         .where(Item.job_id == inv.id, Item.split == "test").order_by(Item.pair_id)).all()
    if not test:
        raise UserError(f"invert job {inv.id} has no test pairs: re-run it with a larger --test-fraction")
    check_shards(args.shards, len(test), "test pairs")
    check_positive("--batch-size", args.batch_size)
    items = []
    for shard, (a, b) in enumerate(plan_contiguous(len(test), args.shards)):
        for pid, rgb, ir in test[a:b]:
            items.append({"pair_id": pid, "split": "test", "rgb_path": rgb, "ir_path": ir, "shard_index": shard})
    spec = {
        "checkpoint_id": args.checkpoint,
        "checkpoint_uri": uri,
        "train_job": train_job.id,
        "latents": inv.id,
        "model": inv.spec["model"],
        "inversion": inv.spec["inversion"],
        "precision": inv.spec.get("precision", "auto"),
        "batch_size": args.batch_size,
        "test_pairs": len(test),
    }
    lineage = [("checkpoint", str(args.checkpoint), "translator"), ("job", train_job.id, "training"),
               ("job", inv.id, "latents")]
    return jobs.submit(settings, C.KIND_EVAL_TRANSLATOR, spec, args.shards, items, lineage)


def _check_mnist(source: str) -> str:
    from workers.ml.mnist import EMBEDDED, check_source

    if source != EMBEDDED:
        source = str(Path(source).expanduser().resolve())
    check_source(source)
    return source


def submit_train_ncsn(settings: Settings, args: Any) -> str:
    from workers.ml.score import get_preset

    data = _check_mnist(args.data)
    get_preset(args.preset)  # UserError for an unknown preset
    for name in ("epochs", "batch_size", "lr", "gpus", "base_channels", "max_steps", "max_train_samples"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name, None))
    spec = _given(data=data, preset=args.preset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  seed=args.seed, checkpoint_every=args.checkpoint_every, max_steps=args.max_steps,
                  base_channels=args.base_channels, max_train_samples=args.max_train_samples,
                  n_steps_each=args.steps_each, log_every=args.log_every)
    spec["gpus"] = args.gpus
    spec["amp"] = bool(args.amp)
    return jobs.submit(settings, C.KIND_TRAIN_NCSN, spec, 1, (), [("data", data, "train")])


def submit_train_classifier(settings: Settings, args: Any) -> str:
    data = _check_mnist(args.data)
    for name in ("epochs", "batch_size", "lr", "gpus", "max_train_samples"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name, None))
    spec = _given(data=data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  max_train_samples=args.max_train_samples, log_every=args.log_every)
    spec["gpus"] = args.gpus
    return jobs.submit(settings, C.KIND_TRAIN_CLASSIFIER, spec, 1, (), [("data", data, "train")])


def submit_sample(settings: Settings, args: Any) -> str:
    from shared.errors import UserError
    from workers.tasks.train import job_of_checkpoint

    train_job, uri = job_of_checkpoint(settings, args.checkpoint)
    if train_job.kind != C.KIND_TRAIN_NCSN:
        raise UserError(f"checkpoint {args.checkpoint} belongs to a {train_job.kind} job: give an NCSN checkpoint")
    check_positive("--n", args.n)
    check_shards(args.shards, args.n, "samples")
    check_positive("--batch-size", args.batch_size)
    check_positive("--steps-each", args.steps_each)
    spec = _given(checkpoint_id=args.checkpoint, checkpoint_uri=uri, train_job=train_job.id, n=args.n,
                  shards=args.shards, seed=args.seed, batch_size=args.batch_size, n_steps_each=args.steps_each)
    lineage = [("checkpoint", str(args.checkpoint), "score-model"), ("job", train_job.id, "training")]
    return jobs.submit(settings, C.KIND_SAMPLE, spec, args.shards, (), lineage)


def submit_eval_fid(settings: Settings, args: Any) -> str:
    from shared.errors import UserError
    from workers.tasks.train import job_of_checkpoint

    samples = _finished_job(settings, args.samples, C.KIND_SAMPLE, "--samples")
    reference = _check_mnist(args.reference)
    spec: dict[str, Any] = {"samples": samples.id, "reference": reference, "reference_split": args.reference_split,
                            "features": args.features, "is_splits": args.is_splits, "seed": args.seed,
                            "n_fake": samples.spec["n"]}
    if args.n_real:
        spec["n_real"] = args.n_real
    if args.is_splits < 1 or args.is_splits > samples.spec["n"]:
        raise UserError(f"--is-splits must be between 1 and the {samples.spec['n']} samples (got {args.is_splits})")
    lineage = [("job", samples.id, "samples"), ("data", reference, "reference")]
    if args.features == "inception":
        from workers.ml.fid import resolve_inception_weights

        spec["inception_weights"] = str(resolve_inception_weights(args.inception_weights))
        spec["feature_extractor"] = "inception-v3-2048"
        lineage.append(("model", spec["inception_weights"], "features"))
    else:
        if args.classifier is None:
            raise UserError("--features mnist-classifier needs --classifier CKPT_ID (from a train-classifier job)")
        job, uri = job_of_checkpoint(settings, args.classifier)
        if job.kind != C.KIND_TRAIN_CLASSIFIER:
            raise UserError(f"checkpoint {args.classifier} belongs to a {job.kind} job: give a classifier checkpoint")
        spec["classifier_uri"] = uri
        spec["feature_extractor"] = f"mnist-classifier (checkpoint {args.classifier})"
        lineage.append(("checkpoint", str(args.classifier), "features"))
    return jobs.submit(settings, C.KIND_EVAL_FID, spec, 1, (), lineage)
