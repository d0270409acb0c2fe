"""Celery tasks: one per task name that the job kinds declare (kinds/), each a thin wrapper that parses
(job_id, shard_index), calls the kind's pure work function and records its results (workers/tasks/common.py)."""

import kinds
from workers.tasks.common import shard_task


def _register() -> dict:
    tasks = {}
    for kind in kinds.all_kinds().values():
        if kind.task not in tasks:  # the training kinds share train.run
            tasks[kind.task] = shard_task(kind.task, kinds.resolve(kind.work))
    return tasks


TASKS = _register()
