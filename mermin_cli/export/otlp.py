"""Exporters of ``export "traces"``: the OTLP sink (batched, retried) and ``build_sinks``.

The OTLP sink turns each batch into SDK spans (``spans.to_span``), encodes them into one
OTLP request and sends it (``transport``). A failed attempt is retried with exponential
backoff until ``max_export_timeout``; then the batch counts as failed and the next batch
starts afresh, so export resumes by itself when the collector comes back. Up to
``max_concurrent_exports`` batches are in flight; meanwhile new records wait in the queue
(``max_queue_size``) and are dropped when it is full: capture never waits for a collector.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time

from opentelemetry.sdk.resources import Resource

from mermin_cli.config.schema import Config, OtlpExport, TracesExportConfig
from mermin_cli.errors import MerminError
from mermin_cli.export.sink import QueueSink, Sink
from mermin_cli.export.spans import build_resource, encode_spans, to_span
from mermin_cli.export.stdout import StdoutSink
from mermin_cli.export.transport import ExportError, Transport, describe, make_transport
from mermin_cli.flows.record import KIND_INTERNAL, FlowRecord

log = logging.getLogger("mermin.export")

INITIAL_BACKOFF = 0.25  # seconds; doubles per retry, +-20 % jitter
MAX_BACKOFF = 5.0
MIN_ATTEMPT = 0.05  # no attempt with less time than this left
CHECK_SPAN_NAME = "mermin_export_check"


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based); a collector's Retry-After wins."""
    delay = min(MAX_BACKOFF, INITIAL_BACKOFF * 2**attempt) * random.uniform(0.8, 1.2)
    return max(delay, retry_after or 0.0)


class OtlpSink(QueueSink):
    """Flow records to an OTLP collector as spans."""

    def __init__(self, config: OtlpExport, resource: Resource) -> None:
        self.config = config
        self.resource = resource
        self.transport: Transport = make_transport(config)
        self._state = threading.Lock()
        self._outage = False  # in a run of failed attempts
        self._outage_failed = 0  # records lost in it
        self.last_error: str | None = None  # why the last failed attempt failed
        super().__init__(
            f"otlp {describe(config)}",
            max_queue_size=config.max_queue_size,
            max_batch_size=config.max_batch_size,
            max_batch_interval=config.max_batch_interval,
            workers=config.max_concurrent_exports,
        )

    def export(self, batch: list[FlowRecord]) -> None:
        request = encode_spans([to_span(record, self.resource) for record in batch])
        deadline = time.monotonic() + self.config.max_export_timeout
        attempt = 0
        while True:
            remaining = min(deadline, self.close_deadline) - time.monotonic()
            if remaining < MIN_ATTEMPT:  # shutting down
                self._give_up(
                    len(batch), ExportError("no time left before shutdown", retryable=False)
                )
                return
            try:
                response = self.transport.send(request, min(self.config.timeout, remaining))
            except ExportError as exc:
                self._failing(exc)
                wait = backoff(attempt, exc.retry_after)
                if not exc.retryable or remaining - wait < MIN_ATTEMPT:
                    self._give_up(len(batch), exc)
                    return
                self.count_retry()
                self.pause(wait)
                attempt += 1
                continue
            rejected = min(response.partial_success.rejected_spans, len(batch))
            if rejected:
                log.warning(
                    "%s: the collector rejected %d of %d spans: %s",
                    self.name,
                    rejected,
                    len(batch),
                    response.partial_success.error_message or "no reason given",
                )
                self.count_failed(rejected)
            self.count_sent(len(batch) - rejected)
            self._recovered()
            return

    def _failing(self, exc: ExportError) -> None:
        with self._state:
            first, self._outage = not self._outage, True
            self.last_error = str(exc)
        if first:
            retry = f"; retrying each batch for up to {self.config.max_export_timeout:g}s"
            log.warning(
                "OTLP export to %s fails: %s%s",
                describe(self.config),
                exc,
                retry if exc.retryable else "",
            )

    def _give_up(self, n: int, exc: ExportError) -> None:
        self.count_failed(n)
        with self._state:
            first = self._outage_failed == 0
            self._outage_failed += n
        if first:
            log.warning(
                "OTLP export to %s: %d records lost (%s); further losses are counted until"
                " export works again",
                describe(self.config),
                n,
                exc,
            )

    def _recovered(self) -> None:
        if not self._outage:
            return
        with self._state:
            lost, self._outage, self._outage_failed = self._outage_failed, False, 0
        log.info(
            "OTLP export to %s works again (%d records were lost meanwhile)",
            describe(self.config),
            lost,
        )

    def shutdown(self) -> None:
        self.transport.close()
        log.debug(
            "OTLP export to %s: %d records sent, %d failed, %d dropped",
            describe(self.config),
            self.sent,
            self.failed,
            self.dropped,
        )


def build_sinks(traces: TracesExportConfig, resource: Resource) -> list[Sink]:
    """The sinks of the ``export "traces"`` block, started (ConfigError for bad combinations)."""
    sinks: list[Sink] = []
    if traces.stdout is not None:
        sinks.append(StdoutSink(traces.stdout.format))
    if traces.otlp is not None:
        sinks.append(OtlpSink(traces.otlp, resource))
    return sinks


def output_sinks(config: Config, writer: Sink | None) -> list[Sink]:
    """The --format writer and the exporters of `export "traces"`, started. An explicit
    --format replaces the config's stdout exporter (one stream, one format)."""
    configured = build_sinks(config.export.traces, build_resource())
    if writer is None:
        return configured
    for sink in configured:
        if isinstance(sink, StdoutSink):
            log.info("--format replaces the stdout exporter of the config")
            sink.close()
    return [writer, *(s for s in configured if not isinstance(s, StdoutSink))]


def check_collector(config: OtlpExport, resource: Resource) -> str:
    """Send one test span; the sentence saying it was accepted, else MerminError saying why."""
    now = time.time_ns()
    record = FlowRecord(
        name=CHECK_SPAN_NAME,
        kind=KIND_INTERNAL,
        trace_id=secrets.token_hex(16),
        span_id=secrets.token_hex(8),
        start_time_unix_nano=now,
        end_time_unix_nano=now,
        attributes={"mermin.export.check": True},
    )
    transport = make_transport(config, connections=1)
    started = time.monotonic()
    try:
        response = transport.send(encode_spans([to_span(record, resource)]), config.timeout)
    except ExportError as exc:
        raise MerminError(
            f"the OTLP collector at {describe(config)} did not accept the test span: {exc}"
        ) from None
    finally:
        transport.close()
    if response.partial_success.rejected_spans:
        reason = response.partial_success.error_message or "no reason given"
        raise MerminError(
            f"the OTLP collector at {describe(config)} rejected the test span: {reason}"
        )
    elapsed_ms = (time.monotonic() - started) * 1000
    return (
        f"OTLP collector at {describe(config)} accepted the test span in {elapsed_ms:.0f} ms"
        f" (trace id {record.trace_id})"
    )
