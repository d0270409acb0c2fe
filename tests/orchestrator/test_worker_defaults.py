"""`orchestrator worker` without --queues consumes what users can submit: training included on a CPU box."""

from __future__ import annotations

import os

import pytest

from orchestrator import cli


def _argv_of_worker(monkeypatch, *args: str) -> list[str]:
    seen: list[list[str]] = []

    def fake_execve(path, argv, env):
        seen.append(list(argv))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_execve)
    with pytest.raises(SystemExit):
        cli.main(["worker", *args])
    (argv,) = seen
    return argv


def test_worker_without_queues_consumes_every_queue(monkeypatch, home):
    argv = _argv_of_worker(monkeypatch)
    assert argv[argv.index("-Q") + 1] == "gpu,train,cpu"


def test_gpu_worker_without_queues_keeps_one_process_per_gpu(monkeypatch, home):
    from orchestrator.worker import default_queues, plan_workers

    assert default_queues("0,1") == "gpu,cpu"
    assert len(plan_workers(default_queues("0,1"), gpus="0,1", hostname="w@h")) == 2
