"""The embedded broker's transport (workers/fs_transport.py) with more than one broker folder in a process."""

from __future__ import annotations

from shared import constants as C
from tests.conftest import embedded_settings
from workers.dispatch import get_app


def _messages(settings, queue: str) -> list:
    return sorted((settings.broker_folder / "in").glob(f"*.{queue}.msg"))


def test_two_broker_folders_in_one_process_each_get_their_messages(tmp_path):
    """Publishing to a queue of one folder must not stop the same queue of another folder from being routed: kombu's
    process-wide binding record used to skip the second folder's exchange table, and its messages were dropped."""
    first, second = embedded_settings(tmp_path / "a"), embedded_settings(tmp_path / "b")
    for s in (first, second):
        s.ensure_local_folders()
    for s in (first, second, first):
        get_app(s).send_task("invert.shard", kwargs={"job_id": "j", "shard_index": 0}, queue=C.QUEUE_GPU)
    assert len(_messages(first, C.QUEUE_GPU)) == 2
    assert len(_messages(second, C.QUEUE_GPU)) == 1
    assert (second.broker_folder / "control" / f"{C.QUEUE_GPU}.exchange").exists()
