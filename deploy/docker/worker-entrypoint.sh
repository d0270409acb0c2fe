#!/bin/sh
# Entry point of the worker image: optionally claim one GPU for this container, then exec the orchestrator CLI.
#
# Why the claim: Docker does not hand out GPUs the way Kubernetes does. With `docker compose up --scale
# gpu-worker=N`, a `count: 1` reservation gives every replica the same first GPU (docker/compose#11863). So the
# compose gpu-worker sees all GPUs of the host and sets ORCH_GPU_CLAIM_DIR to a folder shared by its replicas;
# each replica takes the first GPU whose lock file it can flock and pins itself to it with CUDA_VISIBLE_DEVICES
# (the GPU's UUID, which CUDA accepts). The lock lives as long as the worker process: it is an open file
# descriptor inherited through `exec`, released by the kernel when the container stops, even on SIGKILL.
#
# Without ORCH_GPU_CLAIM_DIR (Kubernetes, which assigns one GPU per pod; Slurm; the train worker) it only execs.
# `exec` keeps the orchestrator process in this PID, so tini's SIGTERM reaches it (warm shutdown).
set -eu

if [ -n "${ORCH_GPU_CLAIM_DIR:-}" ]; then
    mkdir -p "$ORCH_GPU_CLAIM_DIR"
    if ! gpus=$(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null) || [ -z "$gpus" ]; then
        echo "orch-worker-entrypoint: no GPU visible (nvidia-smi listed none); start the container with the NVIDIA runtime and a GPU reservation" >&2
        exit 1
    fi
    claimed=""
    for uuid in $gpus; do
        exec 9>"$ORCH_GPU_CLAIM_DIR/$uuid.lock"
        if flock -n 9; then
            claimed=$uuid
            break
        fi
        exec 9>&-
    done
    if [ -z "$claimed" ]; then
        count=$(echo "$gpus" | wc -l)
        echo "orch-worker-entrypoint: all $count GPUs of this host are claimed by other replicas; scale gpu-worker to at most $count" >&2
        exit 1
    fi
    CUDA_VISIBLE_DEVICES=$claimed
    export CUDA_VISIBLE_DEVICES
    echo "orch-worker-entrypoint: claimed GPU $claimed" >&2
fi

exec orchestrator "$@"
