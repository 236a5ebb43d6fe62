"""The HTTP servers of a capture (metrics, API): address families, serving, prompt close."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import MetricsHandler

from mermin_cli.api.server import SHUTDOWN_POLL, HttpServer
from mermin_cli.errors import MerminError


@pytest.mark.parametrize(("address", "url_host"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
def test_metrics_served_on_ipv4_and_ipv6_and_closed_promptly(address: str, url_host: str) -> None:
    registry = CollectorRegistry()
    Counter("mermin_test_things", "things", registry=registry).inc(3)
    server = HttpServer("metrics server", 'internal "metrics"', address, 0,
                        MetricsHandler.factory(registry))  # fmt: skip
    server.start()
    try:
        with urllib.request.urlopen(f"http://{url_host}:{server.port}/metrics", timeout=5) as r:
            body = r.read().decode()
    finally:
        started = time.monotonic()
        server.close()
        closed_in = time.monotonic() - started
    assert "mermin_test_things_total 3.0" in body
    assert closed_in < 3 * SHUTDOWN_POLL


def test_address_not_on_this_host_is_one_clear_sentence() -> None:
    with pytest.raises(MerminError) as err:
        HttpServer("metrics server", 'internal "metrics"', "192.0.2.1", 0, MetricsHandler)
    assert str(err.value) == (
        "The metrics server cannot listen on 192.0.2.1:0 (that address is not on this host); "
        'set another port in internal "metrics" { port = ... } or disable it with enabled = false.'
    )
