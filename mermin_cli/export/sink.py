"""The Sink API the capture loop writes records to, and its bounded, batching queue.

Every record given to ``write`` is counted exactly once, eventually: ``sent`` (delivered),
``failed`` (given up after retries, or refused by the destination) or ``dropped`` (queue
full, or still queued when ``close`` ran out of time). ``write`` never waits (unless the
caller asks to, as ``mermin export`` does); a full queue drops the new records.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Protocol

from mermin_cli.flows.record import FlowRecord

log = logging.getLogger("mermin.export")

DEFAULT_CLOSE_TIMEOUT = 5.0


class Sink(Protocol):
    """A destination of flow records."""

    name: str

    @property
    def sent(self) -> int: ...

    @property
    def failed(self) -> int: ...

    @property
    def dropped(self) -> int: ...

    def write(self, records: list[FlowRecord]) -> None:
        """Queue records; never blocks the caller (a full queue drops and counts them)."""

    def close(self) -> None:
        """Deliver what is queued within a bounded time, then stop."""


class QueueSink:
    """A bounded record queue emptied in batches by worker threads calling ``export``.

    A batch is taken when ``max_batch_size`` records wait, when the oldest waiting record
    is ``max_batch_interval`` old, or at close. Subclasses implement ``export`` and count
    each record of the batch with ``count_sent`` / ``count_failed``.
    """

    def __init__(
        self,
        name: str,
        *,
        max_queue_size: int,
        max_batch_size: int,
        max_batch_interval: float,
        workers: int,
    ) -> None:
        self.name = name
        self.max_queue_size = max_queue_size
        self.max_batch_size = max_batch_size
        self.max_batch_interval = max_batch_interval
        self._sent = self._failed = self._dropped = self._retries = 0
        self._queue: collections.deque[FlowRecord] = collections.deque()
        self._first_at = 0.0  # when the oldest queued record arrived
        self._cond = threading.Condition()
        self._closed = threading.Event()  # set when close starts; cuts pauses short
        self._close_deadline = float("inf")
        self._threads = [
            threading.Thread(target=self._work, name=f"mermin-{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def sent(self) -> int:
        return self._sent

    @property
    def failed(self) -> int:
        return self._failed

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def retries(self) -> int:
        """Failed attempts that were tried again."""
        return self._retries

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def close_deadline(self) -> float:
        """``time.monotonic()`` by which ``close`` wants the workers done (inf until then)."""
        return self._close_deadline

    def count_sent(self, n: int) -> None:
        with self._cond:
            self._sent += n

    def count_failed(self, n: int) -> None:
        with self._cond:
            self._failed += n

    def count_retry(self) -> None:
        with self._cond:
            self._retries += 1

    def pause(self, seconds: float) -> None:
        """Sleep between attempts; returns early when ``close`` starts."""
        self._closed.wait(seconds)

    def write(self, records: list[FlowRecord], block: bool = False) -> None:
        """Queue records; a full queue drops the rest, or with ``block`` waits for room."""
        start = 0
        with self._cond:
            while start < len(records):
                if self._closed.is_set():
                    break
                room = self.max_queue_size - len(self._queue)
                if room <= 0:
                    if not block:
                        break
                    self._cond.wait()
                    continue
                if not self._queue:
                    self._first_at = time.monotonic()
                end = min(len(records), start + room)
                self._queue.extend(records[start:end])
                start = end
                self._cond.notify_all()
            self._dropped += len(records) - start

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Export what is queued for up to ``timeout`` seconds; what is left is dropped."""
        with self._cond:
            if self._closed.is_set():
                return
            self._close_deadline = time.monotonic() + timeout
            self._closed.set()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(max(0.0, self._close_deadline - time.monotonic()))
        with self._cond:
            self._dropped += len(self._queue)
            self._queue.clear()
        self.shutdown()

    def shutdown(self) -> None:
        """Release resources after the workers stopped (subclasses)."""

    def export(self, batch: list[FlowRecord]) -> None:
        """Deliver one batch and count every record of it (subclasses)."""
        raise NotImplementedError

    def _next_batch(self) -> list[FlowRecord] | None:
        with self._cond:
            while True:
                waiting = len(self._queue)
                due = self._first_at + self.max_batch_interval
                now = time.monotonic()
                closing = self._closed.is_set()
                if waiting >= self.max_batch_size or (waiting and (closing or now >= due)):
                    if closing and now >= self._close_deadline:
                        return None
                    take = min(waiting, self.max_batch_size)
                    batch = [self._queue.popleft() for _ in range(take)]
                    self._first_at = now
                    self._cond.notify_all()  # room for blocked writers, work for idle workers
                    return batch
                if closing:
                    return None
                self._cond.wait(due - now if waiting else None)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self.export(batch)
            except Exception:  # a bug must not kill the worker: count and go on
                log.exception("%s: exporting a batch of %d records failed", self.name, len(batch))
                self.count_failed(len(batch))
