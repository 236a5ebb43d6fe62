"""Read the kernel flow table in bulk and remove expired entries.

One `BPF_MAP_LOOKUP_BATCH` pass copies the whole table into buffers allocated once,
viewed as numpy structured arrays: reading costs a few syscalls, not one per flow.
Expired flows are removed with lookup-and-delete, which returns their final counters
atomically, so packets that arrive between the read and the delete are not lost.
Live, a poll reads and deletes inside `settled()`, which first drains the per-CPU flow
cache into the table (engine/cache.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from mermin_cli.engine import bpfsys
from mermin_cli.engine.cache import FlowCache
from mermin_cli.engine.clock import TickClock
from mermin_cli.engine.layout import KEY_DTYPE, STATS_DTYPE

if TYPE_CHECKING:
    from mermin_cli.engine.program import FlowProgram


class FlowTable:
    """Bulk reader of the `flows` hash map."""

    def __init__(
        self,
        map_fd: int,
        capacity: int,
        lib: ctypes.CDLL,
        clock: TickClock | None,
        cache: FlowCache | None = None,
    ) -> None:
        """`clock` converts the kernel's timestamps; None when they are already ns.
        `cache`: the program's flow cache, drained by `settled()`."""
        self.map_fd = map_fd
        self.clock = clock
        self.cache = cache
        self.capacity = capacity
        self._lib = lib
        self._keys = ctypes.create_string_buffer(KEY_DTYPE.itemsize * capacity)
        self._values = ctypes.create_string_buffer(STATS_DTYPE.itemsize * capacity)
        self._keys_view = np.frombuffer(self._keys, dtype=KEY_DTYPE)
        self._values_view = np.frombuffer(self._values, dtype=STATS_DTYPE)

    @classmethod
    def of(cls, program: FlowProgram, capacity: int) -> FlowTable:
        """The table of a loaded flow program."""
        return cls(program.flows_fd, capacity, program.bpf_lib, program.clock, program.cache)

    def settled(self) -> contextlib.AbstractContextManager[None]:
        """The table holds every packet counted so far, and deletes are safe, in this block."""
        return self.cache.settled() if self.cache else contextlib.nullcontext()

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """Copy of every (key, stats) row currently in the table."""
        total = 0
        in_batch = ctypes.c_uint32(0)
        out_batch = ctypes.c_uint32(0)
        first = True
        while total < self.capacity:
            count = ctypes.c_uint32(self.capacity - total)
            ret = self._lib.bpf_lookup_batch(
                self.map_fd,
                None if first else ctypes.byref(in_batch),
                ctypes.byref(out_batch),
                ctypes.byref(self._keys, total * KEY_DTYPE.itemsize),
                ctypes.byref(self._values, total * STATS_DTYPE.itemsize),
                ctypes.byref(count),
            )
            err = ctypes.get_errno() if ret < 0 else 0
            if ret < 0 and -ret != errno.ENOENT and err != errno.ENOENT:
                raise OSError(err or -ret, f"reading the flow table failed: errno {err or -ret}")
            total += count.value
            if ret < 0:  # ENOENT: the whole table has been read
                break
            in_batch.value = out_batch.value
            first = False
        keys, vals = self._keys_view[:total].copy(), self._values_view[:total].copy()
        if self.clock is not None:
            self.clock.to_ns(vals)
        return keys, vals

    def take(self, key: np.void) -> np.void | None:
        """Remove one flow and return its final stats (None if already gone)."""
        return self._one(bpfsys.map_lookup_and_delete, key)

    def lookup(self, key: np.void) -> np.void | None:
        """Current stats of one flow (None if it is not in the table)."""
        return self._one(bpfsys.map_lookup, key)

    def _one(self, op: Callable[..., bytes | None], key: np.void) -> np.void | None:
        raw = ctypes.create_string_buffer(key.tobytes(), KEY_DTYPE.itemsize)
        value = op(self.map_fd, raw, STATS_DTYPE.itemsize)
        if value is None:
            return None
        if self.clock is None:
            return np.frombuffer(value, dtype=STATS_DTYPE)[0]
        row = bytearray(value)
        self.clock.raw_to_ns(row)
        return np.frombuffer(row, dtype=STATS_DTYPE)[0]
