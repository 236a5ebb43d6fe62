"""Run the real `mermin capture` CLI inside a test namespace, and tcpdump beside it as oracle."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dpkt

try:
    from . import netns  # type: ignore[import-not-found]
except ImportError:
    import netns  # type: ignore[no-redef]

MERMIN = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "mermin")

FAST_CONFIG = """
span {
  max_record_interval = "%(interval)s"
  tcp_timeout         = "2s"
  tcp_fin_timeout     = "500ms"
  tcp_rst_timeout     = "500ms"
  udp_timeout         = "1s"
  icmp_timeout        = "1s"
  generic_timeout     = "1s"
}
pipeline {
  flow_producer {
    flow_store_poll_interval = "200ms"
  }
}
"""


def servers_config(metrics_port: int, api_port: int) -> str:
    """Config blocks moving the metrics and API servers off their defaults (so tests that
    run servers of their own on 8080 / 10250 in the namespace do not collide)."""
    return (
        f'internal "metrics" {{\n  port = {metrics_port}\n}}\n'
        f'internal "server" {{\n  port = {api_port}\n}}\n'
    )


def write_config(tmp: Path, interval: str = "60s", extra: str = "") -> Path:
    path = tmp / "mermin.hcl"
    path.write_text(FAST_CONFIG % {"interval": interval} + extra)
    return path


@dataclass
class Capture:
    """A running `mermin capture --format json`; records arrive with their arrival time."""

    proc: subprocess.Popen[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.records.append(json.loads(line))
            self.arrivals.append(time.time())

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            if "capturing on" in line:
                self.ready.set()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the capture and wait for it; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self._threads_join()
        return code

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout=timeout)
        self._threads_join()
        return code

    def _threads_join(self) -> None:
        for t in self._threads:
            t.join(timeout=5)

    def start_threads(self) -> None:
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def wait_ready(self, timeout: float = 30) -> None:
        if not self.ready.wait(timeout):
            self.proc.kill()
            raise AssertionError("capture did not start:\n" + "".join(self.stderr))

    def for_flow(self, **attrs: Any) -> list[dict[str, Any]]:
        """Records whose attributes contain all of `attrs`."""
        return [
            r for r in self.records if all(r["attributes"].get(k) == v for k, v in attrs.items())
        ]


def start_capture(host: netns.Host, *args: str, ready: bool = True) -> Capture:
    proc = host.popen(
        MERMIN, "capture", "--format", "json", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    cap = Capture(proc)
    cap.start_threads()
    if ready:
        cap.wait_ready()
    return cap


@dataclass
class Oracle:
    """tcpdump on the same interface: packets and IP bytes per (flow, sender)."""

    proc: subprocess.Popen[str]
    path: Path

    def stop(self) -> dict[tuple[Any, ...], dict[tuple[str, int], list[int]]]:
        time.sleep(0.3)  # let the last packets reach the file (-U writes per packet)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        return tally(self.path)


def start_tcpdump(host: netns.Host, path: Path) -> Oracle:
    proc = host.popen(
        # --immediate-mode: without it packets wait in the capture ring for its block
        # timeout (about a second), and the ones still there at SIGINT never reach the file.
        "tcpdump", "-i", host.ifname, "-n", "-U", "--immediate-mode", "-s", "0", "-w", str(path),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "listening on" in line, line
    return Oracle(proc, path)


def tally(path: Path) -> dict[tuple[Any, ...], dict[tuple[str, int], list[int]]]:
    """{(proto, endpoint, endpoint) sorted: {sender endpoint: [packets, ip_bytes]}}."""
    flows: dict[tuple[Any, ...], dict[tuple[str, int], list[int]]] = defaultdict(
        lambda: defaultdict(lambda: [0, 0])
    )
    with path.open("rb") as fh:
        for _ts, buf in dpkt.pcap.Reader(fh):
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if isinstance(ip, dpkt.ip.IP):
                src, dst, length, family = ip.src, ip.dst, ip.len, socket.AF_INET
            elif isinstance(ip, dpkt.ip6.IP6):
                src, dst, length, family = ip.src, ip.dst, ip.plen + 40, socket.AF_INET6
            else:
                continue
            l4 = ip.data
            sport = getattr(l4, "sport", 0)
            dport = getattr(l4, "dport", 0)
            a = (socket.inet_ntop(family, src), sport)
            b = (socket.inet_ntop(family, dst), dport)
            key = (ip.p if family == socket.AF_INET else ip.nxt, *sorted([a, b]))
            flows[key][a][0] += 1
            flows[key][a][1] += length
    return flows


def oracle_key(proto: int, a: tuple[str, int], b: tuple[str, int]) -> tuple[Any, ...]:
    return (proto, *sorted([a, b]))
