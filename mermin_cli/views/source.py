"""Where `mermin flows` gets its data: the local API of a running capture, or, when none
answers and we may capture, an engine of our own run in-process."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from mermin_cli.config.schema import Config, ExportConfig
from mermin_cli.engine.privileges import missing_capabilities
from mermin_cli.errors import MerminError
from mermin_cli.flows.record import FlowRecord

log = logging.getLogger("mermin.flows")

TIMEOUT = 2.0  # seconds for one API request
READY_POLL = 0.05  # seconds between checks while our own engine starts


class ApiUnavailable(MerminError):
    """The capture's API did not answer, or not as a mermin capture does."""


class ApiClient:
    """GET requests to a capture's JSON API (never through a proxy: it is local)."""

    def __init__(self, url: str, label: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.label = label or self.url  # what the header names as the source
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str) -> Any:
        try:
            with self._opener.open(self.url + path, timeout=TIMEOUT) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code} {exc.reason}"
        except urllib.error.URLError as exc:
            reason = getattr(exc.reason, "strerror", None) or str(exc.reason)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
        raise ApiUnavailable(f"No answer from the capture at {self.url} ({reason}).")

    def status(self) -> dict[str, Any]:
        status = self.get("/api/v1/status")
        if not isinstance(status, dict) or "kernel" not in status or "table" not in status:
            raise ApiUnavailable(f"What answers at {self.url} is not a mermin capture.")
        return status

    def flows(self, limit: int) -> dict[str, Any]:
        return dict(self.get(f"/api/v1/flows?limit={limit}"))

    def ready(self) -> bool:
        try:
            return self.get("/readyz").get("status") == "ready"
        except ApiUnavailable:
            return False


def default_url(config: Config) -> str | None:
    """The API of a capture run with `config` (internal "server"), as seen from this host."""
    server = config.internal.server
    if not server.enabled:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(server.listen_address, server.listen_address)
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    return f"http://{host}:{server.port}"


class _Discard:
    """Where the records of our own engine go: `flows` shows the flow table, not records."""

    name = "flows"
    failed = dropped = 0

    def __init__(self) -> None:
        self.sent = 0

    def write(self, records: list[FlowRecord]) -> None:
        self.sent += len(records)

    def close(self) -> None:
        """Nothing is queued."""


class OwnEngine:
    """A capture in a background thread for this view only: its API on 127.0.0.1 at a free
    port, no metrics server, no exporters, no hostname lookups. Entering waits until it has
    polled once; leaving stops it (flush, detach) and raises what ended it, if anything."""

    def __init__(self, config: Config) -> None:
        from mermin_cli.pipeline.capture import Capture, CaptureOptions

        internal = config.internal
        config = dataclasses.replace(
            config,
            span=dataclasses.replace(config.span, enable_hostname_resolution=False),
            export=ExportConfig(),
            internal=dataclasses.replace(
                internal,
                server=dataclasses.replace(
                    internal.server, enabled=True, listen_address="127.0.0.1", port=0
                ),
                metrics=dataclasses.replace(internal.metrics, enabled=False),
            ),
        )
        self.capture = Capture(config, _Discard(), CaptureOptions())
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mermin-flows-engine", daemon=True)

    def _run(self) -> None:
        try:
            self.capture.run()
        except BaseException as exc:  # handed to the main thread
            self.error = exc

    def _check(self) -> None:
        if not self.thread.is_alive():
            raise self.error or MerminError("The capture engine ended before it was ready.")

    def __enter__(self) -> ApiClient:
        self.thread.start()
        try:
            while not self.capture.ready.wait(READY_POLL):
                self._check()
            client = ApiClient(f"http://127.0.0.1:{self.capture.api_port}", "own capture")
            while not client.ready():
                self._check()
                time.sleep(READY_POLL)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return client

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.capture.stop.set()
        self.thread.join()
        if self.error is not None and not isinstance(exc, KeyboardInterrupt):
            raise self.error


def may_capture() -> bool:
    """Whether this process has the capabilities a capture needs."""
    return not missing_capabilities()


@contextmanager
def connect(config: Config, url: str | None, retry: str) -> Iterator[ApiClient]:
    """The API of the running capture at `url` (default: the config's internal "server");
    if none answers, an engine of our own when we may capture; else a MerminError that
    suggests `retry` (the command to run as root). An explicit `url` never falls back."""
    target = url or default_url(config)
    if target is not None:
        client = ApiClient(target)
        try:
            client.status()
        except ApiUnavailable as exc:
            if url is not None:
                raise
            log.debug("%s", exc)
        else:
            yield client
            return
    if not may_capture():
        where = f"at {target}" if target else '(the config disables its API, internal "server")'
        raise MerminError(f"No capture is running {where} and starting one needs root ({retry}).")
    log.info("no capture answers at %s; starting one in this process", target)
    with OwnEngine(config) as client:
        yield client
