"""The user-space stages of a capture, each a thread joined to the next by a Channel.

    kernel event rings ─► EventReader ─► worker channels ─► Workers (flow creation, filters)
    kernel flow table ─► poller (capture loop, FlowTracker.poll) ─► span channel
      ─► Decorator (hostnames, ...) ─► decorated channel ─► Exporter (stdout, OTLP, ...)

Every hand-over is a non-blocking put: a full channel drops and counts, so a slow stage
never stalls the ones before it (the kernel reader least of all). Only the shutdown
flush waits for room, because records must not be lost on a clean exit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mermin_cli.engine.events import EventRings
from mermin_cli.engine.layout import KEY_DTYPE
from mermin_cli.export.sink import Sink
from mermin_cli.flows.record import FlowRecord
from mermin_cli.flows.tracker import FlowTracker
from mermin_cli.metrics.registry import Metrics
from mermin_cli.pipeline.channel import Channel

log = logging.getLogger("mermin.pipeline")

BATCH = 1024  # items a stage takes from its channel at once
IDLE_WAIT = 1.0  # seconds a stage waits for work (stop() ends the wait at once)
# The rings are read every 20 ms while events come, backing off to 100 ms when idle (an
# empty read costs ~7 us); each CPU's holds flow_events_capacity events meanwhile.
RINGBUF_WAIT = (0.02, 0.1)


class Stage(threading.Thread):
    """A thread that runs `step()` until stopped, then drains its input once more."""

    def __init__(self, name: str, inbox: Channel[Any] | None = None) -> None:
        super().__init__(name=f"mermin-{name}", daemon=True)
        self.inbox = inbox  # the channel it takes work from, woken by stop() (None: ring)
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def step(self) -> int:  # returns the number of items handled
        raise NotImplementedError

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.step()
            while self.step():  # drain what is left
                pass
        except BaseException as exc:  # a dead stage is reported by the capture loop
            self.error = exc
            log.exception("pipeline stage %s failed", self.name)

    def stop(self) -> None:
        self.stopping.set()
        if self.inbox is not None:
            # Nothing more comes (each stage stops after those feeding it): take what is
            # there without waiting, so shutdown costs no idle waits.
            self.inbox.drain()
        self.join(timeout=10)


class EventReader(Stage):
    """Ring stage: new-flow events from the kernel's per-CPU rings, dispatched to worker
    channels (the same flow always to the same worker)."""

    def __init__(self, rings: EventRings, workers: Sequence[Channel[np.void]],
                 metrics: Metrics) -> None:  # fmt: skip
        super().__init__("ringbuf")
        self.rings = rings
        self.workers = workers
        self.metrics = metrics
        self.received = 0
        self.dispatched = 0
        self.dropped = 0
        self._wait = RINGBUF_WAIT[0]

    def step(self) -> int:
        # The rings wake nobody (a wake-up per new flow would cost more than it saves):
        # read every 20 ms while events come, backing off to 100 ms when idle, and back to
        # back only while reads come half full (the kernel drops when a ring fills). Not
        # back to back whenever events come: the reads would then take the GIL from the
        # workers in tiny batches, and the workers' queues overflow.
        events = self.rings.read()
        if len(events):
            self._dispatch(events)
        self._wait = RINGBUF_WAIT[0] if len(events) else min(2 * self._wait, RINGBUF_WAIT[1])
        if len(events) < max(1, self.rings.slots // 2) and not self.stopping.is_set():
            time.sleep(self._wait)
        return len(events)

    def _dispatch(self, events: np.ndarray) -> None:
        self.received += len(events)
        self.metrics.ringbuf_packets.labels(type="received").inc(len(events))
        self.metrics.ringbuf_bytes.inc(events.nbytes)
        shards = shard_of(events, len(self.workers))
        for i, channel in enumerate(self.workers):
            batch = list(events[shards == i])
            if batch:
                accepted = channel.put_many(batch)
                self.dispatched += accepted
                self.dropped += len(batch) - accepted
                self.metrics.events_dropped_backpressure.inc(len(batch) - accepted)


def shard_of(events: np.ndarray, shards: int) -> np.ndarray:
    """A shard per event from its flow key alone (a multiplicative hash of its words)."""
    words = events.view("<u4").reshape(len(events), -1)[:, : KEY_DTYPE.itemsize // 4]
    mixed = np.bitwise_xor.reduce(words, axis=1) * np.uint32(0x9E3779B1)
    return (mixed >> 16) % shards


class Worker(Stage):
    """Worker stage: turns new-flow events into tracked flows (orientation, filters)."""

    def __init__(self, idx: int, channel: Channel[np.void], tracker: FlowTracker, metrics: Metrics,
                 interface_name: Callable[[int], str | None]) -> None:  # fmt: skip
        super().__init__(f"worker-{idx}", channel)
        self.channel = channel
        self.tracker = tracker
        self.metrics = metrics
        self.interface_name = interface_name
        self.outcomes = {"created": 0, "filtered": 0, "known": 0, "gone": 0}

    def step(self) -> int:
        events = self.channel.get_many(BATCH, IDLE_WAIT)
        if not events:
            return 0
        started = time.perf_counter()
        created: Counter[int] = Counter()  # by ifindex; metrics once per batch, not per event
        filtered = 0
        for ev in events:
            outcome = self.tracker.adopt(ev)
            self.outcomes[outcome] += 1
            if outcome == "created":
                created[ev["key"]["ifindex"]] += 1
            elif outcome == "filtered":
                filtered += 1
        m = self.metrics
        m.spans_processed.inc(created.total())
        for ifindex, n in created.items():
            m.spans_created.labels(interface=self.interface_name(int(ifindex)) or "unknown").inc(n)
        if filtered:
            m.spans_filtered.labels(where="userspace").inc(filtered)
        m.latency.labels(stage="flow_ingestion").observe(time.perf_counter() - started)
        return len(events)


class Decorator(Stage):
    """Decoration stage: enrich records (hostnames, ...) and hand them to the exporter."""

    def __init__(
        self,
        source: Channel[FlowRecord],
        target: Channel[FlowRecord],
        decorators: Sequence[Callable[[list[FlowRecord]], None]],
        metrics: Metrics,
    ) -> None:
        super().__init__("decorator", source)
        self.source, self.target = source, target
        self.decorators = decorators
        self.metrics = metrics
        self.flushing = False  # at shutdown: wait for room instead of dropping

    def step(self) -> int:
        records = self.source.get_many(BATCH, IDLE_WAIT)
        if not records:
            return 0
        started = time.perf_counter()
        for decorate in self.decorators:
            decorate(records)
        self.metrics.spans_decorated.inc(len(records))
        self.metrics.latency.labels(stage="decoration").observe(time.perf_counter() - started)
        accepted = self.target.put_many(records, block=self.flushing)
        self.metrics.dropped_export_failure.inc(len(records) - accepted)
        return len(records)


class Exporter(Stage):
    """Export stage: every sink gets every record."""

    def __init__(
        self, source: Channel[FlowRecord], sinks: Sequence[Sink], metrics: Metrics
    ) -> None:
        super().__init__("exporter", source)
        self.source = source
        self.sinks = sinks
        self.metrics = metrics
        self.exported = 0

    def step(self) -> int:
        records = self.source.get_many(BATCH, IDLE_WAIT)
        if not records:
            return 0
        self.metrics.sent_to_exporter.inc(len(records))
        self.metrics.export_batch.observe(len(records))
        for sink in self.sinks:
            started = time.perf_counter()
            sink.write(records)  # queued by OTLP sinks, written at once by stdout
            self.metrics.export_latency.observe(time.perf_counter() - started)
        self.exported += len(records)
        return len(records)


class Pipeline:
    """All user-space stages of one capture, wired with channels sized from the config."""

    def __init__(
        self,
        events: EventRings,
        tracker: FlowTracker,
        metrics: Metrics,
        *,
        workers: int,
        worker_queue: int,
        span_queue: int,
        decorated_queue: int,
        interface_name: Callable[[int], str | None],
        decorators: Sequence[Callable[[list[FlowRecord]], None]],
        sinks: Sequence[Sink],
    ) -> None:
        self.metrics = metrics
        self.worker_channels: list[Channel[np.void]] = [
            Channel(f"worker_{i}", worker_queue) for i in range(workers)
        ]
        self.spans: Channel[FlowRecord] = Channel("flow_span", span_queue)
        self.decorated: Channel[FlowRecord] = Channel("decorated_span", decorated_queue)
        self.reader = EventReader(events, self.worker_channels, metrics)
        self.workers = [
            Worker(i, ch, tracker, metrics, interface_name)
            for i, ch in enumerate(self.worker_channels)
        ]
        self.decorator = Decorator(self.spans, self.decorated, decorators, metrics)
        self.exporter = Exporter(self.decorated, sinks, metrics)
        self.records_in = 0  # records the poller handed to the pipeline
        for ch in self.channels:
            metrics.channel_capacity.labels(channel=ch.name).set(ch.capacity)

    @property
    def channels(self) -> list[Channel[Any]]:
        return [*self.worker_channels, self.spans, self.decorated]

    @property
    def stages(self) -> list[Stage]:
        return [self.reader, *self.workers, self.decorator, self.exporter]

    def start(self) -> None:
        for stage in self.stages:
            stage.start()

    def emit(self, records: list[FlowRecord], block: bool = False) -> None:
        """Poller stage output: records into the span channel (full: dropped and counted)."""
        self.records_in += len(records)
        for r in records:
            self.metrics.spans_expired.labels(reason=r.attributes["flow.end_reason"]).inc()
        self.spans.put_many(records, block=block)

    def failed(self) -> Stage | None:
        return next((s for s in self.stages if s.error is not None), None)

    def finish(self, final: list[FlowRecord]) -> None:
        """Shutdown: stop intake, hand over the final records without loss, drain, stop."""
        for stage in (self.reader, *self.workers):
            stage.stop()
        self.decorator.flushing = True
        self.emit(final, block=True)
        self.decorator.stop()
        self.exporter.stop()

    def refresh_metrics(self) -> None:
        m = self.metrics
        for ch in self.channels:
            m.channel_size.labels(channel=ch.name).set(len(ch))
            m.advance(m.channel_dropped, "channel_dropped", ch.dropped, channel=ch.name)
        for sink in self.exporter.sinks:
            for status, total in (("ok", sink.sent), ("error", sink.failed),
                                  ("dropped", sink.dropped)):  # fmt: skip
                m.advance(m.export_spans, "export", total, exporter=sink.name, status=status)
            m.advance(m.dropped_export_failure, f"sink {sink.name}", sink.failed + sink.dropped)

    def status(self) -> dict[str, Any]:
        """Per-stage accounting: in == out + dropped (+ filtered) for every stage."""
        outcomes = {k: sum(w.outcomes[k] for w in self.workers) for k in self.workers[0].outcomes}
        return {
            "ringbuf": {
                "received": self.reader.received,
                "dispatched": self.reader.dispatched,
                "dropped_backpressure": self.reader.dropped,
            },
            "workers": {"in": sum(ch.taken for ch in self.worker_channels), **outcomes},
            "poller": {"records": self.records_in},
            "flow_span_channel": _channel(self.spans),
            "decorated_span_channel": _channel(self.decorated),
            "exporter": {
                "in": self.decorated.taken,
                "handed_to_sinks": self.exporter.exported,
                "sinks": {
                    s.name: {"sent": s.sent, "failed": s.failed, "dropped": s.dropped}
                    for s in self.exporter.sinks
                },
            },
            "worker_channels": [_channel(ch) for ch in self.worker_channels],
        }


def _channel(ch: Channel[Any]) -> dict[str, int]:
    return {
        "capacity": ch.capacity,
        "size": len(ch),
        "accepted": ch.accepted,
        "dropped": ch.dropped,
        "taken": ch.taken,
    }
