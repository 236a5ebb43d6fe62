"""The HTTP servers of a capture (metrics, API): address families, serving, prompt close."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import MetricsHandler

from mermin_cli.api.server import HttpServer
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
    assert closed_in < 0.05  # woken, not polled


def test_close_twice_is_harmless_and_frees_the_port() -> None:
    server = HttpServer("API server", 'internal "server"', "127.0.0.1", 0, MetricsHandler)
    server.start()
    port = server.port
    server.close()
    server.close()  # a second close used to write to a closed pipe (OSError)
    again = HttpServer("API server", 'internal "server"', "127.0.0.1", port, MetricsHandler)
    again.close()  # never started: closes without waiting for a thread


def test_address_not_on_this_host_is_one_clear_sentence() -> None:
    with pytest.raises(MerminError) as err:
        HttpServer("metrics server", 'internal "metrics"', "192.0.2.1", 0, MetricsHandler)
    assert str(err.value) == (
        "The metrics server cannot listen on 192.0.2.1:0 (that address is not on this host); "
        'set another port in internal "metrics" { port = ... } or disable it with enabled = false.'
    )


def _times_run(thread_id: int) -> int:
    """How many times the kernel has run this thread (third field of its schedstat)."""
    return int(open(f"/proc/self/task/{thread_id}/schedstat").read().split()[2])


def test_idle_server_never_wakes_up() -> None:
    server = HttpServer("API server", 'internal "server"', "127.0.0.1", 0, MetricsHandler)
    server.start()
    try:
        time.sleep(0.1)  # let it reach its wait
        assert server.thread.native_id is not None
        before = _times_run(server.thread.native_id)
        time.sleep(0.5)  # serve_forever(0.1) would have woken 5 times
        assert _times_run(server.thread.native_id) == before
    finally:
        server.close()
