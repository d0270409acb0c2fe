"""Every queue name, task name, key and default in one place (no magic strings in tasks or the CLI)."""

# -- Queues -----------------------------------------------------------------------------------------------------------
#: GPU work that fits in one task: inversion shards, sampling shards, evaluation shards.
QUEUE_GPU = "gpu"
#: Long-running DDP training runs (a task supervises a torchrun process group).
QUEUE_TRAIN = "train"
#: Cheap bookkeeping that needs no accelerator (finalisation, reaping).
QUEUE_CPU = "cpu"
QUEUES = (QUEUE_GPU, QUEUE_TRAIN, QUEUE_CPU)

# -- Task names (what Flower shows) -----------------------------------------------------------------------------------
TASK_INVERT_SHARD = "invert.shard"
TASK_TRAIN_RUN = "train.run"
TASK_EVAL_TRANSLATOR_SHARD = "eval_translator.shard"
TASK_SAMPLE_SHARD = "sample.shard"
TASK_EVAL_FID = "eval_fid.run"
TASK_REAP = "maintenance.reap"
TASK_BENCH_SHARD = "bench.shard"

# -- Job kinds --------------------------------------------------------------------------------------------------------
KIND_INVERT = "invert"
KIND_TRAIN_TRANSLATOR = "train-translator"
KIND_EVAL_TRANSLATOR = "eval-translator"
KIND_TRAIN_NCSN = "train-ncsn"
KIND_TRAIN_CLASSIFIER = "train-classifier"
KIND_SAMPLE = "sample"
KIND_EVAL_FID = "eval-fid"
KIND_BENCH = "bench"  # benchmarks/overhead.py: a fixed CPU kernel per shard
JOB_KINDS = (
    KIND_INVERT,
    KIND_TRAIN_TRANSLATOR,
    KIND_EVAL_TRANSLATOR,
    KIND_TRAIN_NCSN,
    KIND_TRAIN_CLASSIFIER,
    KIND_SAMPLE,
    KIND_EVAL_FID,
)

# -- Artifact kinds ---------------------------------------------------------------------------------------------------
ARTIFACT_LATENTS = "latents"
ARTIFACT_CHECKPOINT = "checkpoint"
ARTIFACT_IMAGE = "image"
ARTIFACT_SAMPLES = "samples"
ARTIFACT_REPORT = "report"

# -- Leases -----------------------------------------------------------------------------------------------------------
#: Seconds a shard or training-run lease stays valid without a heartbeat. A worker that dies (kill -9) frees its
#: shard after at most this long; a duplicate delivery that sees a live lease exits. Overridable with ORCH_LEASE_SECONDS.
LEASE_SECONDS = 60.0
#: Default permission bits of artifacts (ORCH_ARTIFACT_MODE): owner read/write, group read.
ARTIFACT_MODE = 0o640
#: The heartbeat renews the lease this many times per lease period.
HEARTBEATS_PER_LEASE = 4

# -- Metrics ----------------------------------------------------------------------------------------------------------
#: `step` of a summary metric (one value per job), so a unique key needs no NULLs.
SUMMARY_STEP = -1
#: `item` of a metric that belongs to no single item.
NO_ITEM = ""

# -- Local state of the embedded default ------------------------------------------------------------------------------
DEFAULT_HOME = ".orchestrator"
DB_FILENAME = "orchestrator.sqlite"
BROKER_DIRNAME = "broker"
STORAGE_DIRNAME = "artifacts"
#: Seconds between polls of the embedded filesystem broker (kombu's default is 1 s, which dominates short shards).
FILESYSTEM_POLL_SECONDS = 0.05

# -- Exit statuses of the CLI -----------------------------------------------------------------------------------------
EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader (`| head`) went away

#: Which task runs a shard of which kind of job.
TASK_FOR_KIND = {
    KIND_INVERT: TASK_INVERT_SHARD,
    KIND_TRAIN_TRANSLATOR: TASK_TRAIN_RUN,
    KIND_TRAIN_NCSN: TASK_TRAIN_RUN,
    KIND_TRAIN_CLASSIFIER: TASK_TRAIN_RUN,
    KIND_EVAL_TRANSLATOR: TASK_EVAL_TRANSLATOR_SHARD,
    KIND_SAMPLE: TASK_SAMPLE_SHARD,
    KIND_EVAL_FID: TASK_EVAL_FID,
    KIND_BENCH: TASK_BENCH_SHARD,
}
