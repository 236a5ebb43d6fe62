"""Pipeline channels and stage shutdown: exact accounting, stop() without idle waits, and
the sharding of new-flow events over workers."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from mermin_cli.engine.layout import EVENT_DTYPE
from mermin_cli.metrics.registry import Metrics
from mermin_cli.pipeline.channel import Channel
from mermin_cli.pipeline.stages import IDLE_WAIT, EventReader, Exporter, shard_of


def test_full_channel_drops_and_counts() -> None:
    ch: Channel[int] = Channel("t", capacity=3)
    assert ch.put_many([1, 2]) == 2
    assert ch.put_many([3, 4, 5]) == 1
    assert (ch.accepted, ch.dropped, len(ch)) == (3, 2, 3)
    assert ch.get_many(2, timeout=0) == [1, 2]
    assert (ch.taken, len(ch)) == (2, 1)


def test_drain_ends_a_waiting_get_and_later_ones_never_wait() -> None:
    ch: Channel[int] = Channel("t", capacity=8)
    got: list[list[int]] = []
    taker = threading.Thread(target=lambda: got.append(ch.get_many(8, timeout=30)))
    taker.start()
    time.sleep(0.1)  # the taker is waiting
    started = time.monotonic()
    ch.drain()
    taker.join(timeout=5)
    assert got == [[]] and time.monotonic() - started < 1
    started = time.monotonic()
    assert ch.get_many(8, timeout=30) == []
    assert time.monotonic() - started < 1


class ListSink:
    name = "list"
    sent = failed = dropped = 0

    def __init__(self) -> None:
        self.records: list[Any] = []

    def write(self, records: list[Any]) -> None:
        self.records += records

    def close(self) -> None:
        pass


def test_stage_stop_exports_everything_without_an_idle_wait() -> None:
    source: Channel[Any] = Channel("spans", capacity=100)
    sink = ListSink()
    stage = Exporter(source, [sink], Metrics())
    stage.start()
    time.sleep(0.2)  # idle: waiting up to IDLE_WAIT for input
    source.put_many(list(range(10)))
    started = time.monotonic()
    stage.stop()
    assert time.monotonic() - started < IDLE_WAIT / 2
    assert sink.records == list(range(10))
    assert not stage.is_alive()


def test_events_shard_by_flow_key_alone() -> None:
    events = np.zeros(4000, dtype=EVENT_DTYPE)
    events["key"]["lo_port"] = np.arange(4000) % 1000  # each flow four times
    events["key"]["ip_ver"] = 4
    events["ip_len"] = np.arange(4000)  # differs: must not matter
    events["ts"] = np.arange(4000) * 7
    shards = shard_of(events, 4)
    assert shards.shape == (4000,)
    assert (shards[:1000] == shards[1000:2000]).all() and (shards[:1000] == shards[3000:]).all()
    assert np.bincount(shards[:1000], minlength=4).min() >= 200  # 250 each on average


class IdleRings:
    """Rings with nothing in them (the reader's view: `read()` and `slots`)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.reads = 0

    def read(self) -> np.ndarray:
        self.reads += 1
        return np.empty(0, dtype=EVENT_DTYPE)


@pytest.mark.parametrize("slots", [1, 2, 1024])
def test_idle_event_reader_waits_between_reads(slots: int) -> None:
    rings = IdleRings(slots)
    reader = EventReader(rings, [Channel("w", 4)], Metrics())  # type: ignore[arg-type]
    reader.start()
    time.sleep(0.5)
    reader.stop()
    assert 3 <= rings.reads <= 10  # 20, 40, 80, then every 100 ms: not a busy loop
