"""DDP harness shared by the torchrun training entry points (translator, NCSN, classifier).

Its parts: config.py (keys, defaults, resume merge), runtime.py (process group, AMP, data order), checkpoints.py,
events.py (the event file), fencing.py (stop flag, lease fence) and trainer.py (the loop). Entry points import
them from here.

An entry point is started by its supervisor as

    torchrun --standalone --nproc_per_node=G -m workers.train.<name> --config CONFIG.json

or, with one process and no DDP, as ``python -m workers.train.<name> --config CONFIG.json``. It never writes to
the database or touches Celery (rank 0 only reads its shard's lease, workers/train/fencing.py): it reads CONFIG.json and talks back through a JSON-lines event file that rank 0 alone appends
to (one object per line, flushed and fsynced). Events, all with "event" and "time" (unix seconds):

    start       world_size, device, epoch, step, total_steps, steps_per_epoch, epochs, resumed_from, pids
    progress    epoch, step, total_steps, loss, samples_per_s, lr                  (every log_every steps)
    metric      name, value, step, epoch     ("loss_epoch" at each epoch end, the entry point's ``on_epoch_end``
                                               metrics such as the translator's "val_loss_epoch", job metrics)
    checkpoint  path, step, epoch, step_in_epoch, sha256, bytes, reason (interval | epoch | signal | final)
    stopped     reason (signal | fenced), step, epoch, step_in_epoch, checkpoint (latest checkpoint path, or null)
                message (fenced: why the attempt no longer holds its lease)
    done        step, epoch, metrics
    error       message, rank, step, epoch     (rank 0's own exception, just before the non-zero exit)

"epoch" in progress/metric events is the 0-based epoch the step belongs to; in start/checkpoint/stopped/done it
is the resume position (the epoch the next batch comes from; after the last epoch it equals ``epochs``).
"loss" values are means over ranks and samples; a non-finite value is written as null.

Semantics: the global step counts optimizer steps. Each epoch's data order is a function of (seed, epoch) only
(DistributedSampler, shuffle, set_epoch), so a resume at (epoch, step_in_epoch) skips exactly the batches
already trained. Checkpoints are written at every epoch end, every ``checkpoint_every`` steps, and at the end
(reason "final", replacing the last epoch-end one); never twice for one step. SIGTERM/SIGINT set a flag; at the
next step boundary the ranks agree with an all_reduce(MAX), rank 0 writes a "signal" checkpoint (unless one
exists for that step already), emits "stopped" and every rank exits 0.

torchrun starts its workers in their own sessions, so a signal to torchrun's process group reaches torchrun,
which forwards SIGTERM to the workers and then exits non-zero itself although the workers stopped cleanly: the
"stopped" event is the record of a clean stop. Signalling the ranks themselves (the "pids" of the start event)
gives the same stop and a torchrun exit status of 0. A crash in any rank propagates as a non-zero exit with the
traceback on stderr.
"""

from __future__ import annotations

from workers.train.checkpoints import (  # noqa: F401
    CHECKPOINT_FORMAT,
    CheckpointInfo,
    checkpoint_path,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_rank,
    set_rng_state,
    sha256_file,
)
from workers.train.config import DEFAULT_CONFIG, OPERATIONAL_KEYS, read_config  # noqa: F401
from workers.train.events import EventWriter  # noqa: F401
from workers.train.fencing import LeaseFence, StopFlag  # noqa: F401
from workers.train.runtime import (  # noqa: F401
    Amp,
    DistInfo,
    all_reduce_,
    epoch_batches,
    exit_rank,
    select_amp,
    setup_distributed,
    steps_per_epoch,
    teardown_distributed,
)
from workers.train.trainer import StepFn, Trainer  # noqa: F401
