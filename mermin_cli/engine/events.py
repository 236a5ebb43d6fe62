"""User space's half of the new-flow event rings in bpf/flow.c.

Each CPU has a ring of `slots` events in the mmapable `event_slots` array; the kernel
advances the CPU's head in `event_heads` after writing a slot, and drops (and counts) an
event when the ring holds `slots` unread ones. `read()` takes every CPU's new events
through mmap, without a system call, then moves the CPU's tail in `event_tails` to its
head, which frees the slots. The kernel alone writes heads and slots, this module alone
writes tails.
"""

from __future__ import annotations

import numpy as np

from mermin_cli.engine.bpfsys import map_mmap
from mermin_cli.engine.clock import TickClock
from mermin_cli.engine.layout import EVENT_DTYPE

POS_STRIDE = 8  # struct event_pos: one u64 and seven of padding (a cache line)
EMPTY = np.empty(0, dtype=EVENT_DTYPE)


class EventRings:
    """The per-CPU new-flow rings of a loaded flow program."""

    def __init__(
        self,
        slots_fd: int,
        heads_fd: int,
        tails_fd: int,
        cpus: int,
        slots: int,
        clock: TickClock | None = None,
    ) -> None:
        """The `event_slots`, `event_heads` and `event_tails` maps; `cpus` rings of `slots`
        events each (a power of two). `clock` converts the events' times to ns, as the
        table's (None: they are ns already)."""
        self.cpus, self.slots = cpus, slots
        self.clock = clock
        pos_bytes = cpus * POS_STRIDE * 8
        self._maps = [
            map_mmap(slots_fd, cpus * slots * EVENT_DTYPE.itemsize),
            map_mmap(heads_fd, pos_bytes),
            map_mmap(tails_fd, pos_bytes, writable=True),
        ]
        events, heads, tails = self._maps
        self._events = np.frombuffer(events, EVENT_DTYPE, cpus * slots).reshape(cpus, slots)
        self._heads = np.frombuffer(heads, "<u8", cpus * POS_STRIDE)[::POS_STRIDE]
        self._tails = np.frombuffer(tails, "<u8", cpus * POS_STRIDE)[::POS_STRIDE]

    def read(self) -> np.ndarray:
        """Every event written since the last read, CPU by CPU, each CPU's in order."""
        heads = self._heads.copy()  # the heads first: the slots below them are written
        parts = []
        for cpu in np.flatnonzero(heads != self._tails):
            head, tail = int(heads[cpu]), int(self._tails[cpu])
            parts.append(self._events[cpu, np.arange(tail, head) & (self.slots - 1)])
            self._tails[cpu] = head  # after the copy: the kernel may now reuse the slots
        if not parts:
            return EMPTY
        events = np.concatenate(parts)
        if self.clock is not None:
            events["ts"] = self.clock.ticks_to_ns(events["ts"])
        return events

    def pending(self) -> int:
        """Events written and not yet read, over all CPUs."""
        return int((self._heads - self._tails).sum())

    def close(self) -> None:
        """Unmap the rings (the views go first: a mapping with live views cannot close)."""
        if self._maps:
            del self._events, self._heads, self._tails
            for mapping in self._maps:
                mapping.close()
            self._maps = []
