"""Every internal metric of a capture run, in one registry, with the seed documents' names.

Counters that mirror kernel counters or pipeline state are refreshed from them once per
poll (`Metrics.refresh`), so a scrape never touches the kernel.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("flow_ingestion", "flow_poll", "decoration", "export")
LATENCY_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000)


class Metrics:
    """The metric objects; one instance per capture run (own registry, so tests can
    run several without clashes)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.packets_processed = Counter(
            "mermin_packets_processed", "Packets seen by the eBPF programs", registry=r
        )
        self.kernel = Counter(
            "mermin_ebpf_events",
            "Per-CPU kernel counters summed (parse errors, table full, filtered, ...)",
            ["counter"],
            registry=r,
        )
        self.ringbuf_packets = Counter(
            "mermin_ringbuf_packets",
            "New-flow events from the ring buffer (received) or lost in the kernel (dropped)",
            ["type"],
            registry=r,
        )
        self.ringbuf_bytes = Counter(
            "mermin_ringbuf_bytes", "Bytes of new-flow events received", registry=r
        )
        self.events_dropped_backpressure = Counter(
            "mermin_flow_events_dropped_backpressure",
            "New-flow events dropped because every worker queue was full",
            registry=r,
        )
        self.spans_processed = Counter(
            "mermin_flow_spans_processed", "New flows processed by the workers", registry=r
        )
        self.spans_filtered = Counter(
            "mermin_flow_spans_filtered",
            "Flows rejected by the filters",
            ["where"],  # kernel | userspace
            registry=r,
        )
        self.spans_created = Counter(
            "mermin_flow_spans_created", "Flows created", ["interface"], registry=r
        )
        self.spans_active = Gauge(
            "mermin_flow_spans_active", "Active flows", ["interface"], registry=r
        )
        self.spans_active_total = Gauge(
            "mermin_flow_spans_active_total", "Active flows on all interfaces", registry=r
        )
        self.store_size = Gauge(
            "mermin_flow_store_size", "Flows in the flow store", ["poller_id"], registry=r
        )
        self.poller_queue = Gauge(
            "mermin_flow_poller_queue_size",
            "Flows due for a record in the current poll, not yet handed on",
            ["poller_id"],
            registry=r,
        )
        self.spans_expired = Counter(
            "mermin_flow_spans_expired", "Flow records emitted", ["reason"], registry=r
        )
        self.spans_decorated = Counter(
            "mermin_flow_spans_decorated", "Records through the decoration stage", registry=r
        )
        self.channel_size = Gauge(
            "mermin_channel_size", "Entries in a pipeline queue", ["channel"], registry=r
        )
        self.channel_capacity = Gauge(
            "mermin_channel_capacity", "Capacity of a pipeline queue", ["channel"], registry=r
        )
        self.channel_dropped = Counter(
            "mermin_channel_dropped", "Entries dropped: queue full", ["channel"], registry=r
        )
        self.latency = Histogram(
            "mermin_processing_latency_seconds",
            "Time spent per batch in a stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sent_to_exporter = Counter(
            "mermin_flow_spans_sent_to_exporter", "Records handed to the exporters", registry=r
        )
        self.export_spans = Counter(
            "mermin_export_spans", "Records exported", ["exporter", "status"], registry=r
        )
        self.dropped_export_failure = Counter(
            "mermin_flow_spans_dropped_export_failure",
            "Records lost at the export stage (queue full or exporter failure)",
            registry=r,
        )
        self.export_latency = Histogram(
            "mermin_export_latency_seconds",
            "Time to hand one batch to an exporter",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.export_batch = Histogram(
            "mermin_export_batch_size",
            "Records per export batch",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.map_size = Gauge("mermin_ebpf_map_size", "Entries in an eBPF map", ["map"], registry=r)
        self.map_capacity = Gauge(
            "mermin_ebpf_map_capacity", "Capacity of an eBPF map", ["map"], registry=r
        )
        self.method = Gauge(
            "mermin_ebpf_method", "How programs are attached (1 = in use)", ["attachment"],
            registry=r,
        )  # fmt: skip
        self._last: dict[str, float] = {}

    def advance(self, metric: Counter, key: str, total: float, **labels: str) -> None:
        """Move a counter to an absolute `total` taken from elsewhere (kernel, sinks)."""
        slot = key + repr(sorted(labels.items()))
        delta = total - self._last.get(slot, 0)
        if delta > 0:
            (metric.labels(**labels) if labels else metric).inc(delta)
            self._last[slot] = total
