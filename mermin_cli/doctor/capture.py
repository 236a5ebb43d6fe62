"""Checks of a running capture, through its local API: alive, packets arriving, records
leaving, drops, flow-table use."""

from __future__ import annotations

import time
from typing import Any

from mermin_cli.doctor.context import Context
from mermin_cli.doctor.framework import Check, Outcome, failed, passed, skipped, warned
from mermin_cli.pipeline.status import USAGE_WARNING
from mermin_cli.views.source import ApiUnavailable

MAX_WAIT = 6.0  # seconds doctor waits for the capture's next poll
# (where in the status, what is lost, the setting to raise)
DROP_POINTS = (
    (("kernel", "events_dropped"), "new-flow events lost in the kernel (ring buffer full)",
     "pipeline.flow_capture.flow_events_capacity"),
    (("pipeline", "ringbuf", "dropped_backpressure"),
     "new-flow events dropped (worker queues full)",
     "pipeline.flow_producer.workers or worker_queue_capacity"),
    (("pipeline", "flow_span_channel", "dropped"), "records dropped before decoration (queue full)",
     "pipeline.flow_producer.flow_span_queue_capacity"),
    (("pipeline", "decorated_span_channel", "dropped"),
     "records dropped before the exporters (queue full)",
     "pipeline.k8s_decorator.decorated_span_queue_capacity"),
)  # fmt: skip


def _get(status: dict[str, Any], path: tuple[str, ...]) -> int:
    value: Any = status
    for key in path:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return value if isinstance(value, int) else 0


def _running(ctx: Context) -> Outcome:
    try:
        status = ctx.capture()
    except ApiUnavailable as exc:
        return skipped(
            str(exc), 'start `mermin capture` with internal "server" enabled, or pass --api URL'
        )
    names = ", ".join(i["name"] for i in status["interfaces"]) or "no interface"
    age = (time.time_ns() - status["started_unix_nano"]) / 1e9
    seen = (
        f"pid {status['pid']} (mermin {status['version']}) at {ctx.api.url}, up {age:.0f}s,"
        f" {status['attach_mode']} on {names}"
    )
    try:
        ctx.api.get("/livez")
    except ApiUnavailable as exc:
        return failed(
            f"{seen}; not live: {exc}",
            "the capture's pipeline stopped: see its log (stderr) and restart it",
        )
    if not ctx.api.ready():
        return warned(
            f"{seen}; not ready (/readyz): it is ready once attached and polled once",
            "if it just started, run doctor again after a poll interval; else see attach.*",
        )
    return passed(seen)


def _packets(ctx: Context) -> Outcome:
    before = ctx.capture()
    wait = min(MAX_WAIT, before["config"]["poll_interval"] + 0.3)
    time.sleep(wait)
    after = ctx.refresh_capture()
    total = _get(after, ("kernel", "packets"))
    recent = total - _get(before, ("kernel", "packets"))
    names = ", ".join(i["name"] for i in after["interfaces"]) or "no interface"
    if recent > 0:
        return passed(f"{recent} packets in the last {wait:.1f}s on {names} ({total} since start)")
    fix = (
        "send traffic through the captured interfaces; if traffic flows, it may take another"
        " path (`mermin interfaces`, `ip route get ADDRESS`) or a program ahead of mermin ends"
        " it (attach.conflicts)"
    )
    if total == 0:
        return failed(f"no packet seen on {names} since the capture started", fix)
    return warned(f"no packet in the last {wait:.1f}s on {names} ({total} since start)", fix)


def _exporters(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The capture's exporters: name, sent, failed, dropped, last_error (when it says)."""
    return list(status.get("exporters", []))


def _flows_exported(ctx: Context) -> Outcome:
    status = ctx.capture()
    created = _get(status, ("kernel", "new_flows"))
    records = _get(status, ("flows", "records"))
    exported = _get(status, ("pipeline", "exporter", "exported"))
    seen = f"flows created: {created}, records produced: {records}, exported: {exported}"
    exporters = _exporters(status)
    failing = [e for e in exporters if e.get("failed")]
    report = "; ".join(
        f"{e['name']}: {e.get('sent', 0)} sent, {e.get('failed', 0)} failed"
        + (f" ({e['last_error']})" if e.get("last_error") else "")
        for e in exporters
    )
    if report:
        seen += f"; {report}"
    fix = "run `mermin doctor --check export` to test the collector; see the capture's log"
    if failing and not any(e.get("sent") for e in failing):
        return failed(seen, fix)
    if failing:
        return warned(seen, fix)
    if created and not records:
        return passed(f"{seen}: flows give records when they end or every span.max_record_interval")
    return passed(seen)


def _drops(ctx: Context) -> Outcome:
    status = ctx.capture()
    drops = [
        f"{count} {what} (raise {setting})"
        for path, what, setting in DROP_POINTS
        if (count := _get(status, path))
    ]
    drops += [
        f"{e['dropped']} records dropped by exporter {e['name']} (queue full; raise"
        " export.traces.otlp.max_queue_size)"
        for e in _exporters(status)
        if e.get("dropped")
    ]
    if drops:
        return warned(
            "; ".join(drops) + " since the capture started",
            "raise the named settings (or add CPU, more workers); restart the capture",
        )
    return passed("no drops at any stage (kernel ring buffer, worker queues, span queues)")


def _map_usage(ctx: Context) -> Outcome:
    status = ctx.capture()
    entries, capacity = status["table"]["entries"], status["table"]["capacity"]
    usage = entries / capacity if capacity else 0.0
    seen = f"flow table {entries} of {capacity} entries ({usage:.0%})"
    problems = []
    if usage >= USAGE_WARNING:
        problems.append(f"{seen}, at or above {USAGE_WARNING:.0%}")
    if lost := _get(status, ("kernel", "map_full")):
        problems.append(f"{lost} packets not accounted because the table was full")
    if evicted := _get(status, ("flows", "evicted")):
        problems.append(f"{evicted} flows closed early to make room (lack_of_resources)")
    if problems:
        return warned(
            "; ".join(problems),
            "raise pipeline.flow_capture.flow_stats_capacity (about 300 B per entry), shorten"
            " the span timeouts, or add filters",
        )
    return passed(seen)


CHECKS = (
    Check(
        "capture.running",
        "a capture answers on its local API, live and ready",
        _running,
        requires=("config.valid",),
    ),
    Check(
        "capture.packets",
        "the capture's packet counter increases",
        _packets,
        requires=("capture.running",),
    ),
    Check(
        "capture.flows_exported",
        "flows created vs records exported; export failures",
        _flows_exported,
        requires=("capture.running",),
    ),
    Check(
        "capture.drops",
        "every drop counter of the pipeline is zero",
        _drops,
        requires=("capture.running",),
    ),
    Check(
        "capture.map_usage",
        "flow-table use below 80 %, nothing lost to a full table",
        _map_usage,
        requires=("capture.running",),
    ),
)
