"""Celery tasks: thin wrappers that parse (job_id, shard_index), call pure work functions and record results."""

from workers.tasks import bench, evaluate, invert, ncsn, train  # noqa: F401
