"""The embedded default's broker: kombu's filesystem transport with atomic writes, atomic takes and adaptive polling.

The user-facing URL stays ``filesystem://`` (a folder shared by local processes); `workers.celery_app` selects this
transport for it. What differs from kombu's stock `kombu.transport.filesystem`, and why:

- Writes are atomic. The stock ``_put`` creates the message file and then writes it, so a consumer listing the
  folder in between can take an empty or half-written file and fail to decode it. Here a message is written to a
  hidden temporary name and renamed into place: a visible ``.msg`` file is always complete.
- Takes are atomic and stay on one filesystem. The stock ``_get`` moves a file to the system temp folder when
  ``store_processed`` is off, which is a copy (and two consumers can both copy the same file) when /tmp is another
  filesystem. Here a consumer renames the file into the broker's own ``processed`` folder: exactly one rename wins.
- Listing is amortised. The stock ``_get`` lists and sorts the whole folder for every message (quadratic in a
  backlog of thousands of shards); here one listing fills a FIFO per queue, refilled when it runs dry (at most
  every ``RELIST_SECONDS``).
- Bindings are written safely under concurrency. The stock ``_queue_bind`` checks whether the exchange's table
  exists, then creates it empty (``"wb"``) and only afterwards locks and writes it; a second process binding at the
  same moment (two workers starting together) opens the new empty file, locks it first and fails to decode it,
  and a third could truncate a table another has just written. Here the table is opened with ``O_CREAT`` and no
  truncation, read, extended and rewritten under one exclusive lock, and an empty table reads as no bindings yet.
- Polling adapts. Stock kombu sleeps ``polling_interval`` after every empty poll, including while the worker may not
  take a message because its only prefetch slot is busy, so each task waits up to a full interval after the previous
  one is acknowledged. Here a consumer blocked only by its prefetch limit re-checks (without listing the folder)
  after 2 ms, then after a tenth of the time it has been blocked, at most every 20 ms; an idle consumer backs off
  from 2 ms to ``polling_interval``.
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from queue import Empty
from time import monotonic, monotonic_ns, sleep

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.transport.filesystem import LOCK_EX, LOCK_SH, exchange_queue_t, lock, unlock
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

#: Seconds a channel reuses an exchange's bindings (a consumer bound meanwhile, e.g. a monitor listening to task
#: events, sees fanout messages after at most this long).
TABLE_TTL_SECONDS = 1.0
#: A queue found empty is looked for again in a new listing of the folder at most this often (seconds). Without
#: it, a worker that also consumes an idle queue (its remote-control queue) would list and sort a backlog of
#: thousands of messages after every task it takes.
RELIST_SECONDS = 0.02
#: Shortest pause between polls (seconds).
MIN_POLL_SECONDS = 0.002
#: Longest pause between checks while a consumer waits for its own task to finish; such a check lists nothing.
BLOCKED_POLL_MAX_SECONDS = 0.02
#: While blocked, pause this fraction of the time blocked so far: the delay added after a task is at most ~10% of
#: its duration (and at most BLOCKED_POLL_MAX_SECONDS), and a long task costs a few wake-ups a second.
BLOCKED_POLL_FRACTION = 0.1


def _parse_table(data: bytes) -> list:
    """An exchange table's bytes as bindings; empty (created, not yet written) is no bindings."""
    return [exchange_queue_t(*q) for q in loads(bytes_to_str(data))] if data.strip() else []


class Channel(filesystem.Channel):
    """Filesystem channel with atomic put/take and an amortised, per-queue FIFO of the folder's listing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fifo: dict[str, deque[str]] = {}
        self._listed_at = float("-inf")
        self._processed_ok = False
        self._tables: dict[str, tuple[float, list]] = {}

    def get_table(self, exchange: str) -> list:
        """The exchange's bindings, re-read at most every TABLE_TTL_SECONDS: every task event is a fanout publish,
        and reading the bindings file under a lock for each one costs more than writing the message."""
        now = monotonic()
        hit = self._tables.get(exchange)
        if hit is not None and now - hit[0] < TABLE_TTL_SECONDS:
            return hit[1]
        table = self._read_table(exchange)
        self._tables[exchange] = (now, table)
        return table

    def _read_table(self, exchange: str) -> list:
        """The bindings file under a shared lock; missing or still empty (being created) reads as no bindings."""
        path = self._exchange_file(exchange)
        try:
            with open(path, "rb") as f:
                lock(f, LOCK_SH)
                try:
                    data = f.read()
                finally:
                    unlock(f)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ChannelError(f"Cannot open {path}") from exc
        return _parse_table(data)

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        """Add a binding to the exchange's table (see the module docstring for the stock version's race)."""
        entry = exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._rewrite_table(exchange, lambda table: table if entry in table else [entry, *table], create=True)

    def _delete(self, queue, exchange, routing_key, pattern, *args, **kwargs):
        """Delete the queue and drop its binding from the exchange's table, under the same lock as a bind."""
        super(filesystem.Channel, self)._delete(queue, exchange, routing_key, pattern, *args, **kwargs)
        entry = exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._rewrite_table(exchange, lambda table: [q for q in table if q != entry], create=False)

    def _rewrite_table(self, exchange: str, change, create: bool) -> None:
        """Read, change and rewrite an exchange's table under one exclusive lock, opening it without truncation
        (created when `create`; a missing table with nothing to create is left alone)."""
        self._tables.pop(exchange, None)
        path = self._exchange_file(exchange)
        try:
            if create:
                self.control_folder.mkdir(exist_ok=True)
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            if create:
                raise ChannelError(f"Cannot open {path}") from None
            return
        except OSError as exc:
            raise ChannelError(f"Cannot open {path}") from exc
        with os.fdopen(fd, "rb+", buffering=0) as f:
            lock(f, LOCK_EX)
            try:
                table = _parse_table(f.read())
                new = change(table)
                if new != table:
                    f.seek(0)
                    f.write(str_to_bytes(dumps(new)))
                    f.truncate()
            finally:
                unlock(f)

    def _put(self, queue: str, payload, **kwargs) -> None:
        """Write the message under a hidden name, then rename it to ``<ns>_<uuid>.<queue>.msg`` (atomic).

        Names sort in publish order: nanoseconds of the system-wide monotonic clock (stock kombu uses ms, so
        messages published in the same millisecond came out in random order)."""
        name = f"{monotonic_ns():020d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        tmp = os.path.join(self.data_folder_out, f".{name}.tmp")
        data = str_to_bytes(dumps(payload))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _refill(self) -> None:
        """One listing of the folder, distributed to each queue's FIFO in name (= publish time) order."""
        self._listed_at = monotonic()
        fifo: dict[str, deque[str]] = {}
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.startswith(".") or not name.endswith(".msg"):
                continue
            queue = name.partition(".")[2][: -len(".msg")]
            fifo.setdefault(queue, deque()).append(name)
        self._fifo = fifo

    def _get(self, queue: str):
        """Take the oldest message of ``queue``: the consumer whose rename succeeds owns it."""
        pending = self._fifo.get(queue)
        if not pending and monotonic() - self._listed_at >= RELIST_SECONDS:
            self._refill()
            pending = self._fifo.get(queue)
        processed = self.processed_folder
        if pending and not self._processed_ok:
            # a missing destination must not look like "another consumer took it" (FileNotFoundError below)
            os.makedirs(processed, exist_ok=True)
            self._processed_ok = True
        while pending:
            name = pending.popleft()
            taken = os.path.join(processed, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), taken)
            except FileNotFoundError:
                continue  # another consumer took it
            except OSError as exc:
                raise ChannelError(f"Cannot take {name!r} from the queue folder") from exc
            try:
                with open(taken, "rb") as f:
                    payload = f.read()
                if not self.store_processed:
                    os.unlink(taken)
            except OSError as exc:
                raise ChannelError(f"Cannot read file {taken!r} from queue.") from exc
            return loads(bytes_to_str(payload))
        raise Empty()

    def _purge(self, queue: str) -> int:
        self._fifo.pop(queue, None)
        return super()._purge(queue)


#: Declared exchanges and bindings, one record per broker folder (its control folder) in this process.
_STATES: dict[str, filesystem.virtual.BrokerState] = {}


def _state_for(control_folder: str) -> filesystem.virtual.BrokerState:
    """The broker state of the folder whose exchange tables live in `control_folder`.

    kombu keeps one state for every filesystem connection in a process, and skips writing a binding to the control
    folder when that state already has it. A process that published to queue ``gpu`` of one broker folder would then
    never write ``gpu``'s exchange table into a second folder, and its messages there were routed to no queue and
    dropped without an error (tests/workers/test_fs_transport.py). Keyed by folder, the skip is only ever right.
    """
    key = os.path.abspath(str(control_folder))
    if key not in _STATES:
        _STATES[key] = filesystem.virtual.BrokerState()
    return _STATES[key]


class Transport(filesystem.Transport):
    """``filesystem.Transport`` with the channel above and adaptive polling (see the module docstring)."""

    Channel = Channel

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        self.state = _state_for(client.transport_options.get("control_folder", "control"))

    def _blocked_by_prefetch(self) -> bool:
        """True when every consuming channel is at its prefetch limit (its task still runs): nothing to list."""
        consuming = [ch for ch in self.channels if ch._consumers]
        return bool(consuming) and not any(ch.qos.can_consume() for ch in consuming)

    def drain_events(self, connection, timeout=None):
        start = monotonic()
        idle = MIN_POLL_SECONDS
        blocked_since = None
        ceiling = self.polling_interval if self.polling_interval is not None else 1.0
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                pass
            now = monotonic()
            waited = now - start
            if timeout is not None and waited >= timeout:
                raise TimeoutError()
            if self._blocked_by_prefetch():
                blocked_since = now if blocked_since is None else blocked_since
                pause = min(max(MIN_POLL_SECONDS, BLOCKED_POLL_FRACTION * (now - blocked_since)),
                            BLOCKED_POLL_MAX_SECONDS)
            else:
                blocked_since = None
                pause, idle = idle, min(idle * 2, ceiling)
            if timeout is not None:
                pause = min(pause, max(timeout - waited, 0.0))
            sleep(pause)
