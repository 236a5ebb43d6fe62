"""A real OTLP trace receiver for tests and benchmarks: gRPC and HTTP/protobuf on loopback.

The gRPC server implements ``opentelemetry.proto.collector.trace.v1.TraceService`` with the
generated stubs of the ``opentelemetry-proto`` package; the HTTP server accepts
``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest`` body. Both keep every span
with its resource, scope and the request's headers (gRPC metadata), and can require TLS
(optionally mutual), an ``Authorization`` value, or answer slowly. A receiver can be created
stopped and started later on its reserved port, and stopped and started again (a collector
that is down, then up). ``netns`` binds the listening socket inside a network namespace.

    with start_receiver("grpc") as rx:
        ...  # export to rx.endpoint
        spans = rx.wait_for(10, timeout=5)
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import http.server
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

PROTOCOLS = ("grpc", "http_binary")
HTTP_PATH = "/v1/traces"
_CLONE_NEWNET = 0x40000000


# ------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throw-away CA, a server identity for 127.0.0.1/localhost and a client."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    require_client_cert: bool = False


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_tls(
    directory: Path, name: str = "mermin-test", require_client_cert: bool = False
) -> TlsFiles:
    """Generate a CA and a server and client certificate signed by it, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = (
        _builder(f"{name} CA", f"{name} CA", ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        ca_cert=directory / f"{name}-ca.pem",
        server_cert=directory / f"{name}-server.pem",
        server_key=directory / f"{name}-server-key.pem",
        client_cert=directory / f"{name}-client.pem",
        client_key=directory / f"{name}-client-key.pem",
        require_client_cert=require_client_cert,
    )
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    for cert_path, key_path, usage, sans in (
        (
            files.server_cert,
            files.server_key,
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ),
        (files.client_cert, files.client_key, ExtendedKeyUsageOID.CLIENT_AUTH, None),
    ):
        key = _key()
        builder = (
            _builder(f"{name} {usage._name}", f"{name} CA", key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(aki, critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
    return files


# ------------------------------------------------------------------------------- spans


def decode_value(value: common_pb2.AnyValue) -> Any:
    """An OTLP AnyValue as the Python value it carries (arrays as lists)."""
    which = value.WhichOneof("value")
    if which == "array_value":
        return [decode_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: decode_value(kv.value) for kv in value.kvlist_value.values}
    return None if which is None else getattr(value, which)


def decode_attributes(attributes: Any) -> dict[str, Any]:
    """Repeated KeyValue as a dict; the value type is kept (int stays int)."""
    return {kv.key: decode_value(kv.value) for kv in attributes}


@dataclass
class ReceivedSpan:
    """One span as received, with its resource, scope and the request's headers."""

    span: trace_pb2.Span
    resource: dict[str, Any]
    scope: common_pb2.InstrumentationScope
    headers: dict[str, str]

    @property
    def attributes(self) -> dict[str, Any]:
        return decode_attributes(self.span.attributes)


# ------------------------------------------------------------------------------- receiver


@contextlib.contextmanager
def _in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside ``/run/netns/<netns>`` (None: stay)."""
    if netns is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
        try:
            yield
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the home namespace failed")
    finally:
        os.close(target)
        os.close(home)


def _free_port(host: str, netns: str | None) -> int:
    with _in_netns(netns), socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        headers = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        if not self.receiver.authorized(headers):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong credentials")
        self.receiver.record(request, headers)
        return trace_service_pb2.ExportTraceServiceResponse()


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver

    def __init__(self, sock: socket.socket, receiver: Receiver) -> None:
        super().__init__(sock.getsockname(), _HttpHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.receiver = receiver
        self.connections: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut keep-alive connections too, as a collector that goes down does."""
        for conn in list(self.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != HTTP_PATH:
            self._reply(404, b"not found", "text/plain")
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        receiver = self.server.receiver
        if not receiver.authorized(headers):
            self._reply(401, b"missing or wrong credentials", "text/plain")
            return
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        receiver.record(request, headers)
        response = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self._reply(200, response, "application/x-protobuf")


@dataclass
class Receiver:
    """An OTLP trace receiver (``protocol`` grpc or http_binary) on ``host``:``port``.

    ``auth`` is the exact Authorization value required ("Bearer x", "Basic ..."); ``delay``
    makes every export take that long (a slow collector); ``store=False`` only counts spans.
    """

    protocol: str
    tls: TlsFiles | None = None
    auth: str | None = None
    delay: float = 0.0
    store: bool = True
    host: str = "127.0.0.1"
    port: int = 0
    netns: str | None = None
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)  # headers of each request
    span_count: int = 0
    rejected: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _grpc: grpc.Server | None = field(default=None, repr=False)
    _http: _HttpServer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {self.protocol!r}")
        if not self.port:
            self.port = _free_port(self.host, self.netns)

    @property
    def endpoint(self) -> str:
        """The URL an exporter is configured with (https:// when TLS is on)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._grpc is not None or self._http is not None

    def authorized(self, headers: dict[str, str]) -> bool:
        ok = self.auth is None or headers.get("authorization") == self.auth
        if not ok:
            with self._cond:
                self.rejected += 1
        return ok

    def record(
        self, request: trace_service_pb2.ExportTraceServiceRequest, headers: dict[str, str]
    ) -> None:
        if self.delay:
            time.sleep(self.delay)
        received: list[ReceivedSpan] = []
        count = 0
        for resource_spans in request.resource_spans:
            resource = decode_attributes(resource_spans.resource.attributes) if self.store else {}
            for scope_spans in resource_spans.scope_spans:
                count += len(scope_spans.spans)
                if self.store:
                    received += [
                        ReceivedSpan(span, resource, scope_spans.scope, headers)
                        for span in scope_spans.spans
                    ]
        with self._cond:
            self.requests.append(headers)
            self.spans += received
            self.span_count += count
            self._cond.notify_all()

    def start(self) -> Receiver:
        """Listen on the reserved port (again, after ``stop``)."""
        if self.running:
            return self
        address = f"{self.host}:{self.port}"
        with _in_netns(self.netns):
            if self.protocol == "grpc":
                server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
                trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
                    _TraceService(self), server
                )
                if self.tls:
                    creds = grpc.ssl_server_credentials(
                        [(self.tls.server_key.read_bytes(), self.tls.server_cert.read_bytes())],
                        root_certificates=self.tls.ca_cert.read_bytes()
                        if self.tls.require_client_cert
                        else None,
                        require_client_auth=self.tls.require_client_cert,
                    )
                    bound = server.add_secure_port(address, creds)
                else:
                    bound = server.add_insecure_port(address)
                if bound != self.port:
                    raise OSError(f"gRPC receiver could not listen on {address}")
                server.start()
                self._grpc = server
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                sock.listen(64)
                if self.tls:
                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                    ctx.load_cert_chain(self.tls.server_cert, self.tls.server_key)
                    if self.tls.require_client_cert:
                        ctx.verify_mode = ssl.CERT_REQUIRED
                        ctx.load_verify_locations(self.tls.ca_cert)
                    sock = ctx.wrap_socket(sock, server_side=True)
                server_http = _HttpServer(sock, self)
                threading.Thread(
                    target=server_http.serve_forever, args=(0.05,), daemon=True
                ).start()
                self._http = server_http
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections; spans received so far are kept."""
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait(5)
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.close_connections()
            self._http.server_close()
            self._http = None

    def wait_for(self, n: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """Wait until at least ``n`` spans arrived; returns the stored spans (raises on timeout)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.span_count >= n, timeout):
                raise TimeoutError(
                    f"{self.protocol} receiver got {self.span_count} spans, expected {n}"
                )
            return list(self.spans)


@contextlib.contextmanager
def start_receiver(
    protocol: str,
    tls: TlsFiles | None = None,
    auth: str | None = None,
    *,
    started: bool = True,
    **options: Any,
) -> Iterator[Receiver]:
    """A receiver for the body of the ``with``; ``started=False`` reserves the port only."""
    receiver = Receiver(protocol, tls=tls, auth=auth, **options)
    if started:
        receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
