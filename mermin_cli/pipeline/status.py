"""What a running capture knows about itself: metrics refresh, loss warnings, the JSON the
local API serves (`mermin flows`, `mermin doctor`) and the summary at exit."""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mermin_cli import __version__
from mermin_cli.engine.attach import Attacher
from mermin_cli.engine.compiler import EVENT_BYTES
from mermin_cli.engine.program import FlowProgram
from mermin_cli.flows import names
from mermin_cli.flows.tracker import FlowTracker, tcp_state
from mermin_cli.metrics.registry import Metrics
from mermin_cli.pipeline.hooks import Hooks
from mermin_cli.pipeline.stages import Pipeline

if TYPE_CHECKING:
    from mermin_cli.pipeline.capture import Capture

log = logging.getLogger("mermin.capture")

USAGE_WARNING = 0.8  # warn when the flow table is this full


@dataclass
class RunState:
    """The parts of one capture run, and the views built from them."""

    capture: Capture
    program: FlowProgram
    attacher: Attacher
    hooks: Hooks
    tracker: FlowTracker
    pipeline: Pipeline
    metrics: Metrics
    counters: dict[str, int] = field(default_factory=dict)
    _warned_usage: bool = False

    # -- per poll --------------------------------------------------------------------

    def refresh(self) -> None:
        """Metrics from the kernel counters and pipeline state; warnings on loss."""
        before, now = self.counters, self.program.counters()
        self.counters = now
        m = self.metrics
        m.advance(m.packets_processed, "packets", now["packets"])
        for name, value in now.items():
            m.advance(m.kernel, "kernel", value, counter=name)
        m.advance(m.ringbuf_packets, "rb_dropped", now["events_dropped"], type="dropped")
        m.advance(m.spans_filtered, "filtered_kernel", now["filtered_flows"], where="kernel")
        capacity = self.program.max_flows
        m.map_size.labels(map="FLOW_STATS").set(self.tracker.table_size)
        m.map_capacity.labels(map="FLOW_STATS").set(capacity)
        events = self.program.events
        m.map_size.labels(map="FLOW_EVENTS").set(events.pending() * EVENT_BYTES)  # bytes
        m.map_capacity.labels(map="FLOW_EVENTS").set(self.program.event_bytes)
        m.map_capacity.labels(map="FILTERED_FLOWS").set(capacity)
        m.store_size.labels(poller_id="0").set(len(self.tracker.flows))
        m.poller_queue.labels(poller_id="0").set(0)  # the poller hands on a poll at once
        active = self._active_by_interface()
        for name, n in active.items():
            m.spans_active.labels(interface=name).set(n)
        m.spans_active_total.set(sum(active.values()))
        self.pipeline.refresh_metrics()
        self._warn(before, now, capacity)

    def _active_by_interface(self) -> dict[str, int]:
        snap = self.tracker.snapshot
        if snap is None:
            return {}
        idx, counts = np.unique(snap[1]["ifindex"], return_counts=True)
        return {
            self.hooks.names.get(int(i), str(int(i))): int(n)
            for i, n in zip(idx, counts, strict=True)
        }

    def _warn(self, before: dict[str, int], now: dict[str, int], capacity: int) -> None:
        def moved(name: str) -> int:
            return now[name] - before.get(name, 0)

        if moved("map_full"):
            log.warning(
                "flow table full (%d entries): %d packets (%d bytes) were not accounted; "
                "raise pipeline.flow_capture.flow_stats_capacity or shorten the span timeouts",
                capacity,
                moved("map_full"),
                moved("map_full_bytes"),
            )
        if moved("cache_lost"):
            log.error(
                "%d cached packets found no flow entry to drain into; this is a bug in "
                "mermin, please report it",
                moved("cache_lost"),
            )
        usage = self.tracker.table_size / capacity
        if usage >= USAGE_WARNING and not self._warned_usage:
            log.warning("flow table is %.0f%% full (%d entries)", usage * 100, capacity)
        self._warned_usage = usage >= USAGE_WARNING
        for name, what, setting in (
            ("events_dropped", "new-flow events lost in the kernel (ring buffer full)",
             "pipeline.flow_capture.flow_events_capacity"),
        ):  # fmt: skip
            if moved(name) > 0:
                log.warning("%d %s; raise %s", moved(name), what, setting)

    def summary(self) -> None:
        c = self.counters
        drops = self.pipeline.status()
        log.info(
            "done: %d packets seen, %d flows, %d records; filtered: %d flows (%d packets) "
            "in the kernel, %d flows after; not accounted: %d packets (table full), "
            "%d non-IP, %d truncated; dropped: %d events, %d records",
            c["packets"],
            c["new_flows"],
            self.tracker.records_emitted,
            c["filtered_flows"],
            c["filtered_packets"],
            self.tracker.filtered,
            c["map_full"],
            c["non_ip"],
            c["truncated"],
            drops["ringbuf"]["dropped_backpressure"],
            drops["flow_span_channel"]["dropped"] + drops["decorated_span_channel"]["dropped"],
        )

    # -- API views -------------------------------------------------------------------

    def live(self) -> dict[str, bool]:
        return {"ebpf_loaded": True, "pipeline_running": self.pipeline.failed() is None}

    def ready(self) -> dict[str, bool]:
        return {
            "ebpf_loaded": True,
            "interfaces_attached": bool(self.attacher.attached),
            "first_poll_done": self.tracker.snapshot is not None,
            "pipeline_running": self.pipeline.failed() is None,
        }

    def status(self) -> dict[str, Any]:
        cfg = self.capture.config
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started_unix_nano": self.capture.started_ns,
            "attach_mode": self.attacher.mode,
            "interfaces": [
                {"index": i, "name": a.iface.name}
                for i, a in sorted(self.attacher.attached.items())
            ],
            "patterns": list(self.hooks.patterns),
            "kernel": dict(self.counters),
            "table": {
                "entries": self.tracker.table_size,
                "capacity": self.program.max_flows,
                **self.program.table.occupancy(),
            },
            "flow_cache": self._flow_cache(),
            "flows": {
                "tracked": len(self.tracker.flows),
                "records": self.tracker.records_emitted,
                "zero_suppressed": self.tracker.zero_suppressed,
                "evicted": self.tracker.evicted,
                "filtered_userspace": self.tracker.filtered,
                "last_poll_ms": round(self.tracker.last_poll_seconds * 1000, 2),
            },
            "pipeline": self.pipeline.status(),
            "exporters": [
                {
                    "name": sink.name,
                    "sent": sink.sent,
                    "failed": sink.failed,
                    "dropped": sink.dropped,
                    "last_error": getattr(sink, "last_error", None),
                }
                for sink in self.pipeline.exporter.sinks
            ],
            "config": {
                "poll_interval": cfg.pipeline.flow_producer.flow_store_poll_interval,
                "filters": bool(self.tracker.flow_filter) or self._kernel_filters(),
            },
        }

    def _flow_cache(self) -> dict[str, Any]:
        cache = self.program.cache
        if cache is None:
            return {"enabled": False, "off_reason": "offline input"}
        return {"enabled": cache.enabled, "off_reason": cache.off_reason}

    def _kernel_filters(self) -> bool:
        return bool(self.program.bpf[b"filter_cfg"][ctypes.c_int(0)].active)

    def flows(self, limit: int) -> dict[str, Any]:
        """Active flows from the last poll, biggest first, with rates since the poll before."""
        snap = self.tracker.snapshot
        if snap is None:
            return {"time_unix_nano": 0, "flows": []}
        now, keys, vals = snap
        offset = self.tracker.clock.wall_offset_ns()
        total = vals["bytes"].sum(axis=1)
        order = np.argsort(-total.astype(np.int64), kind="stable")[: max(0, limit)]
        prev: dict[bytes, tuple[int, int]] = {}
        interval = 1.0
        if (before := self.tracker.previous_snapshot) is not None:
            p_now, p_keys, p_vals = before
            interval = max(1, now - p_now) / 1e9
            p_bytes = p_vals["bytes"].sum(axis=1).tolist()
            p_pkts = p_vals["packets"].sum(axis=1).tolist()
            prev = {k.tobytes(): (b, n) for k, b, n in zip(p_keys, p_bytes, p_pkts, strict=True)}
        out = []
        for i in order:
            key, stats = keys[i], vals[i]
            kb = key.tobytes()
            state = self.tracker.flows.get(kb)
            fwd = state.fwd if state else int(stats["first_dir"])
            pk = [int(stats["packets"][fwd]), int(stats["packets"][1 - fwd])]
            by = [int(stats["bytes"][fwd]), int(stats["bytes"][1 - fwd])]
            before = prev.get(kb, (0, 0))
            out.append(
                {
                    **_endpoints(
                        key,
                        fwd,
                        self.tracker.static_attributes(key, stats, state) if state else None,
                    ),
                    "network.interface.name": self.hooks.names.get(int(key["ifindex"]), ""),
                    "kind": state.kind if state else "",
                    "state": _tcp_state(key, stats, fwd),
                    "packets": pk,
                    "bytes": by,
                    "bytes_per_second": round((sum(by) - before[0]) / interval, 1),
                    "packets_per_second": round((sum(pk) - before[1]) / interval, 1),
                    "first_seen_unix_nano": int(stats["first_ns"]) + offset,
                    "last_seen_unix_nano": int(stats["last_ns"]) + offset,
                }
            )
        return {"time_unix_nano": now + offset, "flows": out}


ENDPOINT_FIELDS = (
    "source.address", "source.port", "destination.address", "destination.port",
    "network.type", "network.transport",
)  # fmt: skip


def _endpoints(key: np.void, fwd: int, known: dict[str, Any] | None) -> dict[str, Any]:
    """Who talks to whom: from the tracked flow when known, else from the raw key."""
    if known is not None:
        return {k: known[k] for k in ENDPOINT_FIELDS}
    ip_ver, proto = int(key["ip_ver"]), int(key["proto"])
    width = 4 if ip_ver == 4 else 16
    lo = str(ipaddress.ip_address(key["lo_addr"].tobytes()[:width]))
    hi = str(ipaddress.ip_address(key["hi_addr"].tobytes()[:width]))
    ends = [(lo, int(key["lo_port"])), (hi, int(key["hi_port"]))]
    src, dst = (ends[0], ends[1]) if fwd == 0 else (ends[1], ends[0])
    return {
        "source.address": src[0],
        "source.port": src[1],
        "destination.address": dst[0],
        "destination.port": dst[1],
        "network.type": f"ipv{ip_ver}",
        "network.transport": names.transport_name(proto),
    }


def _tcp_state(key: np.void, stats: np.void, fwd: int) -> str:
    if int(key["proto"]) != 6:
        return ""
    return tcp_state(int(stats["tcp_flags"][fwd]), int(stats["tcp_flags"][1 - fwd]), stats, fwd)
