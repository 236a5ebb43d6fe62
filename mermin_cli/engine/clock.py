"""The flow table's time base in live capture: kernel jiffies, converted to monotonic ns.

bpf/flow.c stamps first/last-seen with jiffies because reading them is one load (the
coarse clock costs a seqcount loop and two calls on every packet). A jiffy is one tick,
whose length is the resolution of CLOCK_MONOTONIC_COARSE; jiffies advance in step with
CLOCK_MONOTONIC (the kernel derives them from it), so one observed tick edge is enough:
tick ``j`` starts at ``edge_ns + (j - edge_jiffies) * tick_ns``.
"""

from __future__ import annotations

import ctypes
import struct
import time

import numpy as np

from mermin_cli.engine import bpfsys
from mermin_cli.engine.layout import STATS_DTYPE

CLOCK_MONOTONIC_COARSE = 6  # <linux/time.h>; Python's time module does not export it
PROBE_FRAME = bytes(14)  # the smallest frame BPF_PROG_TEST_RUN accepts
TIME_FIELDS = ("first_ns", "last_ns")
TIMES_OFFSET = STATS_DTYPE.fields["first_ns"][1]
TIMES = struct.Struct("<QQ")  # first_ns, last_ns: adjacent
assert STATS_DTYPE.fields["last_ns"][1] == TIMES_OFFSET + 8


class TickClock:
    """Converts the table's jiffies timestamps to CLOCK_MONOTONIC nanoseconds."""

    def __init__(self, edge_jiffies: int, edge_ns: int, tick_ns: int, window_ns: int = 0) -> None:
        self.edge_jiffies = edge_jiffies
        self.edge_ns = edge_ns
        self.tick_ns = tick_ns
        # The true edge lies within window_ns after edge_ns (two readings of jiffies), so
        # converted times are up to that much earlier than the tick they stand for.
        self.window_ns = window_ns
        self._base = edge_ns - edge_jiffies * tick_ns  # ns of jiffy 0 (may be negative)

    @classmethod
    def calibrate(cls, prog_fd: int, map_fd: int) -> TickClock:
        """Watch jiffies (through the program's mermin_clock entry) until they step by one.

        The edge lies after the last reading that still saw the old value started, so the
        converted times are never later than the tick they stand for. Spinning keeps this
        CPU busy, so the tick runs and the step is a real edge, not a catch-up after idle.
        """
        tick_ns = round(time.clock_getres(CLOCK_MONOTONIC_COARSE) * 1e9)
        key = ctypes.create_string_buffer(4)

        def jiffies() -> int:
            bpfsys.prog_test_run(prog_fd, PROBE_FRAME)
            raw = bpfsys.map_lookup(map_fd, key, 8)
            assert raw is not None  # array maps always hold their slots
            return int(struct.unpack("Q", raw)[0])

        deadline = time.monotonic_ns() + 5 * tick_ns + 50_000_000
        started = time.monotonic_ns()
        seen = jiffies()
        while True:
            before = time.monotonic_ns()
            now = jiffies()
            if now == seen + 1 or before > deadline:
                # A timeout (a tick that never came on its own) costs at most a tick of error.
                return cls(now, started, tick_ns, time.monotonic_ns() - started)
            seen, started = now, before

    def to_ns(self, vals: np.ndarray) -> None:
        """Rewrite first/last-seen of stats rows from jiffies to ns, in place."""
        for field in TIME_FIELDS:
            ns = self._base + vals[field].astype(np.int64) * self.tick_ns
            vals[field] = ns.astype(np.uint64)

    def raw_to_ns(self, raw: bytearray) -> None:
        """The same for one stats row as raw bytes: two struct calls, where numpy's
        per-call overhead would dominate (one row per adopted flow)."""
        first, last = TIMES.unpack_from(raw, TIMES_OFFSET)
        base, tick = self._base, self.tick_ns
        TIMES.pack_into(raw, TIMES_OFFSET, base + first * tick, base + last * tick)
