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
#: The one task that belongs to no job kind; the kinds' own task names and queues are declared in kinds/.
TASK_REAP = "maintenance.reap"

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
