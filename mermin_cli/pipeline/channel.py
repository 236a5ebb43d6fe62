"""Bounded queues between pipeline stages: a put never blocks; a full queue drops and counts."""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Channel(Generic[T]):
    """A bounded FIFO of items with exact accounting: accepted == taken + size, and every
    item offered is either accepted or counted in `dropped`."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.accepted = 0
        self.dropped = 0
        self.taken = 0
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._draining = False

    def __len__(self) -> int:
        return len(self._items)

    def put_many(self, items: list[T], block: bool = False) -> int:
        """Append what fits (all of it when `block`, waiting for room); returns how many."""
        with self._cond:
            if block:
                for item in items:
                    while len(self._items) >= self.capacity:
                        self._cond.wait()
                    self._items.append(item)
                    self._cond.notify_all()
                self.accepted += len(items)
                return len(items)
            room = max(0, self.capacity - len(self._items))
            taken = items[:room]
            self._items.extend(taken)
            self.accepted += len(taken)
            self.dropped += len(items) - len(taken)
            if taken:
                self._cond.notify_all()
            return len(taken)

    def drain(self) -> None:
        """Its taker is stopping: from now on get_many() never waits (a waiting one returns)."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def get_many(self, limit: int, timeout: float) -> list[T]:
        """Up to `limit` items, waiting at most `timeout` seconds for the first one."""
        with self._cond:
            if not self._items and not self._draining:
                self._cond.wait(timeout)
            out = [self._items.popleft() for _ in range(min(limit, len(self._items)))]
            self.taken += len(out)
            if out:
                self._cond.notify_all()
            return out
