"""Who started a flow (source = initiator) and what this host is in it (span kind).

Orientation, first rule that decides wins:
1. TCP: the sender of the first pure SYN is the client; else the receiver of a SYN+ACK.
2. ICMP: the sender of a request type (echo, timestamp, ...) is the client; the receiver
   of a reply type is.
3. TCP seen mid-stream (no handshake): the side on a local listening port is the server;
   else the side on an ephemeral port is the client.
4. Otherwise the sender of the first packet seen.

Kind: CLIENT when the source address is local to this host, SERVER when the destination
is, INTERNAL when neither is (forwarded or bridged traffic).
"""

from __future__ import annotations

import ipaddress
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mermin_cli.engine.layout import DIR_NONE
from mermin_cli.flows import names
from mermin_cli.flows.record import KIND_CLIENT, KIND_INTERNAL, KIND_SERVER

PROTO_TCP = 6
PROTO_ICMP = 1
PROTO_ICMPV6 = 58
_TCP_LISTEN = "0A"  # st column of /proc/net/tcp


def _read_listening(proc: Path) -> set[int]:
    """TCP ports this network namespace listens on.

    Asks sock_diag for listening sockets only: the kernel then walks its small listening
    hash, where reading /proc/net/tcp walks every bucket of the host's whole TCP hash
    (10.8 ms against 2.6 ms on the development VM, for two lines of output). /proc is the
    fallback for kernels without inet_diag."""
    from pyroute2 import DiagSocket
    from pyroute2.netlink.diag import SS_LISTEN
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with DiagSocket() as diag:
            diag.bind()
            return {
                int(msg["idiag_sport"])
                for family in (socket.AF_INET, socket.AF_INET6)
                for msg in diag.get_sock_stats(family=family, states=1 << SS_LISTEN)
            }
    except (OSError, NetlinkError):
        return _read_listening_proc(proc)


def _read_listening_proc(proc: Path) -> set[int]:
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 3 and cols[3] == _TCP_LISTEN:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _read_ephemeral(proc: Path) -> tuple[int, int]:
    try:
        lo, hi = (proc / "sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _local_addresses() -> set[bytes]:
    from pyroute2 import IPRoute

    found: set[bytes] = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            addr = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            if addr:
                found.add(ipaddress.ip_address(addr).packed)
    return found


@dataclass
class LocalHost:
    """What this host (network namespace) owns: addresses and listening TCP ports."""

    proc: Path = Path("/proc")
    addresses: set[bytes] = field(default_factory=set)
    listening: set[int] = field(default_factory=set)
    ephemeral: tuple[int, int] = (32768, 60999)
    refresh_interval: float = 10.0  # seconds; inf keeps what was given (tests)
    _refreshed: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def refresh(self, force: bool = False) -> None:
        """Re-read addresses and listeners, at most every `refresh_interval` unless forced."""
        with self._lock:  # callers wait for a refresh in progress rather than use stale data
            now = time.monotonic()
            last = self._refreshed if self._refreshed is not None else -math.inf
            due = self.refresh_interval != math.inf and now - last >= self.refresh_interval
            if not (force or due):
                return
            self.addresses = _local_addresses()
            self.listening = _read_listening(self.proc)
            self.ephemeral = _read_ephemeral(self.proc)
            self._refreshed = now

    def is_ephemeral(self, port: int) -> bool:
        return self.ephemeral[0] <= port <= self.ephemeral[1]


def initiator_dir(
    proto: int,
    ip_ver: int,
    ports: tuple[int, int],
    addrs: tuple[bytes, bytes],
    first_dir: int,
    syn_dir: int,
    synack_dir: int,
    first_icmp_type: int,
    host: LocalHost,
) -> int:
    """Key direction (0: lo->hi, 1: hi->lo) in which the flow was initiated."""
    if proto == PROTO_TCP:
        if syn_dir != DIR_NONE:
            return syn_dir
        if synack_dir != DIR_NONE:
            return 1 - synack_dir
        return _mid_stream_tcp(ports, addrs, first_dir, host)
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        request = names.icmp_is_request(ip_ver, first_icmp_type)
        if request is not None:
            return first_dir if request else 1 - first_dir
    return first_dir


def _mid_stream_tcp(
    ports: tuple[int, int], addrs: tuple[bytes, bytes], first_dir: int, host: LocalHost
) -> int:
    server = [addrs[i] in host.addresses and ports[i] in host.listening for i in (0, 1)]
    if server[0] != server[1]:
        return 1 if server[0] else 0  # the server side never initiates
    eph = [host.is_ephemeral(p) for p in ports]
    if eph[0] != eph[1]:
        return 0 if eph[0] else 1  # the client side sends from its ephemeral port
    return first_dir


def span_kind(src: bytes, dst: bytes, host: LocalHost) -> str:
    """CLIENT if this host started the flow, SERVER if it answered, else INTERNAL."""
    if src in host.addresses:
        return KIND_CLIENT
    if dst in host.addresses:
        return KIND_SERVER
    return KIND_INTERNAL
