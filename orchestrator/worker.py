"""`orchestrator worker`: start Celery worker processes, one per GPU, pinned before torch initialises CUDA.

With one process the command *execs* Celery, so SIGTERM from Kubernetes/Slurm/docker reaches Celery directly (warm
shutdown: the running shard finishes, unstarted ones go back to the broker). With several GPUs it starts one child per
GPU, each with CUDA_VISIBLE_DEVICES set in its environment, and forwards SIGTERM/SIGINT to all of them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

from shared.errors import UserError


def parse_gpus(gpus: str | None) -> list[str] | None:
    """'0,1' -> ['0', '1']; 'all' -> every visible GPU (by nvidia-smi, without importing torch here)."""
    if not gpus:
        return None
    if gpus == "all":
        inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
        if inherited:  # Slurm/containers already restrict us: never reach outside the allocation
            return [g.strip() for g in inherited.split(",") if g.strip()]
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, check=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise UserError("--gpus all needs nvidia-smi to list the GPUs: give the indices instead, e.g. --gpus 0,1") from e
        return [line.strip() for line in out.splitlines() if line.strip()]
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or not all(g.isdigit() or g.startswith(("GPU-", "MIG-")) for g in ids):
        raise UserError(f"--gpus '{gpus}' is not a list of GPU indices: use e.g. --gpus 0,1 or --gpus all")
    return ids


def celery_argv(queues: str, name: str, concurrency: int, loglevel: str, pool: str,
                max_memory_per_child: int | None, max_tasks_per_child: int | None) -> list[str]:
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queues, "-n", name,
            "-c", str(concurrency), "-P", pool, "--loglevel", loglevel, "-E", "--without-gossip", "--without-mingle"]
    if max_memory_per_child:
        argv += ["--max-memory-per-child", str(max_memory_per_child)]
    if max_tasks_per_child:
        argv += ["--max-tasks-per-child", str(max_tasks_per_child)]
    return argv


def default_queues(gpus: str | None) -> str:
    """The queues of `orchestrator worker` without --queues.

    Without GPUs: every queue (gpu, train, cpu), so that one worker on a laptop or a CPU box runs every kind of job
    a user can submit, training included (on CPU, torchrun runs gloo processes). With --gpus: gpu and cpu only. A
    GPU worker is one process per GPU, each pinned to its GPU, while a training worker is one process that owns all
    its GPUs for torchrun: one node cannot be both, so training on GPUs needs its own
    `orchestrator worker --queues train --gpus ...`.
    """
    from shared import constants as C

    return ",".join(C.QUEUES) if not gpus else f"{C.QUEUE_GPU},{C.QUEUE_CPU}"


def check_queues(queues: str) -> str:
    from shared import constants as C

    names = [q.strip() for q in queues.split(",") if q.strip()]
    bad = [q for q in names if q not in C.QUEUES]
    if not names or bad:
        raise UserError(f"unknown queue(s) {', '.join(bad) or queues!r}: choose from {', '.join(C.QUEUES)}")
    return ",".join(names)


def plan_workers(queues: str, gpus: str | None = None, processes: int = 1,
                 hostname: str | None = None) -> list[tuple[str, dict[str, str]]]:
    """(Celery node name, extra environment) of each worker process to start.

    A GPU worker gets one process per GPU, each pinned with CUDA_VISIBLE_DEVICES (set in the child's environment,
    so it is in place before torch initialises CUDA). A training worker (queue `train`) owns all its GPUs in one
    process: its task launches torchrun over them. Without GPUs, `processes` CPU processes.
    """
    queues = check_queues(queues)
    gpu_ids = parse_gpus(gpus)
    base = hostname or f"worker-{os.getpid()}@{socket.gethostname()}"
    name, _, host = base.partition("@")
    host = host or socket.gethostname()
    if gpu_ids and "train" in queues.split(","):
        return [(f"{name}@{host}", {"CUDA_VISIBLE_DEVICES": ",".join(gpu_ids), "ORCH_TRAIN_GPUS": str(len(gpu_ids))})]
    if gpu_ids:
        return [(f"{name}-gpu{g}@{host}", {"CUDA_VISIBLE_DEVICES": g}) for g in gpu_ids]
    return [(f"{name}{f'-{i}' if processes > 1 else ''}@{host}", {}) for i in range(processes)]


def run_workers(
    queues: str | None,
    gpus: str | None = None,
    concurrency: int = 1,
    processes: int = 1,
    hostname: str | None = None,
    loglevel: str = "INFO",
    pool: str = "prefork",
    max_memory_per_child: int | None = None,
    max_tasks_per_child: int | None = None,
) -> int:
    queues = queues or default_queues(gpus)
    specs = plan_workers(queues, gpus, processes, hostname)
    queues = check_queues(queues)
    argvs = [celery_argv(queues, n, concurrency, loglevel, pool, max_memory_per_child, max_tasks_per_child)
             for n, _ in specs]
    if len(specs) == 1:
        env = {**os.environ, **specs[0][1]}
        os.execve(argvs[0][0], argvs[0], env)  # never returns: Celery receives our signals directly
    return _supervise(argvs, [e for _, e in specs])


def _supervise(argvs: Sequence[list[str]], envs: Sequence[dict[str, str]]) -> int:
    procs = [subprocess.Popen(a, env={**os.environ, **e}) for a, e in zip(argvs, envs, strict=False)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):  # each child bounds its own cold shutdown
        signal.signal(sig, forward)
    codes = [p.wait() for p in procs]
    return max(codes, default=0)
