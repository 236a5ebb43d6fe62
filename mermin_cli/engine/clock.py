"""The flow table's time base in live capture: kernel jiffies, converted to monotonic ns.

bpf/flow.c stamps first/last-seen with jiffies because reading them is one load (the
coarse clock costs a seqcount loop and two calls on every packet). A jiffy is one tick,
whose length is the resolution of CLOCK_MONOTONIC_COARSE. Jiffies advance in step with
CLOCK_MONOTONIC: tick ``j`` starts at ``edge_ns + (j - edge_jiffies) * tick_ns``, and
since Linux 6.4 the kernel puts those edges on multiples of the tick
(``tick_init_jiffy_update``), so a couple of ticks of readings name the edges exactly.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
import time
from typing import NamedTuple

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
        # 0 when the edge is exact (aligned ticks); otherwise how early edge_ns may be.
        self.window_ns = window_ns
        self._base = edge_ns - edge_jiffies * tick_ns  # ns of jiffy 0 (may be negative)

    @classmethod
    def calibrate(cls, prog_fd: int, map_fd: int) -> TickClock:
        """Read jiffies (through the program's mermin_clock entry) for a couple of ticks."""
        tick_ns = round(time.clock_getres(CLOCK_MONOTONIC_COARSE) * 1e9)
        return cls.from_readings(_read_jiffies(prog_fd, map_fd, tick_ns), tick_ns, ticks_aligned())

    @classmethod
    def from_readings(cls, readings: list[Reading], tick_ns: int, aligned: bool) -> TickClock:
        """The clock that readings of jiffies imply.

        A jiffy shows from its tick interrupt on, which comes after the tick's edge (up to
        a few milliseconds on an overloaded VM) and lasts until the next one. So
        `after - jiffies * tick` bounds the ns of jiffy 0 from above, within a tick for
        any reading outside a late interrupt's delay. With aligned ticks that ns is a
        multiple of the tick, which the smallest bound names exactly: converted times are
        then never later than the packet. Otherwise the reading that started earliest
        relative to its jiffy (the first one after a timely interrupt) stands for the
        edge, early by up to its own width, late by its interrupt's delay.
        """
        if aligned:
            upper = min(r.after - r.jiffies * tick_ns for r in readings)
            return cls(0, upper // tick_ns * tick_ns, tick_ns)
        first = min(readings, key=lambda r: r.before - r.jiffies * tick_ns)
        return cls(first.jiffies, first.before, tick_ns, first.after - first.before)

    def to_ns(self, vals: np.ndarray) -> None:
        """Rewrite first/last-seen of stats rows from jiffies to ns, in place."""
        for field in TIME_FIELDS:
            vals[field] = self.ticks_to_ns(vals[field])

    def ticks_to_ns(self, ticks: np.ndarray) -> np.ndarray:
        """Times in jiffies (an array) as ns."""
        return (self._base + ticks.astype(np.int64) * self.tick_ns).astype(np.uint64)

    def raw_to_ns(self, raw: bytearray) -> None:
        """The same for one stats row as raw bytes: two struct calls, where numpy's
        per-call overhead would dominate (one row per adopted flow)."""
        first, last = TIMES.unpack_from(raw, TIMES_OFFSET)
        base, tick = self._base, self.tick_ns
        TIMES.pack_into(raw, TIMES_OFFSET, base + first * tick, base + last * tick)


def ticks_aligned(release: str | None = None) -> bool:
    """Whether this kernel puts tick edges on multiples of the tick (Linux 6.4 and later)."""
    numbers = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return numbers is not None and (int(numbers[1]), int(numbers[2])) >= (6, 4)


class Reading(NamedTuple):
    """One reading of jiffies, between two readings of CLOCK_MONOTONIC (ns)."""

    jiffies: int
    before: int
    after: int


def _read_jiffies(prog_fd: int, map_fd: int, tick_ns: int) -> list[Reading]:
    """Read jiffies back to back for two ticks (a few hundred readings), so that some
    come right after a tick's interrupt even when this task is preempted at ticks. The
    spin keeps this CPU busy, so its tick runs and jiffies are never caught up late."""
    key = ctypes.create_string_buffer(4)
    readings = []
    end = time.monotonic_ns() + 2 * tick_ns
    while True:
        before = time.monotonic_ns()
        bpfsys.prog_test_run(prog_fd, PROBE_FRAME)
        raw = bpfsys.map_lookup(map_fd, key, 8)
        after = time.monotonic_ns()
        assert raw is not None  # array maps always hold their slots
        readings.append(Reading(int(struct.unpack("Q", raw)[0]), before, after))
        if after > end:
            return readings
