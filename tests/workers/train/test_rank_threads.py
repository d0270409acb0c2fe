"""Training ranks use the worker's OMP_NUM_THREADS even when MKL_NUM_THREADS=1 is inherited."""

from __future__ import annotations

import os
import subprocess
import sys

from workers.supervisor import rank_threads_env


def _torch_threads(env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_an_inherited_mkl_setting_does_not_cap_the_rank_at_one_thread() -> None:
    worker_env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "1"}
    assert _torch_threads(worker_env) == 1  # the trap: torch takes the smaller of the two
    assert _torch_threads({**worker_env, **rank_threads_env(worker_env)}) == 2


def test_one_thread_when_the_worker_sets_none() -> None:
    assert rank_threads_env({}) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
