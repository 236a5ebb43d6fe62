"""OpenTelemetry export against real OTLP receivers (gRPC and HTTP) on loopback, no mocks.

The receivers (tests/otlp_receiver.py) are real servers built on the official
opentelemetry-proto services; the official SDK exporters are used as an independent check
that they decode what an OTLP client sends. TLS material is generated per test run.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pty
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind

from mermin_cli import __version__
from mermin_cli.config.schema import BasicAuth, OtlpAuth, OtlpExport, OtlpTls, TracesExportConfig
from mermin_cli.config.schema import StdoutExport as StdoutConfig
from mermin_cli.errors import ConfigError, MerminError
from mermin_cli.export.hostnames import HostnameResolver
from mermin_cli.export.otlp import OtlpSink, build_sinks, check_collector
from mermin_cli.export.spans import build_resource, encode_spans, machine_id, to_span
from mermin_cli.export.stdout import StdoutSink, to_text_indent
from mermin_cli.flows.record import FlowRecord
from mermin_cli.output.formats import to_json, to_text

try:
    from .capture_run import start_capture, write_config
    from .otlp_receiver import ReceivedSpan, Receiver, TlsFiles, make_tls, start_receiver
except ImportError:
    from capture_run import start_capture, write_config
    from otlp_receiver import ReceivedSpan, Receiver, TlsFiles, make_tls, start_receiver

MERMIN = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "mermin")
PROTOCOLS = ("grpc", "http_binary")
PB_KIND = {"client": 3, "server": 2, "internal": 1}  # Span.SpanKind values


# ---------------------------------------------------------------------------- records


def make_records(n: int, seed: int = 7) -> list[FlowRecord]:
    """Varied records as the tracker makes them: TCP/UDP/ICMP, v4/v6, all three kinds."""
    rng = random.Random(seed)
    records = []
    traces = [f"{rng.getrandbits(128) | 1:032x}" for _ in range(max(1, n // 3))]
    for i in range(n):
        kind = ("client", "server", "internal")[i % 3]
        v6 = i % 4 == 3
        transport = ("tcp", "udp", "icmp")[i % 3]
        if v6 and transport == "icmp":
            transport = "icmpv6"
        src, dst = (f"fd00:203::{i % 200 + 1:x}", "fd00:203::ff") if v6 else (
            f"10.203.{i % 250}.1", "10.203.0.2")  # fmt: skip
        start = 1_795_317_086_000_000_000 + i * 1_000_003
        attributes: dict[str, Any] = {
            "flow.community_id": f"1:{base64.b64encode(rng.randbytes(20)).decode()}",
            "flow.direction": {"client": "forward", "server": "reverse"}.get(kind, "unknown"),
            "source.address": src,
            "source.port": rng.randrange(32768, 65536),
            "destination.address": dst,
            "destination.port": 443,
            "network.type": "ipv6" if v6 else "ipv4",
            "network.transport": transport,
            "network.interface.index": 2,
            "network.interface.name": "veth0",
            "flow.end_reason": "idle_timeout",
            "flow.bytes.delta": rng.randrange(10**9),
            "flow.bytes.total": rng.randrange(10**12),
            "flow.packets.delta": rng.randrange(1, 10**6),
            "flow.packets.total": rng.randrange(1, 10**9),
            "flow.reverse.bytes.delta": 0,
            "flow.reverse.bytes.total": 0,
            "flow.reverse.packets.delta": 0,
            "flow.reverse.packets.total": 0,
            "flow.ip.dscp.id": 0,
            "flow.ip.dscp.name": "df",
            "flow.ip.ecn.id": 0,
            "flow.ip.ecn.name": "non-ect",
            "flow.ip.ttl": 64,
            "flow.reverse.ip.dscp.id": 0,
            "flow.reverse.ip.dscp.name": "df",
            "flow.reverse.ip.ecn.id": 0,
            "flow.reverse.ip.ecn.name": "non-ect",
            "flow.reverse.ip.ttl": 64,
            "client.address": f"client-{i % 250}.example",
            "server.address": "server.example",
        }
        if transport == "tcp":
            attributes |= {
                "flow.connection.state": "established",
                "flow.tcp.flags.bits": 27,
                "flow.tcp.flags.tags": ["fin", "syn", "psh", "ack"],
                "flow.reverse.tcp.flags.bits": 0,
                "flow.reverse.tcp.flags.tags": [],
                "flow.tcp.handshake.latency": rng.randrange(10**7),
            }
        elif transport.startswith("icmp"):
            attributes |= {"flow.icmp.type.id": 8, "flow.icmp.type.name": "echo_request"}
        records.append(
            FlowRecord(
                name=f"flow_{attributes['network.type']}_{transport}",
                kind=kind,
                trace_id=traces[i % len(traces)],
                span_id=f"{rng.getrandbits(64) | 1:016x}",
                start_time_unix_nano=start,
                end_time_unix_nano=start + rng.randrange(10**9),
                attributes=attributes,
            )
        )
    return records


def typed(attributes: dict[str, Any]) -> dict[str, tuple[type, Any]]:
    """Attributes with their types, so 1 and True or "1" differ."""
    return {k: (type(v), v) for k, v in attributes.items()}


def assert_spans_match(received: list[ReceivedSpan], records: list[FlowRecord]) -> None:
    """Exactly one span per record with the record's envelope and attribute values and types."""
    assert len(received) == len(records)
    by_id = {s.span.span_id.hex(): s for s in received}
    assert len(by_id) == len(records), "duplicate span ids"
    for record in records:
        got = by_id[record.span_id]
        span = got.span
        assert span.name == record.name
        assert span.kind == PB_KIND[record.kind]
        assert span.trace_id.hex() == record.trace_id
        assert span.start_time_unix_nano == record.start_time_unix_nano
        assert span.end_time_unix_nano == record.end_time_unix_nano
        assert span.parent_span_id == b""
        assert span.status.code == 0  # unset
        assert typed(got.attributes) == typed(record.attributes)
        assert (got.scope.name, got.scope.version) == ("mermin", __version__)


def sink_config(rx: Receiver, **overrides: Any) -> OtlpExport:
    settings: dict[str, Any] = {
        "endpoint": rx.endpoint,
        "protocol": rx.protocol,
        "max_batch_interval": 0.05,
        "max_batch_size": 64,
        "timeout": 2.0,
    }
    return OtlpExport(**(settings | overrides))


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def resource() -> Any:
    return build_resource()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def wrong_ca(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("other"), name="someone-else")


@pytest.fixture(scope="module")
def mtls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("mtls"), require_client_cert=True)


@pytest.fixture
def sinks() -> Iterator[list[OtlpSink]]:
    """Sinks made by a test, closed whatever it does."""
    made: list[OtlpSink] = []
    yield made
    for sink in made:
        sink.close(timeout=1.0)


# ---------------------------------------------------------------------------- spans


def test_encoder_equals_the_sdk_encoder(resource: Any) -> None:
    records = make_records(60)
    spans = [to_span(r, resource) for r in records]
    ours, sdk = encode_spans(spans), sdk_encode(spans)
    assert ours == sdk
    assert ours.SerializeToString() == sdk.SerializeToString()
    assert spans[0].kind is SpanKind.CLIENT and spans[1].kind is SpanKind.SERVER


def _ip_json_addresses() -> list[str]:
    """Independent oracle for host.ip: `ip -j addr`, UP links, no loopback or link-local."""
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True)
    found = []
    for link in json.loads(out.stdout):
        if "UP" not in link.get("flags", []) or "LOOPBACK" in link.get("flags", []):
            continue
        for info in link.get("addr_info", []):
            if info.get("scope") != "link" and not info["local"].startswith("127."):
                found.append(info["local"])
    return found


def test_resource_attributes() -> None:
    attributes = build_resource(env={"POD_NODE_NAME": "node-7", "POD_NAMESPACE": "obs"}).attributes
    assert attributes["service.name"] == "mermin"
    assert attributes["service.version"] == __version__
    assert attributes["telemetry.distro.name"] == "mermin"
    assert attributes["telemetry.distro.version"] == __version__
    assert attributes["host.name"] == socket.gethostname()
    assert attributes.get("host.id") == machine_id()
    assert sorted(attributes.get("host.ip", ())) == sorted(_ip_json_addresses())
    assert (attributes["k8s.node.name"], attributes["k8s.namespace.name"]) == ("node-7", "obs")
    plain = build_resource(env={}).attributes
    assert "k8s.node.name" not in plain and "k8s.namespace.name" not in plain


# ---------------------------------------------------------------------------- OTLP sink


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_records_arrive_as_spans(protocol: str, resource: Any, sinks: list[OtlpSink]) -> None:
    records = make_records(300)
    with start_receiver(protocol) as rx:
        sink = OtlpSink(sink_config(rx, headers={"X-Tenant": "team-a"}), resource)
        sinks.append(sink)
        for i in range(0, len(records), 50):
            sink.write(records[i : i + 50])
        received = rx.wait_for(len(records))
        sink.close()
    assert_spans_match(received, records)
    assert (sink.sent, sink.failed, sink.dropped) == (len(records), 0, 0)
    assert received[0].resource == {
        k: list(v) if isinstance(v, tuple) else v for k, v in resource.attributes.items()
    }
    assert all(h["x-tenant"] == "team-a" for h in rx.requests)
    assert all(h["user-agent"].startswith(f"mermin/{__version__}") for h in rx.requests)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_official_sdk_exporter_reaches_the_receiver(protocol: str, resource: Any) -> None:
    """The receiver decodes what the SDK's own OTLP exporter sends: it is a fair oracle."""
    records = make_records(30)
    with start_receiver(protocol) as rx:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter: Any = OTLPSpanExporter(endpoint=rx.endpoint, insecure=True)
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            exporter = HttpExporter(endpoint=f"{rx.endpoint}/v1/traces")
        assert exporter.export([to_span(r, resource) for r in records]) == SpanExportResult.SUCCESS
        exporter.shutdown()
        assert_spans_match(rx.wait_for(len(records)), records)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_with_generated_ca(
    protocol: str, resource: Any, tls_files: TlsFiles, wrong_ca: TlsFiles, sinks: list[OtlpSink]
) -> None:
    records = make_records(20)
    with start_receiver(protocol, tls=tls_files) as rx:
        assert rx.endpoint.startswith("https://")
        good = OtlpSink(sink_config(rx, tls=OtlpTls(ca_cert=str(tls_files.ca_cert))), resource)
        sinks.append(good)
        good.write(records)
        assert_spans_match(rx.wait_for(len(records)), records)
        bad_tls = OtlpTls(ca_cert=str(wrong_ca.ca_cert))
        with pytest.raises(MerminError, match="TLS certificate verification failed"):
            check_collector(sink_config(rx, tls=bad_tls), resource)
        bad = OtlpSink(sink_config(rx, tls=bad_tls), resource)
        sinks.append(bad)
        bad.write(records)
        wait_until(lambda: bad.failed == len(records))
        assert bad.retries == 0, "a certificate that does not verify is not retried"
        assert "TLS certificate verification failed" in (bad.last_error or "")
        assert rx.span_count == len(records)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_mistakes_are_named(protocol: str, resource: Any, tls_files: TlsFiles) -> None:
    trusted = OtlpTls(ca_cert=str(tls_files.ca_cert))
    with (
        start_receiver(protocol, tls=tls_files, host="127.0.0.2") as rx,  # not in the cert
        pytest.raises(MerminError, match=r"TLS certificate verification failed \(.*not valid"),
    ):
        check_collector(sink_config(rx, tls=trusted), resource)
    with start_receiver(protocol) as plain:
        https = sink_config(plain, endpoint=plain.endpoint.replace("http:", "https:"), tls=trusted)
        with pytest.raises(MerminError, match=r"TLS handshake failed \(the port does not speak"):
            check_collector(https, resource)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mutual_tls(protocol: str, resource: Any, mtls_files: TlsFiles) -> None:
    ca = str(mtls_files.ca_cert)
    with start_receiver(protocol, tls=mtls_files) as rx:
        identity = OtlpTls(
            ca_cert=ca,
            client_cert=str(mtls_files.client_cert),
            client_key=str(mtls_files.client_key),
        )
        assert "accepted the test span" in check_collector(sink_config(rx, tls=identity), resource)
        with pytest.raises(MerminError, match="did not accept the test span"):
            check_collector(sink_config(rx, tls=OtlpTls(ca_cert=ca)), resource)
        assert rx.span_count == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_insecure_skip_verify(
    protocol: str, resource: Any, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, "mermin.export"),
        start_receiver(protocol, tls=tls_files) as rx,  # its CA is not given to mermin
    ):
        unverified = sink_config(rx, tls=OtlpTls(insecure_skip_verify=True))
        assert "accepted the test span" in check_collector(unverified, resource)
    assert "does not verify the collector's TLS certificate" in caplog.text


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("auth", "header"),
    [
        (
            OtlpAuth(basic=BasicAuth("mermin", "s3cret:x")),
            "Basic " + base64.b64encode(b"mermin:s3cret:x").decode(),
        ),
        (OtlpAuth(bearer="tok-123"), "Bearer tok-123"),
    ],
    ids=["basic", "bearer"],
)
def test_auth_header(
    protocol: str, auth: OtlpAuth, header: str, resource: Any, sinks: list[OtlpSink]
) -> None:
    records = make_records(10)
    with start_receiver(protocol, auth=header) as rx:
        sink = OtlpSink(sink_config(rx, auth=auth), resource)
        sinks.append(sink)
        sink.write(records)
        assert_spans_match(rx.wait_for(len(records)), records)
        assert {h["authorization"] for h in rx.requests} == {header}
        with pytest.raises(MerminError, match="authentication rejected"):
            check_collector(sink_config(rx), resource)
        unauthenticated = OtlpSink(sink_config(rx, auth=OtlpAuth(bearer="wrong")), resource)
        sinks.append(unauthenticated)
        unauthenticated.write(records)
        wait_until(lambda: unauthenticated.failed == len(records))
        assert rx.rejected >= 2 and rx.span_count == len(records)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_collector_down_then_up(protocol: str, resource: Any, sinks: list[OtlpSink]) -> None:
    """Records written while the collector is down arrive once it is up; retries are counted."""
    records = make_records(200)
    with start_receiver(protocol, started=False) as rx:
        sink = OtlpSink(sink_config(rx, max_export_timeout=30.0), resource)
        sinks.append(sink)
        sink.write(records[:100])
        wait_until(lambda: sink.retries >= 2)
        assert "connection refused" in (sink.last_error or "")
        rx.start()
        rx.wait_for(100, timeout=15)
        sink.write(records[100:])
        received = rx.wait_for(200)
        sink.close()
    assert_spans_match(received, records)
    assert (sink.sent, sink.failed, sink.dropped) == (200, 0, 0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_export_resumes_after_outage(protocol: str, resource: Any, sinks: list[OtlpSink]) -> None:
    """Batches given up during an outage count as failed; later ones go through by themselves."""
    records = make_records(90)
    with start_receiver(protocol) as rx:
        sink = OtlpSink(sink_config(rx, max_export_timeout=2.0), resource)
        sinks.append(sink)
        sink.write(records[:30])
        # Wait for the reply, not only the spans: a stop between the two cancels the call,
        # and the sink rightly counts a batch it got no answer for as failed.
        wait_until(lambda: sink.sent == 30)
        rx.stop()  # also cuts kept-alive HTTP connections
        sink.write(records[30:60])
        wait_until(lambda: sink.failed == 30)
        assert sink.retries >= 1
        rx.start()
        # gRPC reconnects on its own backoff (at most about 1.2 s, longer on a loaded
        # machine); a batch whose 2 s retry window closes first is lost like any other. So
        # offer the batch again until one goes through: nothing is reset in between.
        lost_after_restart = 0
        while True:
            sink.write(records[60:])
            given_up = 30 + lost_after_restart + 30
            wait_until(lambda n=given_up: rx.span_count == 60 or sink.failed == n)
            if rx.span_count == 60:
                break
            lost_after_restart += 30
            assert lost_after_restart <= 90, "export did not resume"
        received = rx.wait_for(60)
        sink.close()
    assert_spans_match(received, records[:30] + records[60:])
    assert (sink.sent, sink.failed, sink.dropped) == (60, 30 + lost_after_restart, 0)


def test_full_queue_drops_and_counts(resource: Any) -> None:
    records = make_records(100)
    with start_receiver("grpc", started=False) as rx:
        sink = OtlpSink(
            sink_config(rx, max_queue_size=10, max_batch_size=5, max_concurrent_exports=1),
            resource,
        )
        started = time.perf_counter()
        sink.write(records)
        sink.write(records[:7])
        assert time.perf_counter() - started < 0.05, "write must not wait for the collector"
        assert 90 <= sink.dropped <= 97  # 10 queued of the first 100, 0-5 of the next 7
        sink.close(timeout=0.5)
    assert sink.sent == 0
    assert sink.sent + sink.failed + sink.dropped == 107  # every record counted once


def test_slow_collector_never_blocks_writer(resource: Any) -> None:
    records = make_records(400)
    with start_receiver("grpc", delay=0.3) as rx:
        sink = OtlpSink(
            sink_config(rx, max_queue_size=100, max_batch_size=50, max_concurrent_exports=2),
            resource,
        )
        slowest = 0.0
        for i in range(0, len(records), 20):
            started = time.perf_counter()
            sink.write(records[i : i + 20])
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.005)
        assert slowest < 0.02
        close_started = time.monotonic()
        sink.close(timeout=1.0)
        assert time.monotonic() - close_started < 1.5, "close is bounded"
    assert sink.dropped > 0
    wait_until(lambda: sink.sent + sink.failed + sink.dropped == len(records), timeout=5)
    assert sink.sent <= rx.span_count  # a reply cut off by close can still have been taken


def test_check_timeout(resource: Any) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for protocol in PROTOCOLS:
            cfg = OtlpExport(endpoint=endpoint, protocol=protocol, timeout=0.5)
            with pytest.raises(MerminError, match="timed out"):
                check_collector(cfg, resource)


def test_build_sinks(resource: Any) -> None:
    with start_receiver("grpc") as rx:
        traces = TracesExportConfig(stdout=StdoutConfig("json"), otlp=sink_config(rx))
        built = build_sinks(traces, resource)
        try:
            assert [type(s) for s in built] == [StdoutSink, OtlpSink]
            assert built[1].name == f"otlp {rx.endpoint} (grpc)"
        finally:
            for s in built:
                s.close()
    assert build_sinks(TracesExportConfig(), resource) == []
    bad = TracesExportConfig(otlp=OtlpExport(endpoint="http://x:4317", tls=OtlpTls()))
    with pytest.raises(ConfigError, match="https://"):
        build_sinks(bad, resource)


# ---------------------------------------------------------------------------- stdout


class _Stream:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("fmt", ["text", "text_indent", "json"])
def test_stdout_formats(fmt: str) -> None:
    records = make_records(12)
    stream = _Stream()
    sink = StdoutSink(fmt, stream=stream)  # type: ignore[arg-type]
    sink.write(records[:5])
    sink.write(records[5:])
    sink.close()
    out = "".join(stream.parts)
    assert (sink.sent, sink.failed, sink.dropped) == (12, 0, 0)
    if fmt == "json":
        assert [json.loads(line) for line in out.splitlines()] == [r.to_dict() for r in records]
        assert out.splitlines() == [to_json(r) for r in records]
    elif fmt == "text":
        assert out.splitlines() == [to_text(r) for r in records]
    else:
        blocks = out.split("\n\n")
        assert blocks[:-1] == [to_text_indent(r).rstrip("\n") for r in records]
        first = blocks[0].splitlines()
        assert first[0] == f"{records[0].name} ({records[0].kind})"
        assert f"trace_id    {records[0].trace_id}" in blocks[0]
        for key, value in records[0].attributes.items():
            assert any(line.split() == [key, *json.dumps(value).split()] for line in first), key


# ---------------------------------------------------------------------------- hostnames


def _record(src: str, dst: str) -> FlowRecord:
    return FlowRecord("flow_ipv4_tcp", "client", "1" * 32, "2" * 16, 0, 1,
                      {"source.address": src, "destination.address": dst})  # fmt: skip


def test_hostnames_real_lookup() -> None:
    """One real reverse lookup through the system resolver: 127.0.0.1."""
    expected = socket.gethostbyaddr("127.0.0.1")[0]
    resolver = HostnameResolver(timeout=2.0)
    records = [_record("127.0.0.1", "127.0.0.1")]
    resolver.decorate(records)
    resolver.close()
    assert records[0].attributes["client.address"] == expected
    assert records[0].attributes["server.address"] == expected
    assert records[0].attributes["source.address"] == "127.0.0.1"


def test_hostnames_cached_and_negative_cached() -> None:
    calls: list[str] = []
    names = {"10.0.0.1": "alpha.example"}

    def resolve(address: str) -> str:
        calls.append(address)
        if address not in names:
            raise socket.herror(1, "Unknown host")
        return names[address]

    resolver = HostnameResolver(timeout=1.0, resolve=resolve)
    for _ in range(3):
        records = [_record("10.0.0.1", "10.0.0.9"), _record("10.0.0.9", "10.0.0.1")]
        resolver.decorate(records)
        assert [r.attributes["client.address"] for r in records] == ["alpha.example", "10.0.0.9"]
        assert [r.attributes["server.address"] for r in records] == ["10.0.0.9", "alpha.example"]
    resolver.close()
    assert sorted(calls) == ["10.0.0.1", "10.0.0.9"], "names and failures are both cached"


def test_hostnames_slow_resolver_is_bounded() -> None:
    """A deliberately slow resolve function (1 s per lookup) stands in for a dead DNS server."""
    release = threading.Event()

    def slow(address: str) -> str:
        release.wait(1.0)
        return f"host-{address.replace('.', '-')}"

    resolver = HostnameResolver(timeout=0.1, resolve=slow)
    records = [_record(f"10.1.0.{i}", "10.1.1.1") for i in range(50)]
    started = time.monotonic()
    resolver.decorate(records)
    elapsed = time.monotonic() - started
    assert 0.09 <= elapsed < 0.3, elapsed
    assert all(r.attributes["client.address"] == r.attributes["source.address"] for r in records)
    release.set()  # lookups finish in the background and fill the cache
    wait_until(lambda: resolver.cached == 51)
    again = [_record("10.1.0.3", "10.1.1.1")]
    started = time.monotonic()
    resolver.decorate(again)
    assert time.monotonic() - started < 0.05
    assert again[0].attributes["client.address"] == "host-10-1-0-3"
    resolver.close()


def test_hostnames_ttl_refresh_and_bound() -> None:
    counter = {"n": 0}

    def resolve(address: str) -> str:
        counter["n"] += 1
        return f"v{counter['n']}"

    resolver = HostnameResolver(timeout=1.0, ttl=0.2, cache_size=10, resolve=resolve)
    first = [_record("10.2.0.1", "10.2.0.1")]
    resolver.decorate(first)
    assert first[0].attributes["client.address"] == "v1"
    time.sleep(0.25)
    stale = [_record("10.2.0.1", "10.2.0.1")]
    resolver.decorate(stale)  # answered at once from the old entry, refreshed behind
    assert stale[0].attributes["client.address"] == "v1"
    wait_until(lambda: counter["n"] == 2)
    fresh = [_record("10.2.0.1", "10.2.0.1")]
    resolver.decorate(fresh)
    assert fresh[0].attributes["client.address"] == "v2"
    resolver.decorate([_record(f"10.3.0.{i}", "10.3.1.1") for i in range(40)])
    assert resolver.cached <= 10
    resolver.close()


# ---------------------------------------------------------------------------- CLI


def run_export(
    *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MERMIN_CONFIG_PATH"}
    return subprocess.run([MERMIN, "export", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def write_ndjson(path: Path, records: list[FlowRecord], bad: dict[int, str] | None = None) -> Path:
    """Records as `capture --format json` writes them; ``bad`` inserts lines at indexes."""
    lines = [to_json(r) for r in records]
    for index, line in sorted((bad or {}).items()):
        lines.insert(index, line)
    path.write_text("\n".join(lines) + "\n")
    return path


def otlp_hcl(path: Path, endpoint: str, protocol: str, extra: str = "") -> Path:
    path.write_text(
        'export "traces" {\n  otlp = {\n'
        f'    endpoint = "{endpoint}"\n    protocol = "{protocol}"\n'
        '    max_batch_interval = "50ms"\n    max_export_timeout = "1s"\n'
        f"{extra}  }}\n}}\n"
    )
    return path


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_export_file(protocol: str, tmp_path: Path) -> None:
    records = make_records(250)
    bad = {3: "not json at all", 10: '{"schema": "mermin.flow/v1", "name": "x"}',
           20: json.dumps(records[0].to_dict() | {"trace_id": "xyz"})}  # fmt: skip
    path = write_ndjson(tmp_path / "flows.ndjson", records, bad)
    with start_receiver(protocol) as rx:
        out = run_export(str(path), "--endpoint", rx.endpoint, "--protocol", protocol)
        assert out.returncode == 0, out.stderr
        received = rx.wait_for(len(records))
    assert_spans_match(received, records)
    assert "line 4 skipped: not JSON" in out.stderr
    assert "line 11 skipped: missing key 'kind'" in out.stderr
    assert "line 21 skipped: trace_id must be 32 lowercase hex digits" in out.stderr
    assert f"250 of 250 records sent to {rx.endpoint} ({protocol}), 0 failed" in out.stderr
    assert "3 malformed lines skipped" in out.stderr


def test_cli_export_stdin_and_strict() -> None:
    records = make_records(5)
    text = "\n".join(to_json(r) for r in records) + "\n"
    with start_receiver("grpc") as rx:
        out = run_export("-", "--endpoint", rx.endpoint, stdin=text)
        assert out.returncode == 0, out.stderr
        assert_spans_match(rx.wait_for(5), records)
        strict = run_export("--strict", "--endpoint", rx.endpoint, stdin=text + "{oops\n")
    assert strict.returncode == 2
    assert (
        strict.stderr.strip()
        .splitlines()[-1]
        .startswith("mermin: line 6 is not a flow record: not JSON")
    )
    assert "Traceback" not in strict.stderr


def test_cli_export_collector_down(tmp_path: Path) -> None:
    with start_receiver("http_binary", started=False) as rx:
        config = otlp_hcl(tmp_path / "c.hcl", rx.endpoint, "http_binary")
        path = write_ndjson(tmp_path / "f.ndjson", make_records(40))
        out = run_export(str(path), "-c", str(config))
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("mermin: 40 of 40 records could not be sent: connection refused")


def test_cli_export_needs_an_exporter(tmp_path: Path) -> None:
    out = run_export(str(write_ndjson(tmp_path / "f.ndjson", make_records(1))))
    assert out.returncode == 2
    assert "no OTLP exporter is configured" in out.stderr


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_check(protocol: str, tmp_path: Path, tls_files: TlsFiles, wrong_ca: TlsFiles) -> None:
    def check(config: Path) -> subprocess.CompletedProcess[str]:
        return run_export("--check", "-c", str(config))

    with start_receiver(protocol, auth="Bearer good") as rx:
        ok = check(
            otlp_hcl(tmp_path / "ok.hcl", rx.endpoint, protocol, '    auth = { bearer = "good" }\n')
        )
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.startswith(
            f"OTLP collector at {rx.endpoint} ({protocol}) accepted the test span"
        )
        assert len(ok.stdout.strip().splitlines()) == 1
        span = rx.wait_for(1)[0]
        assert span.span.name == "mermin_export_check"
        assert span.resource["service.name"] == "mermin"
        denied = check(
            otlp_hcl(tmp_path / "no.hcl", rx.endpoint, protocol, '    auth = { bearer = "bad" }\n')
        )
    with start_receiver(protocol, tls=tls_files) as tls_rx:
        wrong = otlp_hcl(tmp_path / "w.hcl", tls_rx.endpoint, protocol,
                         f'    tls = {{ ca_cert = "{wrong_ca.ca_cert}" }}\n')  # fmt: skip
        untrusted = check(wrong)
        right = otlp_hcl(tmp_path / "r.hcl", tls_rx.endpoint, protocol,
                         f'    tls = {{ ca_cert = "{tls_files.ca_cert}" }}\n')  # fmt: skip
        trusted = check(right)
    refused = check(otlp_hcl(tmp_path / "down.hcl", rx.endpoint, protocol))
    prefix = f"mermin: the OTLP collector at {{}} ({protocol}) did not accept the test span: "
    for out, endpoint, reason in (
        (denied, rx.endpoint, "authentication rejected"),
        (untrusted, tls_rx.endpoint, "TLS certificate verification failed"),
        (refused, rx.endpoint, "connection refused"),
    ):
        assert out.returncode == 1
        assert out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert lines[0].startswith(prefix.format(endpoint) + reason), lines[0]
    assert trusted.returncode == 0, trusted.stderr


def test_cli_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    records = make_records(1500)
    path = write_ndjson(tmp_path / "big.ndjson", records)
    assert path.stat().st_size >= 1 << 20
    with start_receiver("grpc") as rx:
        leader, follower = pty.openpty()
        proc = subprocess.Popen([MERMIN, "export", str(path), "--endpoint", rx.endpoint],
                                stderr=follower, stdout=subprocess.DEVNULL)  # fmt: skip
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=60) == 0
        os.close(leader)
        rx.wait_for(len(records))
    terminal = b"".join(chunks).decode(errors="replace")
    assert "━" in terminal or "%" in terminal, "a progress bar was drawn"
    assert "1500 of 1500 records sent" in terminal


def test_receiver_in_a_namespace(link: Any) -> None:
    """For end-to-end tests: a receiver bound inside a test namespace, reached from there."""
    for protocol in PROTOCOLS:
        with start_receiver(protocol, netns=link.a.ns) as rx:
            inside = link.a.run(MERMIN, "export", "--check", "--endpoint", rx.endpoint,
                                "--protocol", protocol, check=False)  # fmt: skip
            assert inside.returncode == 0, inside.stderr
            outside = run_export("--check", "--endpoint", rx.endpoint, "--protocol", protocol)
            assert outside.returncode == 1 and "connection refused" in outside.stderr
            assert rx.span_count == 1


E2E_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(int(sys.argv[2]), int(sys.argv[2]) + 4):
    s.sendto(b"e" * 50, (sys.argv[1], port))
"""


@pytest.mark.bpf
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_live_capture_exports_what_it_prints(
    link: Any, tmp_path: Path, protocol: str, require_bpf: None
) -> None:
    """Live capture in a namespace -> OTLP -> receiver: the spans equal the NDJSON records
    of the same run, field for field; a collector that is down at start is caught up."""
    a, b = link.a, link.b
    with start_receiver(protocol, netns=a.ns, started=False) as rx:
        extra = (
            'export "traces" {\n  otlp = {\n'
            f'    endpoint = "{rx.endpoint}"\n    protocol = "{protocol}"\n'
            '    max_batch_interval = "100ms"\n  }\n}\n'
        )
        cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path, extra=extra)))
        try:
            b.run("python3", "-c", E2E_UDP, a.ip4, "7100")
            b.run("ping", "-c", "2", "-i", "0.2", a.ip4)
            time.sleep(1.8)  # records of the idle flows are emitted; the collector is down
            assert rx.span_count == 0
            rx.start()  # the collector comes up: retries deliver what was queued
            b.run("python3", "-c", E2E_UDP, a.ip4, "7200")
            time.sleep(1.6)
        finally:
            assert cap.stop() == 0, "".join(cap.stderr)
        records = [FlowRecord.from_dict(r) for r in cap.records]
        assert len(records) >= 4 + 4 + 1  # 8 UDP flows, the ping, ICMP port-unreachables
        received = rx.wait_for(len(records), timeout=15)
    assert_spans_match(received, records)
    assert {s.resource["service.name"] for s in received} == {"mermin"}
