"""Messages waiting in the broker, per queue: what the reaper checks before republishing, and what the exporter
(orchestrator/exporter.py) and `orchestrator queue-length` report.

- Redis: kombu keeps a queue's waiting messages in a list named after the queue, plus one list per non-zero priority
  step named `{queue}\\x06\\x16{step}` (kombu.transport.redis `Channel._q_for_pri`); a queue's length is the sum of
  their LLENs, exactly what kombu's own `_size` computes. Messages delivered to a worker but not yet acknowledged
  sit in the hash `unacked` with their delivery time in the sorted set `unacked_index`.
- the embedded filesystem broker: one file `{time}_{uuid}.{queue}.msg` per waiting message in the broker's `in`
  folder (kombu.transport.filesystem).
- any other kombu transport (e.g. AMQP): a passive queue declaration's message count.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shared import constants as C
from shared.settings import Settings


def redis_client_url(broker_url: str) -> str:
    """The redis-py URL of a Celery Redis broker URL (`redis+socket://` is redis-py's `unix://`)."""
    if broker_url.startswith("redis+socket://"):
        return "unix://" + broker_url[len("redis+socket://"):]
    return broker_url


def redis_queue_lengths(broker_url: str, queues: Sequence[str] = C.QUEUES,
                        transport_options: dict[str, Any] | None = None) -> tuple[dict[str, int], int]:
    """({queue: waiting messages}, unacked messages) of a Redis broker, as kombu's Redis transport keeps them."""
    import redis
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    opts = transport_options or {}
    prefix = opts.get("global_keyprefix", "") or ""
    sep = opts.get("sep", Channel.sep)
    steps = opts.get("priority_steps", PRIORITY_STEPS)
    unacked_key = opts.get("unacked_key", Channel.unacked_key)
    client = redis.Redis.from_url(redis_client_url(broker_url), socket_timeout=5, socket_connect_timeout=5)
    try:
        pipe = client.pipeline(transaction=False)
        for q in queues:
            for pri in steps:
                pipe.llen(prefix + (f"{q}{sep}{pri}" if pri else q))
        pipe.hlen(prefix + unacked_key)
        sizes = pipe.execute()
    finally:
        client.close()
    n = len(steps)
    lengths = {q: int(sum(sizes[i * n : (i + 1) * n])) for i, q in enumerate(queues)}
    return lengths, int(sizes[-1])


def redis_unacked_by_queue(broker_url: str, queues: Sequence[str] = C.QUEUES,
                           transport_options: dict[str, Any] | None = None,
                           now: float | None = None) -> dict[str, tuple[int, float]]:
    """{queue: (unacked messages, age in seconds of the oldest)} from kombu's `unacked` hash and `unacked_index`.

    The queue is the message's routing key (each queue has its own direct exchange and routing key); a message
    whose routing key names no known queue counts under "other". The hash holds at most the prefetched and running
    messages of all workers plus those of killed ones, so reading it whole is cheap.
    """
    import json

    import redis
    from kombu.transport.redis import Channel

    opts = transport_options or {}
    prefix = opts.get("global_keyprefix", "") or ""
    unacked_key = prefix + opts.get("unacked_key", Channel.unacked_key)
    index_key = prefix + opts.get("unacked_index_key", Channel.unacked_index_key)
    now = time.time() if now is None else now
    out = {q: (0, 0.0) for q in queues}
    client = redis.Redis.from_url(redis_client_url(broker_url), socket_timeout=5, socket_connect_timeout=5)
    try:
        since = {(k.decode() if isinstance(k, bytes) else k): float(v)
                 for k, v in client.zrange(index_key, 0, -1, withscores=True)}
        for tag, raw in client.hscan_iter(unacked_key, count=1000):
            try:
                routing_key = json.loads(raw)[2]
            except (ValueError, TypeError, IndexError):
                routing_key = None
            q = routing_key if routing_key in out else "other"
            n, oldest = out.get(q, (0, 0.0))
            delivered = since.get(tag.decode() if isinstance(tag, bytes) else tag)
            age = max(0.0, now - delivered) if delivered is not None else 0.0
            out[q] = (n + 1, max(oldest, age))
    finally:
        client.close()
    return out


def filesystem_queue_lengths(folder: Path, queues: Sequence[str] = C.QUEUES) -> dict[str, int]:
    """{queue: waiting messages} of the embedded filesystem broker whose message folder is `folder`."""
    counts = dict.fromkeys(queues, 0)
    try:
        names = [p.name for p in Path(folder).iterdir()]
    except FileNotFoundError:
        return counts
    wanted = {f"{q}.msg": q for q in queues}
    for name in names:
        q = wanted.get(name.partition(".")[2])  # kombu's own test: "{ms}_{uuid}" never holds a dot
        if q is not None:
            counts[q] += 1
    return counts


def kombu_queue_lengths(settings: Settings, queues: Sequence[str] = C.QUEUES) -> dict[str, int]:
    """{queue: waiting messages} through a passive declaration on the Celery app's broker (AMQP and others)."""
    from workers.dispatch import get_app

    app = get_app(settings)
    out = {}
    with app.connection_for_read() as conn:
        for q in queues:
            chan = conn.channel()  # AMQP closes a channel whose passive declare fails: one channel per queue
            try:
                out[q] = int(chan.queue_declare(queue=q, passive=True).message_count)
            except conn.channel_errors:  # not declared yet: nothing waits in it
                out[q] = 0
            finally:
                try:
                    chan.close()
                except Exception:
                    pass
    return out


def queue_lengths(settings: Settings, queues: Sequence[str] = C.QUEUES) -> tuple[dict[str, int], int | None]:
    """({queue: messages waiting}, unacked or None) for the configured broker."""
    url = settings.broker_url
    scheme = urlsplit(url).scheme
    if settings.embedded_broker:
        return filesystem_queue_lengths(settings.broker_folder / "in", queues), None
    if scheme in ("redis", "rediss", "redis+socket"):
        from workers.dispatch import get_app

        opts = dict(get_app(settings).conf.broker_transport_options or {})
        return redis_queue_lengths(url, queues, opts)
    return kombu_queue_lengths(settings, queues), None
