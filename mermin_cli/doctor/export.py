"""Export checks: the OTLP endpoint resolves and connects, TLS verifies, the collector
accepts a test span, and reverse DNS answers within its timeout."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from urllib.parse import urlsplit

from mermin_cli.config.schema import OtlpExport
from mermin_cli.doctor.context import Context, within
from mermin_cli.doctor.framework import Check, Outcome, failed, passed, skipped, warned
from mermin_cli.errors import MerminError

CONNECT_TIMEOUT = 5.0  # seconds, at most, for resolving and connecting
EXPIRY_WARNING_DAYS = 14
LOOKUP_LIMIT = 2.0  # seconds doctor waits for a reverse lookup


def _otlp(ctx: Context) -> OtlpExport | None:
    return ctx.config.export.traces.otlp


def _target(otlp: OtlpExport) -> tuple[str, int]:
    url = urlsplit(otlp.endpoint)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def _endpoint(ctx: Context) -> Outcome:
    otlp = _otlp(ctx)
    if otlp is None:
        return skipped('no OTLP exporter configured (export "traces" { otlp = { ... } })')
    host, port = _target(otlp)
    limit = min(otlp.timeout, CONNECT_TIMEOUT)
    fix = (
        f"check export.traces.otlp.endpoint ({otlp.endpoint}): is the collector running and"
        " listening there (gRPC usually 4317, HTTP 4318)? firewalls, network policies?"
    )
    try:
        infos = within(limit, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except (OSError, TimeoutError) as exc:
        return failed(f"cannot resolve {host}: {exc}", fix)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    errors = []
    for family, kind, proto, _name, sockaddr in infos:
        started = time.monotonic()
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(limit)
                sock.connect(sockaddr)
        except OSError as exc:
            errors.append(f"{sockaddr[0]}:{port} {exc.strerror or 'timed out'}")
            continue
        elapsed_ms = (time.monotonic() - started) * 1000
        return passed(
            f"{host} resolves to {', '.join(addresses)}; TCP connect to {sockaddr[0]}:{port}"
            f" in {elapsed_ms:.1f} ms"
        )
    return failed(f"{host} resolves to {', '.join(addresses)}; {'; '.join(errors)}", fix)


def _tls(ctx: Context) -> Outcome:
    otlp = _otlp(ctx)
    if otlp is None:
        return skipped("no OTLP exporter configured")
    if urlsplit(otlp.endpoint).scheme != "https":
        return skipped(f"{otlp.endpoint} is plain http: no TLS to check", blocks=False)
    host, port = _target(otlp)
    tls = otlp.tls
    trusted = "the system CAs" + (f" and {tls.ca_cert}" if tls and tls.ca_cert else "")
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2"] if otlp.protocol == "grpc" else ["http/1.1"])
    try:
        if tls and tls.ca_cert:
            context.load_verify_locations(tls.ca_cert)
        if tls and tls.client_cert and tls.client_key:
            context.load_cert_chain(tls.client_cert, tls.client_key)
    except (OSError, ssl.SSLError) as exc:
        return failed(
            f"cannot load the TLS files: {exc}", "check the paths in export.traces.otlp.tls"
        )
    if tls and tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(
                (host, port), timeout=min(otlp.timeout, CONNECT_TIMEOUT)
            ) as raw,
            context.wrap_socket(raw, server_hostname=host) as conn,
        ):
            version, cert = conn.version(), conn.getpeercert()
    except ssl.SSLCertVerificationError as exc:
        return failed(
            f"the certificate of {host}:{port} does not verify against {trusted}:"
            f" {exc.verify_message}",
            "set export.traces.otlp.tls.ca_cert to the CA that signed the collector's"
            f" certificate, and make the certificate name {host} (SAN)",
        )
    except ssl.SSLError as exc:
        detail = exc.reason or str(exc)
        if detail == "WRONG_VERSION_NUMBER":
            detail = "the port does not speak TLS"
        return failed(
            f"TLS handshake with {host}:{port} failed: {detail}",
            "use an http:// endpoint for a plain port, or the collector's TLS port",
        )
    except OSError as exc:
        return failed(f"cannot connect to {host}:{port}: {exc}", "see export.endpoint")
    if tls and tls.insecure_skip_verify:
        return warned(
            f"{version} with {host}:{port}, certificate NOT verified (insecure_skip_verify)",
            "set tls.ca_cert to the collector's CA instead of skipping verification",
        )
    expires = ssl.cert_time_to_seconds(str(cert["notAfter"]))
    days = (expires - time.time()) / 86400
    seen = (
        f"{version} with {host}:{port}; certificate verified against {trusted}, valid until"
        f" {cert['notAfter']}"
    )
    if days < EXPIRY_WARNING_DAYS:
        return warned(f"{seen}: expires in {days:.1f} days", "renew the collector's certificate")
    return passed(seen)


def _accepts_span(ctx: Context) -> Outcome:
    from mermin_cli.export.otlp import check_collector
    from mermin_cli.export.spans import build_resource

    otlp = _otlp(ctx)
    if otlp is None:
        return skipped("no OTLP exporter configured")
    try:
        return passed(check_collector(otlp, build_resource()))
    except MerminError as exc:
        return failed(
            str(exc),
            "check the protocol (grpc on 4317, http_binary on 4318), auth and headers, and"
            " the collector's own log",
        )


def _lookup_addresses(ctx: Context) -> list[str]:
    """One IPv4 and one IPv6 address of the selected interfaces (loopback without any)."""
    found: dict[int, str] = {}
    for iface in ctx.selected:
        for address in iface.addresses:
            ip = ipaddress.ip_interface(address).ip
            if not ip.is_link_local:
                found.setdefault(ip.version, str(ip))
    return list(found.values()) or ["127.0.0.1"]


def _hostname_resolution(ctx: Context) -> Outcome:
    from mermin_cli.export.hostnames import reverse_dns

    span = ctx.config.span
    if not span.enable_hostname_resolution:
        return skipped("span.enable_hostname_resolution = false", blocks=False)
    limit_ms = span.hostname_resolve_timeout * 1000
    answers, slow = [], []
    for address in _lookup_addresses(ctx):
        started = time.monotonic()
        try:
            name = within(LOOKUP_LIMIT, lambda a=address: reverse_dns(a))
        except TimeoutError:
            name = f"no answer within {LOOKUP_LIMIT:g}s"
        except (OSError, UnicodeError):
            name = "no name"
        elapsed_ms = (time.monotonic() - started) * 1000
        answers.append(f"{address} -> {name} in {elapsed_ms:.0f} ms")
        if elapsed_ms > limit_ms:
            slow.append(address)
    seen = "; ".join(answers)
    if slow:
        return warned(
            f"{seen}: slower than span.hostname_resolve_timeout ({limit_ms:.0f} ms), so records"
            " carry IPs instead of names until the cache fills",
            "fix the resolver (/etc/resolv.conf), raise span.hostname_resolve_timeout, or set"
            " span.enable_hostname_resolution = false",
        )
    return passed(f"{seen} (timeout {limit_ms:.0f} ms)")


CHECKS = (
    Check(
        "export.endpoint",
        "the OTLP endpoint resolves and accepts TCP connections",
        _endpoint,
        requires=("config.valid",),
    ),
    Check(
        "export.tls",
        "the TLS handshake verifies with the configured CA (https endpoints)",
        _tls,
        requires=("export.endpoint",),
    ),
    Check(
        "export.accepts_span",
        "the collector accepts a test span (as `mermin export --check`)",
        _accepts_span,
        requires=("export.endpoint", "export.tls"),
    ),
    Check(
        "export.hostname_resolution",
        "reverse DNS answers within span.hostname_resolve_timeout",
        _hostname_resolution,
        requires=("config.valid",),
    ),
)
