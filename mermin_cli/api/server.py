"""Health endpoints and a small read-only JSON API, for probes, `mermin flows` and `doctor`.

GET /livez           {"status": "ok"|"unavailable", "checks": {...}}
GET /readyz          {"status": "ready"|"not_ready", "checks": {...}}  (503 when not ready)
GET /api/v1/status   pipeline, kernel counters, interfaces, table usage, exporters
GET /api/v1/flows    active flows with counters and rates (?limit=N, default 1000)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from mermin_cli.errors import MerminError

log = logging.getLogger("mermin.api")

Checks = Callable[[], dict[str, bool]]


class ApiServer:
    """Serves the endpoints on its own threads, so it answers while the pipeline is busy."""

    def __init__(
        self,
        address: str,
        port: int,
        live: Checks,
        ready: Checks,
        status: Callable[[], dict[str, Any]],
        flows: Callable[[int], dict[str, Any]],
    ) -> None:
        routes: dict[str, Callable[[dict[str, list[str]]], tuple[int, dict[str, Any]]]] = {
            "/livez": lambda _q: _health(live(), "ok", "unavailable"),
            "/readyz": lambda _q: _health(ready(), "ready", "not_ready"),
            "/api/v1/status": lambda _q: (200, status()),
            "/api/v1/flows": lambda q: (200, flows(int(q.get("limit", ["1000"])[0]))),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                route = routes.get(url.path)
                try:
                    code, body = (
                        route(parse_qs(url.query)) if route else (404, {"error": "not found"})
                    )
                except ValueError as exc:
                    code, body = 400, {"error": str(exc)}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                """Requests are not logged (probes would flood the log)."""

        self.server = HttpServer("API server", 'internal "server"', address, port, Handler)

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self.server.start()

    def close(self) -> None:
        self.server.close()


class HttpServer:
    """A threaded HTTP server for `handler` on `address` (IPv4 or IPv6) and `port`."""

    def __init__(
        self, what: str, block: str, address: str, port: int, handler: type[BaseHTTPRequestHandler]
    ) -> None:
        """`what` and `block` name the server and its config block in a bind error."""
        try:
            family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                        flags=socket.AI_PASSIVE)[0][0]  # fmt: skip
            # The family is a class attribute of socketserver servers: a subclass per family.
            server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
            self.httpd = server_class((address, port), handler)
        except OSError as exc:  # socket.gaierror included
            raise MerminError(_bind_error(what, block, address, port, exc)) from exc
        self.httpd.daemon_threads = True
        self.httpd.timeout = 0  # handle_request() never blocks: _serve saw the socket ready
        self._wake_r, self._wake_w = os.pipe()
        self.thread = threading.Thread(target=self._serve, name="mermin-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        """Accept connections until close(). Waits on the listening socket and a wake-up
        pipe, so an idle server never runs (socketserver's serve_forever wakes every poll
        interval to look for a shutdown request)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.httpd, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while all(key.fd != self._wake_r for key, _ in selector.select()):
                self.httpd.handle_request()

    def close(self) -> None:
        """Stop serving and release the port; a second call does nothing."""
        if self._wake_w < 0:
            return
        os.write(self._wake_w, b"x")
        if self.thread.ident is not None:  # started
            self.thread.join()
        self.httpd.server_close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1


def _health(checks: dict[str, bool], good: str, bad: str) -> tuple[int, dict[str, Any]]:
    ok = all(checks.values())
    return (200 if ok else 503), {"status": good if ok else bad, "checks": checks}


def _bind_error(what: str, block: str, address: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        reason = "the port is already in use"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason = "that address is not on this host"
    else:
        reason = exc.strerror or str(exc)
    return (
        f"The {what} cannot listen on {address}:{port} ({reason}); set another port in "
        f"{block} {{ port = ... }} or disable it with enabled = false."
    )


def start_metrics_server(registry: Any, address: str, port: int) -> Callable[[], None]:
    """Serve /metrics from `registry`; returns a function that stops the server."""
    from prometheus_client.exposition import MetricsHandler

    # Not prometheus_client's start_http_server: its serve loop polls every 0.5 s, which
    # every exit waited for.
    server = HttpServer(
        "metrics server", 'internal "metrics"', address, port, MetricsHandler.factory(registry)
    )
    server.start()
    return server.close
