"""The worker's consumer, with task events flushed on a short timer instead of on every loop iteration.

Celery's worker buffers task events (task-received, -started, -succeeded, ...) and publishes the buffer as one
``task.multi`` message, but it schedules that flush for the very next turn of its event loop: with one shard in
flight per process that is one Redis PUBLISH per event, three per shard, ~2 ms of the consumer's CPU on the shard's
critical path (benchmarks/README.md, section 1). Here the first buffered event arms a timer and the flush happens
``EVENT_FLUSH_SECONDS`` later (or as soon as the buffer holds Celery's ``buffer_limit`` of 24 events), so a busy
worker publishes one message per interval. Flower and ``orchestrator watch`` see every event, at most that much
later; nothing is dropped: the buffer is also flushed before the consumer stops or shuts down.

Every task message also passes ``workers.poison.guard`` before Celery parses it: a malformed one is rejected
without requeue and recorded, instead of stopping the worker (workers/poison.py).
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer as CeleryConsumer

from workers import poison

log = logging.getLogger(__name__)

#: Longest time a task event waits in the worker's buffer before it is published.
EVENT_FLUSH_SECONDS = 0.05


class Consumer(CeleryConsumer):
    _flush_armed = False

    def create_task_handler(self, *args, **kwargs):
        return poison.guard(super().create_task_handler(*args, **kwargs), self)

    def on_send_event_buffered(self) -> None:
        # called from whichever thread sent the event; call_soon is the hub's thread-safe entry point, and the
        # timer itself is only touched from the hub's own thread (in _arm_flush)
        if self.hub and not self._flush_armed:
            self._flush_armed = True
            self.hub.call_soon(self._arm_flush)

    def _arm_flush(self) -> None:
        self.hub.call_later(EVENT_FLUSH_SECONDS, self._flush_buffered)

    def _flush_buffered(self) -> None:
        self._flush_armed = False
        self._flush_events()

    def _flush_before_closing(self) -> None:
        try:
            self._flush_events()
        except Exception as e:  # the broker may be gone already: the events are lost, the shards are not
            log.debug("could not flush buffered task events: %s", e)

    def stop(self) -> None:
        self._flush_before_closing()
        super().stop()

    def shutdown(self) -> None:
        self._flush_before_closing()
        super().shutdown()
