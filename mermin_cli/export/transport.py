"""OTLP over the wire: one export request to a collector by gRPC or HTTP/protobuf.

A transport sends one ``ExportTraceServiceRequest`` per call with the generated gRPC stub
of ``opentelemetry-proto`` or an HTTP POST of the serialized message, and turns every
failure into an ``ExportError`` that says in words what happened (connection refused, TLS
verification failed, authentication rejected, timed out, ...) and whether a retry may
help. Retrying is the caller's business (``otlp.OtlpSink``).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from mermin_cli import __version__
from mermin_cli.config.schema import OtlpAuth, OtlpExport, OtlpTls
from mermin_cli.errors import ConfigError

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's C core logs to stderr otherwise
import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceStub,
)

log = logging.getLogger("mermin.export")

USER_AGENT = f"mermin/{__version__}"
HTTP_TRACES_PATH = "/v1/traces"
# Retryable per the OTLP specification.
_GRPC_RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_HTTP_RETRYABLE = frozenset({429, 502, 503, 504})
_VERIFY_FAILED = re.compile(
    r"CERTIFICATE_VERIFY_FAILED[:\]]\s*(?:certificate verify failed:\s*)?([^:(]*)"
)
_GRPC_CHANNEL_OPTIONS = (
    ("grpc.primary_user_agent", USER_AGENT),
    ("grpc.enable_retries", 0),  # retries are ours, with our deadline
    # Reconnect soon after a collector comes back (gRPC's default backoff grows to 120 s).
    # At most 1 s, so a batch's retry window (max_export_timeout) always spans an attempt.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class ExportError(Exception):
    """One failed export attempt; the message is a phrase such as "connection refused"."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class Transport(Protocol):
    """Sends export requests to one collector; safe to call from several threads."""

    endpoint: str

    def send(
        self, request: ExportTraceServiceRequest, timeout: float
    ) -> ExportTraceServiceResponse:
        """Export once; raises ExportError."""

    def close(self) -> None: ...


def authorization(auth: OtlpAuth | None) -> str | None:
    """The Authorization header value of the auth block, or None."""
    if auth is None:
        return None
    if auth.bearer is not None:
        return f"Bearer {auth.bearer}"
    if auth.basic is not None:
        token = base64.b64encode(f"{auth.basic.user}:{auth.basic.password}".encode()).decode()
        return f"Basic {token}"
    return None


def _headers(config: OtlpExport) -> dict[str, str]:
    """User headers plus Authorization, names lowercase (as gRPC metadata requires)."""
    headers = {name.lower(): value for name, value in config.headers.items()}
    value = authorization(config.auth)
    if value is not None:
        headers["authorization"] = value
    return headers


def _timeout_error(timeout: float) -> ExportError:
    return ExportError(f"timed out (no answer within {timeout:.3g}s)", retryable=True)


def _tls_verify_error(detail: str) -> ExportError:
    match = _VERIFY_FAILED.search(detail)
    if match and match.group(1).strip():
        reason = match.group(1).strip().rstrip(".")
    elif "Hostname Verification" in detail:
        reason = "the certificate is not valid for this host name"
    else:
        reason = "untrusted certificate"
    return ExportError(
        f"TLS certificate verification failed ({reason}); the collector's certificate must"
        " be signed by tls.ca_cert or a system CA and name the endpoint's host",
        retryable=False,
    )


def _handshake_error(detail: str) -> ExportError:
    if "WRONG_VERSION_NUMBER" in detail:
        detail = "the port does not speak TLS; use an http:// endpoint for a plain port"
    return ExportError(f"TLS handshake failed ({detail})", retryable=False)


def _refused() -> ExportError:
    return ExportError("connection refused (is the collector running there?)", retryable=True)


def _system_roots() -> bytes:
    """The system CA bundle as PEM (empty when there is none)."""
    cafile = ssl.get_default_verify_paths().cafile
    try:
        return Path(cafile).read_bytes() if cafile else b""
    except OSError:
        return b""


def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


# ---------------------------------------------------------------------------- gRPC


def _grpc_error(exc: grpc.RpcError, timeout: float) -> ExportError:
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    details: str = exc.details() or ""  # type: ignore[attr-defined]
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return ExportError(
            f"authentication rejected ({code.name}: {details}); check auth and headers",
            retryable=False,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return _timeout_error(timeout)
    if code == grpc.StatusCode.UNAVAILABLE:
        if "Connection refused" in details:
            return _refused()
        if "CERTIFICATE_VERIFY_FAILED" in details or "Hostname Verification" in details:
            return _tls_verify_error(details)
        if "andshake failed" in details:
            return _handshake_error(details)
        if "Socket closed" in details or "Connection reset" in details:
            return ExportError(
                "the collector closed the connection (a TLS port needs an https:// endpoint)",
                retryable=True,
            )
        if "resolving" in details or "DNS" in details:
            return ExportError(
                f"cannot resolve the collector's host name ({details})", retryable=True
            )
    retryable = code in _GRPC_RETRYABLE
    verb = "is unavailable" if retryable else "rejected the export"
    return ExportError(f"the collector {verb} ({code.name}: {details})", retryable=retryable)


def _peer_certificate(host: str, port: int, timeout: float) -> tuple[bytes, str]:
    """The certificate a TLS server presents, as PEM, and a name it is valid for."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            blind = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            blind.check_hostname = False
            blind.verify_mode = ssl.CERT_NONE
            with blind.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
        if not der:
            raise ExportError("the collector presented no TLS certificate", retryable=False)
        pem = ssl.DER_cert_to_PEM_cert(der)
        # Verify against the certificate itself to read its names through the ssl module.
        pinned = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.check_hostname = False
        pinned.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        pinned.load_verify_locations(cadata=pem)
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            pinned.wrap_socket(raw, server_hostname=host) as tls,
        ):
            cert: dict[str, Any] = dict(tls.getpeercert() or {})
    except ConnectionRefusedError:
        raise _refused() from None
    except TimeoutError:
        raise _timeout_error(timeout) from None
    except (OSError, ssl.SSLError) as exc:
        raise ExportError(f"TLS connection failed ({exc})", retryable=True) from None
    names = [
        value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")
    ]
    names += [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return pem.encode(), names[0] if names else host


class GrpcTransport:
    """OTLP/gRPC through ``TraceService/Export``."""

    def __init__(self, config: OtlpExport) -> None:
        url = urlsplit(config.endpoint)
        self.endpoint = config.endpoint
        self._target = url.netloc
        self._host = url.hostname or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._metadata = tuple(_headers(config).items())
        self._tls: OtlpTls | None = config.tls if url.scheme == "https" else None
        self._secure = url.scheme == "https"
        self._skip_verify = self._tls is not None and self._tls.insecure_skip_verify
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: TraceServiceStub | None = None
        self._connect_timeout = config.timeout
        self._closed = False

    def _credentials(self) -> tuple[grpc.ChannelCredentials, tuple[tuple[str, str], ...]]:
        tls = self._tls or OtlpTls()
        key, chain = _read(tls.client_key), _read(tls.client_cert)
        if self._skip_verify:
            pem, name = _peer_certificate(self._host, self._port, self._connect_timeout)
            options = (("grpc.ssl_target_name_override", name),)
            return grpc.ssl_channel_credentials(pem, key, chain), options
        roots = _system_roots() + Path(tls.ca_cert).read_bytes() if tls.ca_cert else None
        return grpc.ssl_channel_credentials(roots, key, chain), ()

    def _get_stub(self) -> TraceServiceStub:
        with self._lock:
            if self._closed:
                raise ExportError("the exporter is shut down", retryable=False)
            if self._stub is None:
                if self._secure:
                    credentials, extra = self._credentials()
                    options = _GRPC_CHANNEL_OPTIONS + extra
                    self._channel = grpc.secure_channel(self._target, credentials, options)
                else:
                    self._channel = grpc.insecure_channel(self._target, _GRPC_CHANNEL_OPTIONS)
                self._stub = TraceServiceStub(self._channel)
            return self._stub

    def _reset(self, stub: TraceServiceStub | None = None) -> None:
        """Drop the channel (only if it is still the one of ``stub``, when given)."""
        with self._lock:
            if stub is not None and stub is not self._stub:
                return  # another thread already replaced it
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None

    def send(
        self, request: ExportTraceServiceRequest, timeout: float
    ) -> ExportTraceServiceResponse:
        stub = self._get_stub()
        try:
            return stub.Export(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            if self._skip_verify:
                self._reset(stub)  # the collector may come back with another certificate
            raise _grpc_error(exc, timeout) from None

    def close(self) -> None:
        self._reset()
        self._closed = True


# ---------------------------------------------------------------------------- HTTP


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: rare from collectors, use our backoff
        return None


class HttpTransport:
    """OTLP/HTTP: POST of the protobuf request to ``<endpoint>/v1/traces``."""

    def __init__(self, config: OtlpExport, connections: int) -> None:
        import urllib3

        url = urlsplit(config.endpoint)
        self.endpoint = config.endpoint
        self.url = (
            config.endpoint.rstrip("/") + HTTP_TRACES_PATH
            if url.path in ("", "/")
            else config.endpoint
        )
        self._headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": USER_AGENT,
            **_headers(config),
        }
        context = None
        if url.scheme == "https":
            tls = config.tls or OtlpTls()
            context = ssl.create_default_context()
            if tls.ca_cert:
                context.load_verify_locations(tls.ca_cert)
            if tls.client_cert and tls.client_key:
                context.load_cert_chain(tls.client_cert, tls.client_key)
            if tls.insecure_skip_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._pool = urllib3.PoolManager(
            num_pools=1, maxsize=connections, ssl_context=context, retries=False
        )

    def send(
        self, request: ExportTraceServiceRequest, timeout: float
    ) -> ExportTraceServiceResponse:
        from urllib3 import exceptions as ux

        try:
            response = self._pool.request(
                "POST",
                self.url,
                body=request.SerializeToString(),
                headers=self._headers,
                timeout=timeout,
                retries=False,
                redirect=False,
            )
        except ux.NameResolutionError:
            host = urlsplit(self.url).hostname
            raise ExportError(
                f"cannot resolve the collector's host name {host}", retryable=True
            ) from None
        except ux.NewConnectionError as exc:
            if isinstance(exc.__context__, ConnectionRefusedError) or "refused" in str(exc):
                raise _refused() from None
            raise ExportError(f"cannot connect ({exc})", retryable=True) from None
        except (ux.ConnectTimeoutError, ux.ReadTimeoutError):
            raise _timeout_error(timeout) from None
        except ux.SSLError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise _tls_verify_error(str(exc)) from None
            raise _handshake_error(str(exc)) from None
        except ux.ProtocolError as exc:
            raise ExportError(
                f"the connection to the collector failed ({exc.args[0] if exc.args else exc});"
                " is it an OTLP/HTTP port (usually 4318) with the right scheme?",
                retryable=True,
            ) from None
        except ux.HTTPError as exc:
            raise ExportError(f"HTTP request failed ({exc})", retryable=True) from None
        status = response.status
        if 200 <= status < 300:
            try:
                return ExportTraceServiceResponse.FromString(response.data)
            except Exception:  # not protobuf (a proxy's body): accepted all the same
                return ExportTraceServiceResponse()
        detail = f"HTTP {status} {response.reason or ''}".rstrip()
        body = response.data[:200].decode("utf-8", "replace").strip()
        if body:
            detail += f": {body}"
        if status in (401, 403):
            raise ExportError(
                f"authentication rejected ({detail}); check auth and headers", retryable=False
            )
        if status in _HTTP_RETRYABLE:
            raise ExportError(
                f"the collector is unavailable ({detail})",
                retryable=True,
                retry_after=_retry_after(response.headers.get("Retry-After")),
            )
        hint = f" (is {self.url} the OTLP/HTTP traces URL?)" if status == 404 else ""
        raise ExportError(f"the collector rejected the export ({detail}){hint}", retryable=False)

    def close(self) -> None:
        self._pool.clear()


# ---------------------------------------------------------------------------- factory


def make_transport(config: OtlpExport, connections: int | None = None) -> Transport:
    """The transport of an ``otlp`` config block (ConfigError for a TLS block without https)."""
    scheme = urlsplit(config.endpoint).scheme
    if config.tls is not None and scheme != "https":
        raise ConfigError(
            f"export.traces.otlp.tls: TLS settings need an https:// endpoint, got"
            f' "{config.endpoint}"; use https:// or remove the tls block'
        )
    if config.tls is not None and config.tls.insecure_skip_verify:
        log.warning(
            "OTLP export to %s does not verify the collector's TLS certificate"
            " (insecure_skip_verify): anyone on the path can read and alter the spans",
            config.endpoint,
        )
    if config.protocol == "grpc":
        return GrpcTransport(config)
    return HttpTransport(config, connections or config.max_concurrent_exports)


def describe(config: OtlpExport) -> str:
    """``ENDPOINT (PROTOCOL)``, as messages name an exporter."""
    return f"{config.endpoint} ({config.protocol})"
