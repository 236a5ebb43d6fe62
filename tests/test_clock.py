"""How TickClock turns readings of jiffies into a time base: pure logic against a model
of the kernel's tick (the live calibration is tested in test_bpf_parser.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mermin_cli.engine.clock import Reading, TickClock, ticks_aligned
from mermin_cli.engine.layout import STATS_DTYPE

TICK = 4_000_000  # HZ 250
US = 1_000
JIFFY0 = 4_294_892_296  # INITIAL_JIFFIES at HZ 250


class Ticks:
    """A tick whose edges lie `phase` ns after multiples of `tick` and whose interrupts
    (which make a jiffy show) come `delay(j)` ns after jiffy j's edge."""

    def __init__(self, tick: int, phase: int, delays: dict[int, int]) -> None:
        self.tick, self.phase, self.delays = tick, phase, delays
        self.origin = 7_777 * tick + phase  # monotonic ns of jiffy JIFFY0's edge

    def edge(self, jiffies: int) -> int:
        return self.origin + (jiffies - JIFFY0) * self.tick

    def shown(self, t: int) -> int:
        """The jiffies a reading at monotonic `t` returns."""
        j = JIFFY0 + (t - self.origin) // self.tick
        while t < self.edge(j) + self.delays.get(j, 0):  # this jiffy's interrupt is late
            j -= 1
        return j

    def readings(self, start: int, ticks: int = 2, preempted: int = 0) -> list[Reading]:
        """Back-to-back readings (12 us each) for `ticks` ticks from `start`; with
        `preempted`, the task loses the CPU for that long right after every edge."""
        rng = random.Random(start)
        out, t = [], start
        while t < start + ticks * self.tick:
            at = t + rng.randrange(2 * US, 8 * US)  # the jiffies load within the reading
            after = t + 12 * US
            if preempted and (after - self.origin) % self.tick < preempted:
                after += preempted  # the edge's tick switched to another task
            out.append(Reading(self.shown(at), t, after))
            t = after
        return out


def converted(clock: TickClock, jiffies: int) -> int:
    row = np.zeros(1, STATS_DTYPE)
    row["first_ns"] = jiffies
    clock.to_ns(row)
    return int(row["first_ns"][0])


@pytest.mark.parametrize(
    ("delays", "preempted"),
    [
        ({}, 0),
        ({JIFFY0 + 2: 3_900 * US, JIFFY0 + 3: 1_500 * US}, 0),  # late interrupts
        ({}, 2_000 * US),  # preempted at every tick (busy CPU)
        ({JIFFY0 + 2: 2_500 * US, JIFFY0 + 3: 2_500 * US}, 2_000 * US),  # both
    ],
)
@pytest.mark.parametrize("start_us", [1_000, 3_990, 4_100])  # where in a tick it starts
def test_aligned_ticks_give_the_exact_edge(
    delays: dict[int, int], preempted: int, start_us: int
) -> None:
    ticks = Ticks(TICK, 0, delays)
    readings = ticks.readings(ticks.edge(JIFFY0 + 1) + start_us * US, 2, preempted)
    clock = TickClock.from_readings(readings, TICK, aligned=True)
    assert clock.window_ns == 0
    for j in (JIFFY0, JIFFY0 + 3, JIFFY0 + 1_000_000):
        assert converted(clock, j) == ticks.edge(j)


def test_aligned_ticks_at_hz_300() -> None:
    """TICK_NSEC is 3,333,333 ns at HZ 300; the arithmetic stays exact in integers."""
    tick = 3_333_333
    ticks = Ticks(tick, 0, {JIFFY0 + 1: 700 * US})
    clock = TickClock.from_readings(ticks.readings(ticks.edge(JIFFY0) + 123_456), tick, True)
    assert converted(clock, JIFFY0 + 123_456) == ticks.edge(JIFFY0 + 123_456)


def test_unaligned_ticks_take_the_first_reading_after_a_timely_interrupt() -> None:
    """Without alignment the reading that started earliest relative to its jiffy stands
    for the edge: early by at most its width, late by at most its interrupt's delay."""
    ticks = Ticks(TICK, 1_234_567, {JIFFY0 + 1: 900 * US, JIFFY0 + 2: 30 * US})
    clock = TickClock.from_readings(ticks.readings(ticks.edge(JIFFY0) + 50 * US), TICK, False)
    error = converted(clock, JIFFY0 + 9) - ticks.edge(JIFFY0 + 9)
    assert clock.window_ns == 12 * US
    assert -clock.window_ns <= error <= 30 * US  # jiffy +2's interrupt, not +1's


@pytest.mark.parametrize(
    ("release", "aligned"),
    [
        ("6.18.0-custom", True),
        ("6.4.0", True),
        ("6.3.13-arch1-1", False),
        ("6.1.0-18-amd64", False),  # Debian 12
        ("5.15.0-91-generic", False),
        ("10.0.0", True),
        ("unknown", False),
    ],
)
def test_ticks_aligned_from_release(release: str, aligned: bool) -> None:
    assert ticks_aligned(release) is aligned
