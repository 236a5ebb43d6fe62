"""Kernel parser tests: crafted frames run through BPF_PROG_TEST_RUN, exact flow table contents.

Every frame is run once through a loaded entry point of bpf/flow.c; the test then reads
the whole flow table and the per-CPU counters and compares them with what the frame must
produce. Each run must return TC_ACT_UNSPEC (-1) and leave the frame byte-for-byte intact.

What BPF_PROG_TEST_RUN imposes (kernel ``bpf_prog_test_run_skb``):

* The skb runs on the loopback device (ifindex 1) unless ``__sk_buff.ifindex`` names a
  device of the caller's network namespace.
* Frames shorter than an Ethernet header are refused (EINVAL), and so (kernel 6.18) are
  untagged IPv4/IPv6 frames shorter than their fixed IP header. The program's "shorter than
  Ethernet" branch is therefore unreachable from here, and truncated IP headers are tested
  behind a VLAN tag, which the kernel does not look through.
* ``skb->protocol`` always comes from ``eth_type_trans()`` on the first 14 bytes, and the
  data handed to a SCHED_CLS program starts at byte 0 — also for the L3 entry points. A raw
  IP packet is therefore parsed correctly by them only when its bytes 12-13 happen to read
  as the right EtherType: an IPv4 source address 8.0.x.y (0x0800) or an IPv6 source
  address 2001:db8:86dd::/48 (0x86DD). The L3 tests use such addresses; L3 devices as
  such (TUN, WireGuard, ...) are left to the end-to-end tests.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import dpkt
import numpy as np
import pytest

from mermin_cli.engine import bpfsys, cache, cpus
from mermin_cli.engine.clock import ticks_aligned
from mermin_cli.engine.compiler import EVENT_BYTES, FLOW_PROBES, event_slots, flow_slots
from mermin_cli.engine.layout import (
    COUNTERS,
    DIR_NONE,
    FLOW_F_FRAGMENT,
    HOOK_EGRESS,
    KEY_DTYPE,
    SLOT_DTYPE,
    SLOT_EMPTY,
    SLOT_FULL,
    STATS_DTYPE,
)
from mermin_cli.engine.program import FlowProgram
from mermin_cli.engine.table import FlowTable, flow_hash
from mermin_cli.flows.tracker import first_of_event, first_of_stats

try:  # tests/ as a package, or (default) as a plain directory on sys.path
    from . import netns  # type: ignore[import-not-found]
except ImportError:
    import netns  # type: ignore[no-redef]

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("require_bpf")]

T = TypeVar("T")

TC_ACT_UNSPEC = -1
LO_IFINDEX = 1  # BPF_PROG_TEST_RUN's default device
CAPACITY = 1024

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ETH_P_LLDP = 0x88CC
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8

TCP, UDP, ICMP, ICMPV6, SCTP, GRE, ESP, UDPLITE = 6, 17, 1, 58, 132, 47, 50, 136
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60
SYN, ACK, FIN, PSH, RST = (
    dpkt.tcp.TH_SYN,
    dpkt.tcp.TH_ACK,
    dpkt.tcp.TH_FIN,
    dpkt.tcp.TH_PUSH,
    dpkt.tcp.TH_RST,
)
ECE, CWR = dpkt.tcp.TH_ECE, dpkt.tcp.TH_CWR

TIMESTAMPS = ("first_ns", "last_ns", "syn_ns", "synack_ns")
FRESH: dict[str, Any] = {
    "packets": [0, 0],
    "bytes": [0, 0],
    "tcp_flags": [0, 0],
    "first_dir": 0,
    "first_hook": 0,
    "syn_dir": DIR_NONE,
    "synack_dir": DIR_NONE,
    "flags": 0,
    "ttl": [0, 0],
    "tos": [0, 0],
    "icmp_type": [0, 0],
    "icmp_code": [0, 0],
    "flow_label": [0, 0],
    "vlan_id": 0,
    "mac": bytes.fromhex("020000000001"),  # source MAC of every frame built by eth()
}


# --- frame builders ------------------------------------------------------------------------


def eth(payload: bytes, ethertype: int = ETH_P_IP, tags: Sequence[tuple[int, int]] = ()) -> bytes:
    """Ethernet frame; `tags` are (TPID, TCI) pairs, outermost first."""
    head = bytes.fromhex("020000000002020000000001")
    head += b"".join(struct.pack("!HH", tpid, tci) for tpid, tci in tags)
    return head + struct.pack("!H", ethertype) + payload


def ip4(
    src: str,
    dst: str,
    proto: int,
    l4: bytes,
    *,
    ttl: int = 64,
    tos: int = 0,
    opts: bytes = b"",
    mf: bool = False,
    offset: int = 0,
) -> bytes:
    """IPv4 packet with a correct header and total length; `offset` in 8-byte units."""
    pkt = dpkt.ip.IP(
        src=socket.inet_aton(src),
        dst=socket.inet_aton(dst),
        p=proto,
        ttl=ttl,
        tos=tos,
        opts=opts,
        mf=int(mf),
        offset=offset,
        data=l4,
    )
    pkt.hl = 5 + len(opts) // 4
    pkt.len = len(pkt)
    return bytes(pkt)


def ip6(
    src: str, dst: str, nxt: int, payload: bytes, *, hlim: int = 64, tc: int = 0, flow: int = 0
) -> bytes:
    """IPv6 packet; `payload` holds any extension headers followed by the transport."""
    pkt = dpkt.ip6.IP6(
        src=socket.inet_pton(socket.AF_INET6, src),
        dst=socket.inet_pton(socket.AF_INET6, dst),
        nxt=nxt,
        hlim=hlim,
        fc=tc,
        flow=flow,
        data=payload,
    )
    pkt.plen = len(payload)
    return bytes(pkt)


def ext(nxt: int, units: int = 0) -> bytes:
    """Hop-by-hop/routing/destination-options header of (units + 1) * 8 bytes (Pad1 filled)."""
    return bytes([nxt, units]) + bytes(6 + 8 * units)


def frag(nxt: int, offset: int, more: bool) -> bytes:
    """IPv6 fragment header; `offset` in 8-byte units."""
    return struct.pack("!BBHI", nxt, 0, offset << 3 | int(more), 0xCAFE)


def ah(nxt: int) -> bytes:
    """IPv6 authentication header with a 12-byte ICV (24 bytes, payload length 4)."""
    return bytes([nxt, 4]) + bytes(22)


def tcp(sport: int, dport: int, flags: int, payload: bytes = b"") -> bytes:
    return bytes(dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, seq=1, data=payload))


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    seg = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    seg.ulen = len(seg)
    return bytes(seg)


def sctp(sport: int, dport: int) -> bytes:
    return bytes(dpkt.sctp.SCTP(sport=sport, dport=dport, vtag=7, chunks=[]))


def icmp_echo(kind: int, ident: int, seq: int = 1) -> bytes:
    echo = dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=b"ping")
    return bytes(dpkt.icmp.ICMP(type=kind, code=0, data=echo))


def icmp(kind: int, code: int, body: bytes = bytes(4)) -> bytes:
    return bytes(dpkt.icmp.ICMP(type=kind, code=code, data=body))


def icmp6_echo(kind: int, ident: int) -> bytes:
    echo = dpkt.icmp6.ICMP6.Echo(id=ident, seq=1, data=b"ping")
    return bytes(dpkt.icmp6.ICMP6(type=kind, code=0, data=echo))


def icmp6(kind: int, code: int = 0, body: bytes = bytes(20)) -> bytes:
    return bytes(dpkt.icmp6.ICMP6(type=kind, code=code, data=body))


# --- expected keys ---------------------------------------------------------------------------


class Key(NamedTuple):
    """A flow key as read from the table (addresses as the 16 raw key bytes)."""

    lo: bytes
    hi: bytes
    lo_port: int
    hi_port: int
    proto: int
    ip_ver: int
    ifindex: int


def addr(text: str) -> bytes:
    """Key form of an address: IPv4 in the first 4 bytes, the rest zero."""
    if ":" in text:
        return socket.inet_pton(socket.AF_INET6, text)
    return socket.inet_aton(text) + bytes(12)


def key(
    src: str, dst: str, sport: int, dport: int, proto: int, ifindex: int = LO_IFINDEX
) -> tuple[Key, int]:
    """The key of a packet src -> dst and its direction index, normalised as flow.c does.

    The endpoints are ordered by their four address words compared as native (little-endian)
    u32 values, then by port when the addresses are equal; ICMP keeps its port slots.
    Direction 0 means the packet goes lo -> hi.
    """
    s, d = addr(src), addr(dst)
    icmp_like = proto in (ICMP, ICMPV6)
    if s != d:
        swap = struct.unpack("<4I", s) > struct.unpack("<4I", d)
    else:
        swap = not icmp_like and sport > dport
    ver = 6 if ":" in src else 4
    if not swap:
        return Key(s, d, sport, dport, proto, ver, ifindex), 0
    if icmp_like:
        return Key(d, s, sport, dport, proto, ver, ifindex), 1
    return Key(d, s, dport, sport, proto, ver, ifindex), 1


def key_of(k: np.void) -> Key:
    """A key as the kernel wrote it (table or event), in the form of `key()`."""
    assert k["pad"] == 0
    return Key(
        k["lo_addr"].tobytes(),
        k["hi_addr"].tobytes(),
        int(k["lo_port"]),
        int(k["hi_port"]),
        int(k["proto"]),
        int(k["ip_ver"]),
        int(k["ifindex"]),
    )


def per_dir(dir_: int, forward: int, reverse: int = 0) -> list[int]:
    """A [dir0, dir1] pair from the values of the packet's direction and the other one."""
    return [reverse, forward] if dir_ else [forward, reverse]


# --- harness -------------------------------------------------------------------------------


def run_once(
    prog_fd: int, frame: bytes, ifindex: int = 0, egress: bool = False
) -> tuple[int, bytes]:
    """BPF_PROG_TEST_RUN once, returning (retval, data_out). An ingress run comes in on
    the device it is seen on (loopback when `ifindex` is 0), as at a real ingress hook."""
    run = bpfsys.prog_test_run(
        prog_fd,
        frame,
        ifindex=ifindex,
        want_data_out=True,
        ingress_ifindex=0 if egress else ifindex or LO_IFINDEX,
    )
    return run.retval, run.data_out


class Kernel:
    """The loaded program seen by one test: an empty flow table and counters from zero.

    `cached`: with the per-CPU flow cache on, as in a capture; the table is then read and
    emptied the way a poll does it (drained first, see engine/cache.py)."""

    def __init__(self, program: FlowProgram, cached: bool = False) -> None:
        self.program = program
        self.table = program.table
        assert program.cache is not None
        if cached:
            assert program.cache.enable()
        else:
            program.cache.disable()
        self._base: dict[str, int] = {}
        self.clear()

    def run(
        self, frame: bytes, *, egress: bool = False, l3: bool = False, ifindex: int = 0
    ) -> None:
        """Run one frame; the program must pass it on untouched."""
        retval, out = run_once(self.program.prog_fd(l3), frame, ifindex, egress)
        assert retval == TC_ACT_UNSPEC
        assert out == frame

    def flows(self) -> dict[Key, np.void]:
        """Every entry of the flow table by key."""
        with self.table.settled():
            keys, values = self.table.read()
        found = {}
        for k, v in zip(keys, values, strict=True):
            found[key_of(k)] = v
        return found

    def only_flow(self, expected: Key) -> np.void:
        """The stats of the single entry of the table, which must have key `expected`."""
        flows = self.flows()
        assert list(flows) == [expected]
        return flows[expected]

    def counters(self) -> dict[str, int]:
        """Counter increments since the test started."""
        now = self.program.counters()
        return {name: now[name] - self._base[name] for name in COUNTERS}

    def assert_counters(self, **expected: int) -> None:
        """Compare every counter; those not named must not have moved."""
        assert self.counters() == {name: expected.get(name, 0) for name in COUNTERS}

    def clear(self) -> None:
        """Empty the flow table and the event rings; restart the counters from zero."""
        with self.table.settled():
            keys, _ = self.table.read()
            self.table.take(np.arange(len(keys)))
        while self.table.sweep():  # long runs of DELETED slots take more than one
            pass
        assert self.table.occupancy()["deleted"] == 0
        self.program.events.read()
        self._base = self.program.counters()


def check(stats: np.void, **expected: Any) -> None:
    """Compare every non-time field with `expected` (defaults: a fresh entry; `meta_seen` is
    derived from the directions that saw packets) and sanity-check the timestamps."""
    want = {**FRESH, **expected}
    want.setdefault("meta_seen", sum(1 << d for d in (0, 1) if want["packets"][d]))
    got = {name: stats[name].tolist() for name in STATS_DTYPE.names if name not in TIMESTAMPS}
    assert got == want
    assert 0 < stats["first_ns"] <= stats["last_ns"]
    assert (stats["syn_ns"] != 0) == (want["syn_dir"] != DIR_NONE)
    assert (stats["synack_ns"] != 0) == (want["synack_dir"] != DIR_NONE)


@pytest.fixture(scope="module")
def program() -> Iterator[FlowProgram]:
    """One compiled and loaded flow program for the whole module."""
    prog = FlowProgram(CAPACITY)
    try:
        yield prog
    finally:
        prog.close()


@pytest.fixture(params=["table", "cached"])
def kernel(program: FlowProgram, request: pytest.FixtureRequest) -> Iterator[Kernel]:
    """The module's program with the table emptied before and after the test; every test
    runs without and with the flow cache, which must not change a single value."""
    harness = Kernel(program, cached=request.param == "cached")
    try:
        yield harness
    finally:
        harness.clear()


# --- IPv4 transports -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "server"),
    [
        ("10.0.0.2", "10.0.0.1"),  # client is the higher endpoint: its packets are dir 1
        ("10.0.0.1", "10.0.0.2"),
        ("10.0.0.2", "11.0.0.1"),  # words compare little-endian: 11.0.0.1 is lo
    ],
)
def test_tcp_connection_meets_in_one_entry(kernel: Kernel, client: str, server: str) -> None:
    def c2s(flags: int, data: bytes = b"") -> bytes:
        return ip4(client, server, TCP, tcp(40000, 80, flags, data), ttl=64, tos=0x10)

    def s2c(flags: int, data: bytes = b"") -> bytes:
        return ip4(server, client, TCP, tcp(80, 40000, flags, data), ttl=128)

    forward = [c2s(SYN), c2s(ACK), c2s(PSH | ACK, b"x" * 100), c2s(FIN | ACK)]
    reverse = [s2c(SYN | ACK), s2c(PSH | ACK, b"y" * 500), s2c(FIN | ACK)]
    order = (forward[0], reverse[0], forward[1], forward[2], reverse[1], forward[3], reverse[2])
    for pkt in order:
        kernel.run(eth(pkt))

    fkey, d = key(client, server, 40000, 80, TCP)
    assert key(server, client, 80, 40000, TCP) == (fkey, 1 - d)
    check(
        kernel.only_flow(fkey),
        packets=per_dir(d, len(forward), len(reverse)),
        bytes=per_dir(d, sum(map(len, forward)), sum(map(len, reverse))),
        tcp_flags=per_dir(d, SYN | ACK | PSH | FIN, SYN | ACK | PSH | FIN),
        first_dir=d,
        syn_dir=d,
        synack_dir=1 - d,
        ttl=per_dir(d, 64, 128),
        tos=per_dir(d, 0x10, 0),
    )
    kernel.assert_counters(packets=7, new_flows=1)


def test_handshake_directions_and_times(kernel: Kernel) -> None:
    syn = ip4("10.0.0.2", "10.0.0.1", TCP, tcp(40000, 80, SYN | ECE | CWR))  # ECN setup SYN
    synack = ip4("10.0.0.1", "10.0.0.2", TCP, tcp(80, 40000, SYN | ACK | ECE))
    fkey, d = key("10.0.0.2", "10.0.0.1", 40000, 80, TCP)
    kernel.run(eth(syn))
    kernel.run(eth(synack))
    before = kernel.only_flow(fkey)
    assert 0 < before["syn_ns"] < before["synack_ns"]
    for pkt in (syn, synack):  # retransmissions keep the first times
        kernel.run(eth(pkt))
    stats = kernel.only_flow(fkey)
    check(
        stats,
        packets=[2, 2],
        bytes=[80, 80],
        tcp_flags=per_dir(d, SYN | ECE | CWR, SYN | ACK | ECE),
        first_dir=d,
        syn_dir=d,
        synack_dir=1 - d,
        ttl=[64, 64],
    )
    for field in ("first_ns", "syn_ns", "synack_ns"):
        assert stats[field] == before[field]
    assert stats["last_ns"] >= before["last_ns"]


def test_table_times_read_as_monotonic_ns(kernel: Kernel) -> None:
    """first/last-seen are jiffies in the kernel; the table hands them out as
    CLOCK_MONOTONIC ns no later than the packet and at most one tick earlier, plus the
    tick interrupt's own delay: a packet after an edge still sees the old jiffy until the
    interrupt comes (up to 2 ms late, measured on a 2-vCPU VM with three busy loops).
    Half a tick is allowed, so a conversion a tick late always fails."""
    clock = kernel.program.clock
    assert clock is not None
    assert clock.tick_ns in (1_000_000, 3_333_333, 4_000_000, 10_000_000)  # HZ 1000/300/250/100
    if ticks_aligned():  # the edge is known exactly
        assert (clock.window_ns, clock.edge_ns % clock.tick_ns) == (0, 0)
    early = clock.tick_ns + clock.tick_ns // 2 + clock.window_ns
    syn = eth(ip4("10.0.0.2", "10.0.0.1", TCP, tcp(40000, 80, SYN)))
    fkey, _ = key("10.0.0.2", "10.0.0.1", 40000, 80, TCP)
    spans = []
    for _ in range(2):
        start = time.monotonic_ns()
        kernel.run(syn)
        spans.append((start, time.monotonic_ns()))
        time.sleep(3 * clock.tick_ns / 1e9)  # the second packet lands in a later tick
    stats = kernel.only_flow(fkey)
    (a0, b0), (a1, b1) = spans
    assert a0 - early <= int(stats["first_ns"]) <= b0
    assert a1 - early <= int(stats["last_ns"]) <= b1
    assert a0 <= int(stats["syn_ns"]) <= b0  # the precise clock, for the handshake RTT
    assert int(stats["first_ns"]) <= int(stats["syn_ns"])


def test_synack_without_syn_names_the_server(kernel: Kernel) -> None:
    kernel.run(eth(ip4("10.0.0.1", "10.0.0.2", TCP, tcp(80, 40000, SYN | ACK))))
    kernel.run(eth(ip4("10.0.0.2", "10.0.0.1", TCP, tcp(40000, 80, RST))))
    fkey, d = key("10.0.0.1", "10.0.0.2", 80, 40000, TCP)
    check(
        kernel.only_flow(fkey),
        packets=[1, 1],
        bytes=[40, 40],
        tcp_flags=per_dir(d, SYN | ACK, RST),
        first_dir=d,
        synack_dir=d,
        ttl=[64, 64],
    )


def test_udp_keeps_first_packet_metadata_per_direction(kernel: Kernel) -> None:
    ask = [ip4("10.1.1.1", "10.9.9.9", UDP, udp(5353, 53, b"q" * 30), ttl=63, tos=0xB8)]
    ask.append(ip4("10.1.1.1", "10.9.9.9", UDP, udp(5353, 53, b"q"), ttl=10, tos=0x01))
    answer = ip4("10.9.9.9", "10.1.1.1", UDP, udp(53, 5353, b"a" * 90), ttl=250, tos=0x02)
    for pkt in (ask[0], answer, ask[1]):
        kernel.run(eth(pkt))
    fkey, d = key("10.1.1.1", "10.9.9.9", 5353, 53, UDP)
    check(
        kernel.only_flow(fkey),
        packets=per_dir(d, 2, 1),
        bytes=per_dir(d, len(ask[0]) + len(ask[1]), len(answer)),
        first_dir=d,
        ttl=per_dir(d, 63, 250),
        tos=per_dir(d, 0xB8, 0x02),
    )
    kernel.assert_counters(packets=3, new_flows=1)


@pytest.mark.parametrize(
    ("proto", "l4"),
    [(SCTP, sctp(5000, 38412)), (UDPLITE, udp(7000, 7001)), (UDP, udp(7000, 7001))],
    ids=["sctp", "udplite", "udp"],
)
def test_port_protocols(kernel: Kernel, proto: int, l4: bytes) -> None:
    pkt = ip4("192.168.1.10", "192.168.1.20", proto, l4)
    kernel.run(eth(pkt))
    sport, dport = struct.unpack_from("!HH", l4)
    fkey, d = key("192.168.1.10", "192.168.1.20", sport, dport, proto)
    check(
        kernel.only_flow(fkey),
        packets=per_dir(d, 1),
        bytes=per_dir(d, len(pkt)),
        first_dir=d,
        ttl=per_dir(d, 64),
    )


@pytest.mark.parametrize(("proto", "payload"), [(GRE, bytes(8)), (ESP, bytes(24))])
def test_portless_protocols(kernel: Kernel, proto: int, payload: bytes) -> None:
    pkts = [ip4("10.0.0.1", "10.0.0.2", proto, payload), ip4("10.0.0.2", "10.0.0.1", proto, b"")]
    for pkt in pkts:
        kernel.run(eth(pkt))
    fkey, _ = key("10.0.0.1", "10.0.0.2", 0, 0, proto)
    check(kernel.only_flow(fkey), packets=[1, 1], bytes=[len(pkts[0]), len(pkts[1])], ttl=[64, 64])


def test_ipv6_transport_over_ipv6_esp_has_no_ports(kernel: Kernel) -> None:
    pkt = ip6("2001:db8::1", "2001:db8::2", ESP, bytes(32))
    kernel.run(eth(pkt, ETH_P_IPV6))
    check(
        kernel.only_flow(key("2001:db8::1", "2001:db8::2", 0, 0, ESP)[0]),
        packets=[1, 0],
        bytes=[72, 0],
        ttl=[64, 0],
    )


def test_same_address_orders_by_port(kernel: Kernel) -> None:
    kernel.run(eth(ip4("127.0.0.1", "127.0.0.1", TCP, tcp(50000, 8080, SYN))))
    kernel.run(eth(ip4("127.0.0.1", "127.0.0.1", TCP, tcp(8080, 50000, SYN | ACK))))
    lo = addr("127.0.0.1")
    check(
        kernel.only_flow(Key(lo, lo, 8080, 50000, TCP, 4, LO_IFINDEX)),
        packets=[1, 1],
        bytes=[40, 40],
        tcp_flags=[SYN | ACK, SYN],
        first_dir=1,
        syn_dir=1,
        synack_dir=0,
        ttl=[64, 64],
    )


# --- ICMP ----------------------------------------------------------------------------------


def test_icmp_echo_sessions_keyed_by_identifier(kernel: Kernel) -> None:
    for ident in (0x1234, 0x0042):
        kernel.run(eth(ip4("10.0.0.9", "10.0.0.1", ICMP, icmp_echo(8, ident), ttl=64)))
        kernel.run(eth(ip4("10.0.0.1", "10.0.0.9", ICMP, icmp_echo(0, ident), ttl=255)))
    kernel.run(eth(ip4("10.0.0.9", "10.0.0.1", ICMP, icmp_echo(8, 0x1234, seq=2), ttl=64)))
    flows = kernel.flows()
    assert len(flows) == 2
    for ident, requests in ((0x1234, 2), (0x0042, 1)):
        fkey, d = key("10.0.0.9", "10.0.0.1", ident, ident, ICMP)
        check(
            flows[fkey],
            packets=per_dir(d, requests, 1),
            bytes=per_dir(d, 32 * requests, 32),
            first_dir=d,
            ttl=per_dir(d, 64, 255),
            icmp_type=per_dir(d, 8, 0),
        )
    kernel.assert_counters(packets=5, new_flows=2)


def test_icmp_errors_keyed_by_type_and_code(kernel: Kernel) -> None:
    quoted = ip4("10.0.0.1", "10.0.0.2", UDP, udp(40000, 33434))[:28]
    port_unreach = ip4("10.0.0.2", "10.0.0.1", ICMP, icmp(3, 3, bytes(4) + quoted))
    host_unreach = ip4("10.0.0.2", "10.0.0.1", ICMP, icmp(3, 1, bytes(4) + quoted))
    for pkt in (port_unreach, port_unreach, host_unreach):
        kernel.run(eth(pkt))
    flows = kernel.flows()
    assert len(flows) == 2
    for code, n in ((3, 2), (1, 1)):
        fkey, d = key("10.0.0.2", "10.0.0.1", 3, code, ICMP)
        check(
            flows[fkey],
            packets=per_dir(d, n),
            bytes=per_dir(d, n * len(port_unreach)),
            first_dir=d,
            ttl=per_dir(d, 64),
            icmp_type=per_dir(d, 3),
            icmp_code=per_dir(d, code),
        )


def test_icmp_timestamp_request_and_reply_meet(kernel: Kernel) -> None:
    request = ip4("10.0.0.5", "10.0.0.6", ICMP, icmp(13, 0, bytes(16)))
    reply = ip4("10.0.0.6", "10.0.0.5", ICMP, icmp(14, 0, bytes(16)))
    kernel.run(eth(request))
    kernel.run(eth(reply))
    fkey, d = key("10.0.0.5", "10.0.0.6", 13, 0, ICMP)
    check(
        kernel.only_flow(fkey),
        packets=[1, 1],
        bytes=[40, 40],
        first_dir=d,
        ttl=[64, 64],
        icmp_type=per_dir(d, 13, 14),
    )


def test_icmpv6_echo_meets_and_neighbour_discovery_pairs(kernel: Kernel) -> None:
    a, b = "fe80::1", "fe80::2"
    kernel.run(eth(ip6(a, b, ICMPV6, icmp6_echo(128, 77)), ETH_P_IPV6))
    kernel.run(eth(ip6(b, a, ICMPV6, icmp6_echo(129, 77), hlim=255), ETH_P_IPV6))
    kernel.run(eth(ip6(a, b, ICMPV6, icmp6(135), hlim=255), ETH_P_IPV6))
    kernel.run(eth(ip6(b, a, ICMPV6, icmp6(136), hlim=255), ETH_P_IPV6))
    flows = kernel.flows()
    assert len(flows) == 2
    echo_key, d = key(a, b, 77, 77, ICMPV6)
    check(
        flows[echo_key],
        packets=[1, 1],
        bytes=[52, 52],
        first_dir=d,
        ttl=per_dir(d, 64, 255),
        icmp_type=per_dir(d, 128, 129),
    )
    nd_key, d = key(a, b, 135, 0, ICMPV6)
    check(
        flows[nd_key],
        packets=[1, 1],
        bytes=[64, 64],
        first_dir=d,
        ttl=[255, 255],
        icmp_type=per_dir(d, 135, 136),
    )


# --- IPv6 ----------------------------------------------------------------------------------


def test_ipv6_tcp_and_udp(kernel: Kernel) -> None:
    a, b = "2001:db8::a", "2001:db8:1::b"
    syn = ip6(a, b, TCP, tcp(33000, 443, SYN), tc=0xB9, flow=0xABCDE)
    synack = ip6(b, a, TCP, tcp(443, 33000, SYN | ACK, b"z" * 10), hlim=55, flow=0x12345)
    query = ip6(a, b, UDP, udp(40001, 53, b"q" * 20), hlim=1)
    for pkt in (syn, synack, query):
        kernel.run(eth(pkt, ETH_P_IPV6))
    flows = kernel.flows()
    assert len(flows) == 2
    tkey, d = key(a, b, 33000, 443, TCP)
    check(
        flows[tkey],
        packets=[1, 1],
        bytes=per_dir(d, 60, 70),
        tcp_flags=per_dir(d, SYN, SYN | ACK),
        first_dir=d,
        syn_dir=d,
        synack_dir=1 - d,
        ttl=per_dir(d, 64, 55),
        tos=per_dir(d, 0xB9, 0),
        flow_label=per_dir(d, 0xABCDE, 0x12345),
    )
    ukey, d = key(a, b, 40001, 53, UDP)
    check(flows[ukey], packets=per_dir(d, 1), bytes=per_dir(d, 68), first_dir=d, ttl=per_dir(d, 1))


@pytest.mark.parametrize(
    "chain",
    [
        [(HOPOPTS, 0)],
        [(HOPOPTS, 0), (ROUTING, 1), (DSTOPTS, 2)],
        [(HOPOPTS, 1), (DSTOPTS, 0), (ROUTING, 0), (AH, 0)],  # exactly the walk limit (4)
    ],
    ids=["hbh", "hbh-rt-dst", "four-with-ah"],
)
def test_ipv6_extension_headers_before_tcp(kernel: Kernel, chain: list[tuple[int, int]]) -> None:
    kinds = [kind for kind, _ in chain] + [TCP]
    payload = b"".join(
        ah(kinds[i + 1]) if kind == AH else ext(kinds[i + 1], units)
        for i, (kind, units) in enumerate(chain)
    )
    pkt = ip6("2001:db8::1", "2001:db8::2", chain[0][0], payload + tcp(1234, 22, SYN))
    kernel.run(eth(pkt, ETH_P_IPV6))
    check(
        kernel.only_flow(key("2001:db8::1", "2001:db8::2", 1234, 22, TCP)[0]),
        packets=[1, 0],
        bytes=[len(pkt), 0],
        tcp_flags=[SYN, 0],
        syn_dir=0,
        ttl=[64, 0],
    )
    kernel.assert_counters(packets=1, new_flows=1)


def test_ipv6_fragments(kernel: Kernel) -> None:
    a, b = "2001:db8::1", "2001:db8::2"
    first = ip6(a, b, FRAGMENT, frag(UDP, 0, more=True) + udp(5000, 6000, b"d" * 1000)[:256])
    later = ip6(a, b, FRAGMENT, frag(UDP, 33, more=False) + b"d" * 100)
    kernel.run(eth(first, ETH_P_IPV6))
    kernel.run(eth(later, ETH_P_IPV6))
    flows = kernel.flows()
    assert len(flows) == 2
    check(flows[key(a, b, 5000, 6000, UDP)[0]], packets=[1, 0], bytes=[304, 0], ttl=[64, 0])
    check(
        flows[key(a, b, 0, 0, UDP)[0]],
        packets=[1, 0],
        bytes=[148, 0],
        ttl=[64, 0],
        flags=FLOW_F_FRAGMENT,
    )
    kernel.assert_counters(packets=2, new_flows=2, fragment=1)


def test_ipv6_non_first_fragment_stops_the_header_walk(kernel: Kernel) -> None:
    # A destination-options header may follow the fragment header (RFC 8200 4.1); in a
    # non-first fragment, the bytes after the fragment header are payload, not a header.
    later = ip6("2001:db8::1", "2001:db8::2", FRAGMENT, frag(DSTOPTS, 33, False) + b"\x06\xff" * 8)
    kernel.run(eth(later, ETH_P_IPV6))
    check(
        kernel.only_flow(key("2001:db8::1", "2001:db8::2", 0, 0, DSTOPTS)[0]),
        packets=[1, 0],
        bytes=[len(later), 0],
        ttl=[64, 0],
        flags=FLOW_F_FRAGMENT,
    )
    kernel.assert_counters(packets=1, new_flows=1, fragment=1)


def test_ipv6_more_extension_headers_than_walked(kernel: Kernel) -> None:
    chain = ext(DSTOPTS) + ext(ROUTING) + ext(DSTOPTS) + ext(DSTOPTS) + ext(TCP)
    pkt = ip6("2001:db8::1", "2001:db8::2", HOPOPTS, chain + tcp(1234, 22, SYN))
    kernel.run(eth(pkt, ETH_P_IPV6))
    # The walk stops at the fifth header: it becomes the protocol, without ports.
    check(
        kernel.only_flow(key("2001:db8::1", "2001:db8::2", 0, 0, DSTOPTS)[0]),
        packets=[1, 0],
        bytes=[len(pkt), 0],
        ttl=[64, 0],
    )
    kernel.assert_counters(packets=1, new_flows=1, ipv6_ext_limit=1)


# --- IPv4 header variants ------------------------------------------------------------------


@pytest.mark.parametrize("opt_words", [1, 10], ids=["ihl6", "ihl15"])
def test_ipv4_options(kernel: Kernel, opt_words: int) -> None:
    opts = b"\x01" * (4 * opt_words - 1) + b"\x00"  # NOPs, end of list
    pkt = ip4("10.0.0.1", "10.0.0.2", UDP, udp(1111, 2222, b"p" * 5), opts=opts)
    kernel.run(eth(pkt))
    check(
        kernel.only_flow(key("10.0.0.1", "10.0.0.2", 1111, 2222, UDP)[0]),
        packets=[1, 0],
        bytes=[20 + 4 * opt_words + 13, 0],
        ttl=[64, 0],
    )


def test_ipv4_fragments(kernel: Kernel) -> None:
    first = ip4("10.0.0.1", "10.0.0.2", TCP, tcp(40000, 80, ACK, b"a" * 60), mf=True)
    middle = ip4("10.0.0.1", "10.0.0.2", TCP, b"b" * 80, mf=True, offset=10)
    last = ip4("10.0.0.1", "10.0.0.2", TCP, b"c" * 8, offset=20)
    for pkt in (first, middle, last):
        kernel.run(eth(pkt))
    flows = kernel.flows()
    assert len(flows) == 2
    check(
        flows[key("10.0.0.1", "10.0.0.2", 40000, 80, TCP)[0]],
        packets=[1, 0],
        bytes=[100, 0],
        tcp_flags=[ACK, 0],
        ttl=[64, 0],
    )
    check(
        flows[key("10.0.0.1", "10.0.0.2", 0, 0, TCP)[0]],
        packets=[2, 0],
        bytes=[128, 0],
        ttl=[64, 0],
        flags=FLOW_F_FRAGMENT,
    )
    kernel.assert_counters(packets=3, new_flows=2, fragment=2)


@pytest.mark.parametrize(
    ("src", "dst", "trailer"),
    [("10.0.0.1", "10.0.0.2", 6), ("2001:db8::1", "2001:db8::2", 9)],
    ids=["ipv4-padded-to-60", "ipv6-trailer"],
)
def test_bytes_count_the_ip_length_not_the_frame(
    kernel: Kernel, src: str, dst: str, trailer: int
) -> None:
    pkt = ip6(src, dst, TCP, tcp(1, 2, SYN)) if ":" in src else ip4(src, dst, TCP, tcp(1, 2, SYN))
    frame = eth(pkt, ETH_P_IPV6 if ":" in src else ETH_P_IP) + bytes(trailer)
    kernel.run(frame)
    check(
        kernel.only_flow(key(src, dst, 1, 2, TCP)[0]),
        packets=[1, 0],
        bytes=[len(pkt), 0],
        tcp_flags=[SYN, 0],
        syn_dir=0,
        ttl=[64, 0],
    )


# --- link layer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "vlan_id"),
    [
        ([(ETH_P_8021Q, 0x2000 | 100)], 100),  # PCP 1 is not part of the id
        ([(ETH_P_8021AD, 200), (ETH_P_8021Q, 100)], 200),
        ([(ETH_P_8021Q, 4094), (ETH_P_8021Q, 5)], 4094),
    ],
    ids=["dot1q", "qinq-8021ad", "double-8021q"],
)
def test_vlan_tags(kernel: Kernel, tags: list[tuple[int, int]], vlan_id: int) -> None:
    pkt = ip4("10.0.0.1", "10.0.0.2", UDP, udp(1000, 2000, b"v" * 3))
    kernel.run(eth(pkt, tags=tags))
    check(
        kernel.only_flow(key("10.0.0.1", "10.0.0.2", 1000, 2000, UDP)[0]),
        packets=[1, 0],
        bytes=[len(pkt), 0],
        ttl=[64, 0],
        vlan_id=vlan_id,
    )


@pytest.mark.parametrize(
    "frame",
    [
        eth(bytes(dpkt.arp.ARP()), ETH_P_ARP),
        eth(bytes(30), ETH_P_LLDP),
        eth(bytes(28), 46),  # 802.3 length field
        eth(bytes(28), tags=[(ETH_P_8021Q, 7)], ethertype=ETH_P_ARP),
    ],
    ids=["arp", "lldp", "802.3", "vlan-arp"],
)
def test_non_ip_frames_make_no_flow(kernel: Kernel, frame: bytes) -> None:
    kernel.run(frame)
    assert kernel.flows() == {}
    kernel.assert_counters(packets=1, non_ip=1)


V4 = ip4("10.0.0.1", "10.0.0.2", TCP, tcp(1, 2, SYN))
V6 = ip6("2001:db8::1", "2001:db8::2", TCP, tcp(1, 2, SYN))


@pytest.mark.parametrize(
    "frame",
    [
        eth(b"\x00\x64", ETH_P_8021Q),
        eth(V4[:19], tags=[(ETH_P_8021Q, 1)]),  # tagged: see the module docstring
        eth(b"\x44" + V4[1:]),  # IHL 4: shorter than the fixed header
        eth(b"\x4f" + V4[1:]),  # IHL 15: options beyond the packet
        eth(V4[:33]),  # TCP: up to the flags byte is needed
        eth(ip4("10.0.0.1", "10.0.0.2", UDP, udp(1, 2))[:23]),
        eth(ip4("10.0.0.1", "10.0.0.2", SCTP, sctp(1, 2))[:23]),
        eth(ip4("10.0.0.1", "10.0.0.2", ICMP, icmp_echo(8, 1))[:27]),
        eth(V6[:39], ETH_P_IPV6, [(ETH_P_8021Q, 1)]),
        eth(V6[:53], ETH_P_IPV6),
        eth(ip6("2001:db8::1", "2001:db8::2", HOPOPTS, ext(TCP))[:47], ETH_P_IPV6),
        eth(ip6("2001:db8::1", "2001:db8::2", HOPOPTS, ext(TCP, 3) + tcp(1, 2, SYN)), ETH_P_IPV6)[
            :72
        ],
        eth(ip6("2001:db8::1", "2001:db8::2", ICMPV6, icmp6_echo(128, 1))[:47], ETH_P_IPV6),
    ],
    ids=[
        "vlan-tag",
        "ipv4-header",
        "ipv4-ihl-4",
        "ipv4-options",
        "tcp-header",
        "udp-header",
        "sctp-header",
        "icmp-header",
        "ipv6-header",
        "ipv6-tcp-header",
        "ipv6-ext-header",
        "ipv6-ext-length",
        "icmpv6-header",
    ],
)
def test_truncated_frames_make_no_flow(kernel: Kernel, frame: bytes) -> None:
    kernel.run(frame)
    assert kernel.flows() == {}
    kernel.assert_counters(packets=1, truncated=1)


def test_frames_shorter_than_ethernet_are_refused_by_test_run(program: FlowProgram) -> None:
    """The program's own Ethernet truncation branch is unreachable through test_run."""
    with pytest.raises(OSError) as info:
        run_once(program.prog_fd(False), bytes(13))
    assert info.value.errno == errno.EINVAL


# --- entry points and interfaces -----------------------------------------------------------


def test_egress_records_first_hook(kernel: Kernel) -> None:
    kernel.run(eth(ip4("10.0.0.1", "10.0.0.2", UDP, udp(1, 2))), egress=True)
    kernel.run(eth(ip4("10.0.0.2", "10.0.0.1", UDP, udp(2, 1))))
    kernel.run(eth(ip4("10.0.0.3", "10.0.0.4", UDP, udp(1, 2))))
    flows = kernel.flows()
    check(
        flows[key("10.0.0.1", "10.0.0.2", 1, 2, UDP)[0]],
        packets=[1, 1],
        bytes=[28, 28],
        ttl=[64, 64],
        first_hook=HOOK_EGRESS,
    )
    check(
        flows[key("10.0.0.3", "10.0.0.4", 1, 2, UDP)[0]], packets=[1, 0], bytes=[28, 0], ttl=[64, 0]
    )


def test_forwarded_packet_at_egress_is_egress(kernel: Kernel, program: FlowProgram) -> None:
    # Came in on another device (forwarded): the hook is still egress.
    frame = eth(ip4("10.0.0.1", "10.0.0.2", UDP, udp(1, 2)))
    bpfsys.prog_test_run(program.prog_fd(False), frame, ingress_ifindex=LO_IFINDEX + 1)
    check(
        kernel.flows()[key("10.0.0.1", "10.0.0.2", 1, 2, UDP)[0]],
        packets=[1, 0],
        bytes=[28, 0],
        ttl=[64, 0],
        first_hook=HOOK_EGRESS,
    )


# Run inside a test namespace: the flow program attached to IFNAME (TCX or tc: MODE).
ATTACHED = """
import json, socket, struct, sys
from mermin_cli.discovery.interfaces import list_interfaces
from mermin_cli.engine.attach import Attacher
from mermin_cli.engine.program import FlowProgram
from mermin_cli.flows.tracker import first_of_event, first_of_stats
program = FlowProgram(1024)
attacher = Attacher(program, "MODE")
attacher.attach(next(i for i in list_interfaces() if i.name == "IFNAME"))
"""
HOOKS_LIVE = (
    ATTACHED
    + """
print("ready", flush=True)
sys.stdin.readline()
keys, values = program.table.read()
udp = [(k, v) for k, v in zip(keys, values) if k["proto"] == 17]
ports = [{int(k["lo_port"]), int(k["hi_port"])} & {7001, 7002} for k, _ in udp]
print(json.dumps(sorted([min(p), int(v["first_hook"])] for p, (_, v) in zip(ports, udp))))
attacher.close()
"""
)


@pytest.mark.parametrize("mode", ["tcx", "tc"])
def test_one_program_tells_the_hooks_apart_live(link: netns.Link, mode: str) -> None:
    """Both hooks run the same program; a flow first seen leaving is egress, one first seen
    arriving is ingress, on a real veth."""
    a, b = link.a, link.b
    code = HOOKS_LIVE.replace("MODE", mode).replace("IFNAME", a.ifname)
    proc = a.popen(netns.venv_python(), "-c", code, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        send = "import socket as s; s.socket(s.AF_INET, s.SOCK_DGRAM).sendto(b'x', ('{}', {}))"
        a.exec_python(send.format(b.ip4, 7001))  # leaves a: egress first
        b.exec_python(send.format(a.ip4, 7002))  # arrives at a: ingress first
        proc.stdin.write("\n")
        proc.stdin.flush()
        seen = json.loads(proc.stdout.readline())
    finally:
        proc.communicate(timeout=30)
    assert seen == [[7001, HOOK_EGRESS], [7002, 0]]  # [server port, first_hook]


NON_LINEAR = (
    ATTACHED
    + """
# PACKET_VNET_HDR with hdr_len 14: the kernel puts only the Ethernet header in the linear
# area and the rest of a frame of a page or more in page fragments (packet_snd).
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
sock.bind(("IFNAME", 0))
sock.send(struct.pack("<BBHHHH", 0, 0, 14, 0, 0, 0) + bytes.fromhex("FRAME"))
keys, values = program.table.read()
print(json.dumps({"flows": [[int(k["lo_port"]), int(k["hi_port"]), v["packets"].tolist(),
                             v["bytes"].tolist()] for k, v in zip(keys, values)],
                  "counters": program.counters()}))
attacher.close()
"""
)


def test_headers_beyond_the_linear_area_are_pulled_in_live(link: netns.Link) -> None:
    """A frame whose IP header is not in the skb's linear area (only the Ethernet header
    is) is pulled in and parsed again: counted in full, nothing reported truncated."""
    a, b = link.a, link.b
    for host in (a, b):
        host.run("ip", "link", "set", "dev", host.ifname, "mtu", "9000")
    frame = eth(ip4(a.ip4, b.ip4, UDP, udp(4000, 4001, bytes(6000))))
    code = NON_LINEAR.replace("MODE", "tcx").replace("IFNAME", a.ifname)
    seen = json.loads(a.exec_python(code.replace("FRAME", frame.hex())))
    assert seen["flows"] == [[4000, 4001, [1, 0], [6028, 0]]]
    assert seen["counters"]["truncated"] == 0 and seen["counters"]["packets"] == 1


@pytest.mark.parametrize("egress", [False, True], ids=["ingress", "egress"])
def test_l3_entry_points_parse_from_offset_zero(kernel: Kernel, egress: bool) -> None:
    v4 = ip4("8.0.0.1", "10.0.0.1", UDP, udp(4000, 53, b"l3" * 10))
    v6 = ip6("2001:db8:86dd::1", "2001:db8::2", TCP, tcp(4000, 443, SYN))
    kernel.run(v4, l3=True, egress=egress)
    kernel.run(v6, l3=True, egress=egress)
    flows = kernel.flows()
    assert len(flows) == 2
    hook = HOOK_EGRESS if egress else 0
    fkey, d = key("8.0.0.1", "10.0.0.1", 4000, 53, UDP)
    check(
        flows[fkey],
        packets=per_dir(d, 1),
        bytes=per_dir(d, len(v4)),
        first_dir=d,
        ttl=per_dir(d, 64),
        first_hook=hook,
        mac=bytes(6),  # no Ethernet header on an L3 device
    )
    fkey, d = key("2001:db8:86dd::1", "2001:db8::2", 4000, 443, TCP)
    check(
        flows[fkey],
        packets=per_dir(d, 1),
        bytes=per_dir(d, 60),
        tcp_flags=per_dir(d, SYN),
        first_dir=d,
        syn_dir=d,
        ttl=per_dir(d, 64),
        first_hook=hook,
        mac=bytes(6),
    )


def test_l3_entry_point_uses_skb_protocol(kernel: Kernel) -> None:
    # Bytes 12-13 of this packet (its source address 10.0.x.x) read as EtherType 0x0a00:
    # test_run sets skb->protocol from them, so the L3 program sees a non-IP packet.
    kernel.run(ip4("10.0.0.1", "10.0.0.2", UDP, udp(1, 2)), l3=True)
    assert kernel.flows() == {}
    kernel.assert_counters(packets=1, non_ip=1)


def _in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call `fn` on a short-lived thread that has joined network namespace `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns failed")
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def test_ifindex_comes_from_the_device(kernel: Kernel, link: netns.Link) -> None:
    pkt = ip4("10.0.0.1", "10.0.0.2", UDP, udp(1, 2))
    _in_netns(link.a.ns, lambda: kernel.run(eth(pkt), ifindex=link.a.ifindex))
    kernel.run(eth(pkt))
    flows = kernel.flows()
    assert {fkey.ifindex for fkey in flows} == {link.a.ifindex, LO_IFINDEX}
    assert link.a.ifindex != LO_IFINDEX
    for ifindex in (link.a.ifindex, LO_IFINDEX):
        check(
            flows[key("10.0.0.1", "10.0.0.2", 1, 2, UDP, ifindex)[0]],
            packets=[1, 0],
            bytes=[28, 0],
            ttl=[64, 0],
        )
    kernel.assert_counters(packets=2, new_flows=2)


# --- per-CPU flow cache (engine/cache.py) ----------------------------------------------------


@pytest.fixture
def cached(program: FlowProgram) -> Iterator[Kernel]:
    """The module's program with the flow cache on."""
    harness = Kernel(program, cached=True)
    try:
        yield harness
    finally:
        harness.clear()


def undrained(kernel: Kernel, fkey: Key) -> np.void:
    """The entry as the table holds it now, slots not drained (a reader outside a poll)."""
    keys, values = kernel.table.read()
    found = [v for k, v in zip(keys, values, strict=True) if k["lo_addr"].tobytes() == fkey.lo]
    assert len(found) == 1
    return found[0]


def test_cache_holds_plain_packets_until_a_poll_drains_them(cached: Kernel) -> None:
    fwd = ip4("10.0.0.1", "10.0.0.2", UDP, udp(1000, 2000, b"x" * 100))
    rev = ip4("10.0.0.2", "10.0.0.1", UDP, udp(2000, 1000, b"y" * 10), ttl=30)
    fkey, d = key("10.0.0.1", "10.0.0.2", 1000, 2000, UDP)
    for pkt in [fwd] * 10 + [rev] * 4:
        cached.run(eth(pkt))
    # The first packet creates the entry and the second takes the slot; the reverse
    # direction's first packet goes to the table for its metadata, the rest are cached.
    before = undrained(cached, fkey)
    assert before["packets"].tolist() == per_dir(d, 2, 1)
    time.sleep(0.05)  # several ticks of the table clock
    cached.run(eth(fwd))
    assert undrained(cached, fkey)["last_ns"] == before["last_ns"]
    stats = cached.only_flow(fkey)
    check(
        stats,
        packets=per_dir(d, 11, 4),
        bytes=per_dir(d, 11 * len(fwd), 4 * len(rev)),
        ttl=per_dir(d, 64, 30),
    )
    assert stats["last_ns"] > before["last_ns"]
    cached.assert_counters(packets=15, new_flows=1)


def test_cache_leaves_syn_fin_and_rst_to_the_table(cached: Kernel) -> None:
    def c2s(flags: int) -> bytes:
        return eth(ip4("10.0.0.1", "10.0.0.2", TCP, tcp(40000, 80, flags, b"d")))

    fkey, d = key("10.0.0.1", "10.0.0.2", 40000, 80, TCP)
    for flags in (ACK, ACK, ACK | PSH | ECE, ACK):
        cached.run(c2s(flags))
    assert undrained(cached, fkey)["tcp_flags"].tolist() == per_dir(d, ACK)  # ECE: cached
    cached.run(c2s(FIN | ACK))
    raw = undrained(cached, fkey)
    assert raw["packets"].tolist() == per_dir(d, 3)
    assert raw["tcp_flags"].tolist() == per_dir(d, FIN | ACK)
    cached.run(c2s(SYN))
    assert undrained(cached, fkey)["syn_dir"] == d
    cached.run(c2s(RST))
    assert undrained(cached, fkey)["tcp_flags"].tolist() == per_dir(d, RST | SYN | FIN | ACK)
    check(
        cached.only_flow(fkey),
        packets=per_dir(d, 7),
        bytes=per_dir(d, 7 * 41),
        tcp_flags=per_dir(d, RST | SYN | FIN | PSH | ACK | ECE),
        syn_dir=d,
        ttl=[64, 0],
    )


def test_cache_slot_never_outlives_its_entry(cached: Kernel) -> None:
    pkt = eth(ip4("10.0.0.1", "10.0.0.2", UDP, udp(5, 6)))
    fkey, _ = key("10.0.0.1", "10.0.0.2", 5, 6, UDP)
    for _ in range(5):
        cached.run(pkt)
    with cached.table.settled():  # a poll closing the flow
        cached.table.read()
        (taken,) = cached.table.take([0])
        assert taken["packets"].tolist() == [5, 0]
    for _ in range(3):
        cached.run(pkt)
    # a new entry (create, then a hit that takes a fresh slot), not the old slot
    assert undrained(cached, fkey)["packets"].tolist() == [2, 0]
    check(cached.only_flow(fkey), packets=[3, 0], bytes=[84, 0], ttl=[64, 0])
    cached.assert_counters(packets=8, new_flows=2)


def test_cache_keeps_every_count_when_flows_share_slots(cached: Kernel) -> None:
    flows = 600  # far more than the 256 slots: most flows find theirs taken
    frames = [
        eth(ip4(f"10.1.{i // 250}.{i % 250 + 1}", "10.2.0.1", UDP, udp(1024 + i, 53, bytes(i % 7))))
        for i in range(flows)
    ]
    for _ in range(5):
        for frame in frames:
            cached.run(frame)
    found = cached.flows()
    assert len(found) == flows
    for i in range(flows):
        fkey, d = key(f"10.1.{i // 250}.{i % 250 + 1}", "10.2.0.1", 1024 + i, 53, UDP)
        assert found[fkey]["packets"].tolist() == per_dir(d, 5)
        assert found[fkey]["bytes"].tolist() == per_dir(d, 5 * (28 + i % 7))
    cached.assert_counters(packets=5 * flows, new_flows=flows)


def two_cpus() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    return cpus[:2]


def run_on(kernel: Kernel, cpu: int, frames: list[bytes]) -> None:
    """Run frames with this thread pinned to `cpu`, so that CPU's cache slots fill."""
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpu})
        for frame in frames:
            kernel.run(frame)
    finally:
        os.sched_setaffinity(0, allowed)


def test_cache_drains_every_cpu(cached: Kernel) -> None:
    pkt = eth(ip4("10.0.0.1", "10.0.0.2", UDP, udp(7, 8)))
    fkey, _ = key("10.0.0.1", "10.0.0.2", 7, 8, UDP)
    for cpu in two_cpus() * 2:
        run_on(cached, cpu, [pkt] * 5)
    # table: the first CPU's create and fill, the second CPU's fill; 17 packets cached
    assert undrained(cached, fkey)["packets"].tolist() == [3, 0]
    check(cached.only_flow(fkey), packets=[20, 0], bytes=[560, 0], ttl=[64, 0])
    cached.assert_counters(packets=20, new_flows=1)


def test_cache_counts_of_a_cpu_gone_offline_reach_the_table_once(
    cached: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU hot-unplug: no flush can run on an offline CPU, so its slots are read from user
    space and added by mermin_cache_absorb; when the CPU comes back its own flush must
    not add them again. Taking a CPU offline would disturb the whole host, so only the
    list of online CPUs is faked; slots, programs and table are real."""
    pkt = eth(ip4("10.0.0.1", "10.0.0.2", UDP, udp(11, 12)))
    fkey, _ = key("10.0.0.1", "10.0.0.2", 11, 12, UDP)
    first, second = two_cpus()
    online = cache.online_cpus()
    run_on(cached, first, [pkt] * 5)  # create, fill, 3 cached
    run_on(cached, second, [pkt] * 5)  # fill (a table hit), 4 cached
    assert undrained(cached, fkey)["packets"].tolist() == [3, 0]
    monkeypatch.setattr(cache, "online_cpus", lambda: online - {second})
    check(cached.only_flow(fkey), packets=[10, 0], bytes=[280, 0], ttl=[64, 0])
    check(cached.only_flow(fkey), packets=[10, 0], bytes=[280, 0], ttl=[64, 0])  # still off
    monkeypatch.undo()  # back online, its slot as it was
    check(cached.only_flow(fkey), packets=[10, 0], bytes=[280, 0], ttl=[64, 0])
    run_on(cached, second, [pkt] * 3)  # the slot is taken again (a table hit), 2 cached
    check(cached.only_flow(fkey), packets=[13, 0], bytes=[364, 0], ttl=[64, 0])
    cached.assert_counters(packets=13, new_flows=1)


def test_cache_absorbs_a_cpu_that_goes_offline_during_the_drain(
    cached: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online when the drain lists the CPUs, offline when it pins itself there: its slots
    are absorbed and the cache stays on. Faked: the online list and the refused pinning."""
    pkt = eth(ip4("10.0.0.1", "10.0.0.2", UDP, udp(13, 14)))
    fkey, _ = key("10.0.0.1", "10.0.0.2", 13, 14, UDP)
    second = two_cpus()[1]
    online = cache.online_cpus()
    run_on(cached, second, [pkt] * 6)  # create, fill, 4 cached
    lists = iter([online])
    monkeypatch.setattr(cache, "online_cpus", lambda: next(lists, online - {second}))
    pin = os.sched_setaffinity

    def refuse_second(pid: int, cpus: set[int]) -> None:
        if cpus == {second}:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        pin(pid, cpus)

    monkeypatch.setattr(cache.os, "sched_setaffinity", refuse_second)
    check(cached.only_flow(fkey), packets=[6, 0], bytes=[168, 0], ttl=[64, 0])
    monkeypatch.undo()
    assert cached.program.cache is not None and cached.program.cache.enabled
    check(cached.only_flow(fkey), packets=[6, 0], bytes=[168, 0], ttl=[64, 0])


def test_cache_absorbs_every_slot_of_an_offline_cpu(
    cached: Kernel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """More slots than one run of mermin_cache_absorb takes (ABSORB_MAX): all arrive."""
    flows = 100
    frames = [eth(ip4("10.3.0.1", f"10.4.0.{i + 1}", UDP, udp(2000, 53))) for i in range(flows)]
    second = two_cpus()[1]
    online = cache.online_cpus()
    run_on(cached, second, frames * 4)
    monkeypatch.setattr(cache, "online_cpus", lambda: online - {second})
    with caplog.at_level(logging.INFO, logger="mermin.engine"):
        found = cached.flows()
    assert {tuple(v["packets"].tolist()) for v in found.values()} == {(4, 0)}
    assert len(found) == flows
    absorbed = [r.getMessage() for r in caplog.records if "offline CPUs" in r.getMessage()]
    assert len(absorbed) == 1
    slots = int(absorbed[0].split()[2])  # "flow cache: N slots of offline CPUs [1] drained"
    assert cache.ABSORB_MAX < slots <= flows
    cached.assert_counters(packets=4 * flows, new_flows=flows)


def test_cache_slot_layout_matches_flow_c(program: FlowProgram) -> None:
    slot = program.bpf[b"flow_cache"].sLeaf  # Leaf: one per CPU
    assert ctypes.sizeof(slot) == cache.SLOT_SIZE
    assert slot.gen.offset == cache.SLOT_COUNTS_OFFSET
    assert slot.packets.offset == cache.SLOT_COUNTS_OFFSET + 8
    assert program.bpf[b"flow_cache"].max_entries == cache.CACHE_SLOTS


def test_array_read_returns_every_cpus_values_in_one_call(cached: Kernel) -> None:
    """bpfsys.array_read (one BPF_MAP_LOOKUP_BATCH) against a lookup per key."""
    frames = [eth(ip4("10.5.0.1", "10.5.0.2", UDP, udp(3000 + port, 99))) for port in range(20)]
    for cpu in two_cpus():
        run_on(cached, cpu, frames * 3)
    fd = cached.program.bpf[b"flow_cache"].map_fd
    row = cache.SLOT_SIZE * len(cache.possible_cpus())
    one_by_one = []
    for i in range(cache.CACHE_SLOTS):
        raw = bpfsys.map_lookup(fd, ctypes.create_string_buffer(struct.pack("<I", i), 4), row)
        assert raw is not None
        one_by_one.append(raw)
    assert bpfsys.array_read(fd, cache.CACHE_SLOTS, row) == b"".join(one_by_one)
    assert sum(1 for raw in one_by_one if any(raw)) >= 15  # slots in use: a real test


def test_cache_stays_off_when_a_cpu_is_outside_the_cpuset(program: FlowProgram) -> None:
    assert program.cache is not None
    program.cache.disable()
    first, second = two_cpus()
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {first})
        assert f"CPUs [{second}] are outside" in cache.unusable()
        assert not program.cache.enable()
        assert program.cache.off_reason == f"CPUs [{second}] are outside this process's cpuset"
    finally:
        os.sched_setaffinity(0, allowed)
    assert not program.cache.enabled
    assert cache.unusable() == ""


def test_cpu_lists_read_as_the_kernel_writes_them() -> None:
    assert cpus.parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert cpus.parse_cpu_list("0\n") == {0}
    assert cpus.online_cpus() >= os.sched_getaffinity(0)
    assert set(cpus.possible_cpus()) >= cpus.online_cpus()


def test_disabling_the_cache_drains_it(cached: Kernel) -> None:
    pkt = eth(ip4("10.0.0.1", "10.0.0.2", UDP, udp(9, 10)))
    fkey, _ = key("10.0.0.1", "10.0.0.2", 9, 10, UDP)
    for _ in range(6):
        cached.run(pkt)
    assert undrained(cached, fkey)["packets"].tolist() == [2, 0]
    assert cached.program.cache is not None
    cached.program.cache.disable()
    assert undrained(cached, fkey)["packets"].tolist() == [6, 0]
    cached.run(pkt)
    assert undrained(cached, fkey)["packets"].tolist() == [7, 0]


# --- new-flow event rings ----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_rings() -> Iterator[Kernel]:
    """A program whose rings hold 4 events per CPU (3 asked for, rounded up), so that
    full rings and wrap-around take a few frames."""
    prog = FlowProgram(CAPACITY, event_capacity=3)
    try:
        yield Kernel(prog)
    finally:
        prog.close()


def new_flows(count: int, first: int = 0) -> list[tuple[bytes, Key]]:
    """`count` UDP frames of distinct flows and their keys (the source port tells them
    apart)."""
    out = []
    for port in range(1000 + first, 1000 + first + count):
        frame = eth(ip4("10.0.0.1", "10.0.0.2", UDP, udp(port, 53)))
        out.append((frame, key("10.0.0.1", "10.0.0.2", port, 53, UDP)[0]))
    return out


def test_event_slots_round_up_to_a_power_of_two() -> None:
    assert [event_slots(n) for n in (1, 2, 3, 4, 5, 1024, 1025)] == [1, 2, 4, 4, 8, 1024, 2048]


def test_one_event_per_new_flow_with_its_first_packet(kernel: Kernel) -> None:
    flows = new_flows(5)
    for frame, _ in flows:
        for _ in range(3):  # later packets of a flow send nothing
            kernel.run(frame)
    events = kernel.program.events.read()
    assert [key_of(ev["key"]) for ev in events] == [k for _, k in flows]
    assert events["ip_len"].tolist() == [20 + 8] * 5
    table = kernel.flows()
    assert set(table) == {k for _, k in flows}
    # in ns, converted from jiffies by the same clock as the table's times
    assert events["ts"].tolist() == [int(table[k]["first_ns"]) for _, k in flows]
    assert len(kernel.program.events.read()) == 0  # read once
    kernel.assert_counters(packets=15, new_flows=5)


def test_events_carry_the_entries_first_packet_fields(kernel: Kernel) -> None:
    frames = [
        eth(ip4("10.0.0.1", "10.0.0.2", TCP, tcp(40000, 80, SYN))),  # SYN, dir 0
        eth(ip4("10.0.0.4", "10.0.0.3", TCP, tcp(80, 40001, SYN | ACK))),  # SYN-ACK, dir 1
        eth(ip4("10.0.0.6", "10.0.0.5", ICMP, icmp_echo(0, 7))),  # echo reply, dir 1
        eth(ip4("10.0.0.7", "10.0.0.8", ICMP, icmp(3, 3, bytes(4) + bytes(28)))),  # error
        eth(ip4("10.0.0.10", "10.0.0.9", UDP, udp(5353, 53))),  # dir 1
    ]
    for frame in frames:
        kernel.run(frame)
    events = kernel.program.events.read()
    table = kernel.flows()
    assert len(events) == len(frames) == len(table)
    for ev in events:
        stats = table[key_of(ev["key"])]
        assert first_of_event(ev) == first_of_stats(stats)
    firsts = [first_of_event(ev) for ev in events]
    assert [f.first_dir for f in firsts] == [0, 1, 1, 0, 1]
    assert (firsts[0].syn_dir, firsts[1].synack_dir) == (0, 1)
    assert [(f.icmp_type, f.icmp_code) for f in firsts[2:4]] == [(0, 0), (3, 3)]


def test_full_ring_drops_and_counts_and_recovers(small_rings: Kernel) -> None:
    cpu = two_cpus()[0]
    flows = new_flows(7)
    run_on(small_rings, cpu, [frame for frame, _ in flows[:6]])
    rings = small_rings.program.events
    assert rings.pending() == 4
    assert [key_of(ev["key"]) for ev in rings.read()] == [k for _, k in flows[:4]]
    small_rings.assert_counters(packets=6, new_flows=6, events_dropped=2)
    run_on(small_rings, cpu, [flows[6][0]])  # read: room again
    assert [key_of(ev["key"]) for ev in rings.read()] == [flows[6][1]]
    assert len(small_rings.flows()) == 7  # the table has every flow all the same
    small_rings.clear()


def test_rings_wrap_and_keep_each_cpus_order(small_rings: Kernel) -> None:
    first, second = two_cpus()
    rings = small_rings.program.events
    sent = 0
    for lap in range(6):  # 18 events on the first CPU's 4 slots, 12 on the second's
        on_first, on_second = new_flows(3, sent), new_flows(2, sent + 3)
        sent += 5
        run_on(small_rings, first, [frame for frame, _ in on_first])
        run_on(small_rings, second, [frame for frame, _ in on_second])
        assert rings.pending() == 5
        events = rings.read()
        expected = [k for _, k in on_first] + [k for _, k in on_second]
        if first > second:
            expected = expected[3:] + expected[:3]
        assert [key_of(ev["key"]) for ev in events] == expected, f"lap {lap}"
    small_rings.assert_counters(packets=30, new_flows=30)
    small_rings.clear()


def test_event_rings_are_what_flow_c_declares(program: FlowProgram) -> None:
    rings = program.events
    assert rings.cpus == max(cpus.possible_cpus()) + 1
    assert rings.slots == 1024
    assert ctypes.sizeof(program.bpf[b"event_slots"].Leaf) == EVENT_BYTES
    assert ctypes.sizeof(program.bpf[b"event_heads"].Leaf) == 64
    assert program.event_bytes == rings.cpus * 1024 * EVENT_BYTES


# --- the open-addressing flow table ---------------------------------------------------------


def key_row(k: Key) -> np.void:
    """A key in the kernel's layout."""
    row = np.zeros(1, dtype=KEY_DTYPE)[0]
    row["lo_addr"], row["hi_addr"] = k.lo, k.hi
    row["lo_port"], row["hi_port"] = k.lo_port, k.hi_port
    row["proto"], row["ip_ver"], row["ifindex"] = k.proto, k.ip_ver, k.ifindex
    return row


def home_of(k: Key) -> int:
    return ((flow_hash(key_row(k).tobytes()) >> 32) * flow_slots(CAPACITY)) >> 32


def full_slots(table: FlowTable) -> list[int]:
    """Indices of the table's FULL slots."""
    return [int(i) for i in np.flatnonzero(table.states() == SLOT_FULL)]


def take_keys(kernel: Kernel, *keys: Key) -> list[np.void]:
    """Delete these flows as a poll does (the sweep runs at the end of the block)."""
    with kernel.table.settled():
        found, _ = kernel.table.read()
        rows = [i for i, k in enumerate(found) if key_of(k) in keys]
        assert len(rows) == len(keys)
        return list(kernel.table.take(rows))


def test_user_space_finds_every_flow_where_the_kernel_put_it(kernel: Kernel) -> None:
    """lookup() probes from the home slot Python computes: a hash that differed from
    flow_hash() in flow.c would miss."""
    flows = new_flows(200)
    for frame, _ in flows:
        kernel.run(frame)
    for _, k in flows:
        stats = kernel.table.lookup(key_row(k))
        assert stats is not None and stats["packets"].tolist() == [1, 0]
    assert kernel.table.lookup(key_row(new_flows(1, first=500)[0][1])) is None
    kernel.assert_counters(packets=200, new_flows=200)


def test_deleted_slots_keep_probe_sequences_whole(kernel: Kernel) -> None:
    """Three flows with one home slot sit side by side. Deleting the middle one leaves a
    DELETED slot (a FULL one follows), which lookups pass and the next new flow reuses;
    once nothing follows, the sweep empties them all."""
    home = home_of(new_flows(1)[0][1])
    ports = (p for p in itertools.count(1000) if home_of(new_flows(1, p - 1000)[0][1]) == home)
    (f1, k1), (f2, k2), (f3, k3) = [new_flows(1, next(ports) - 1000)[0] for _ in range(3)]
    for frame in (f1, f2, f3):
        kernel.run(frame)
    assert kernel.table.occupancy()["full"] == 3
    take_keys(kernel, k2)
    assert kernel.table.occupancy()["deleted"] == 1  # not swept: k3 lies beyond it
    # Nor when user space names k3's slot as the place to sweep back from: flow.c checks.
    at_k3 = next(i for i in full_slots(kernel.table) if key_of(kernel.table._slots[i]["key"]) == k3)
    sweep_fd = kernel.table._sweep_fd
    assert bpfsys.prog_test_run(sweep_fd, bytes(14) + struct.pack("<I", at_k3)).retval == 0
    assert kernel.table.occupancy()["deleted"] == 1
    kernel.run(f3)  # a hit past the DELETED slot, not a new entry
    assert kernel.flows()[k3]["packets"].tolist() == [2, 0]
    kernel.run(f2)  # the flow again: the DELETED slot is taken back
    slots = 2 * CAPACITY + FLOW_PROBES
    assert kernel.table.occupancy() == {"slots": slots, "full": 3, "deleted": 0}
    take_keys(kernel, k2, k3)
    assert kernel.table.occupancy()["deleted"] == 0  # swept back from the EMPTY slot after
    assert list(kernel.flows()) == [k1]
    kernel.assert_counters(packets=5, new_flows=4)


def test_a_duplicate_entry_is_merged_and_taken_with_its_twin(kernel: Kernel) -> None:
    """Races can leave one key in two slots (see flow.c). They cannot be forced from a
    test, so the duplicate is written into the mmap'd table here: a stand-in for the race."""
    (frame, k), (other, k_other) = new_flows(2)
    for f in (frame, frame, other):
        kernel.run(f)
    table = kernel.table
    at = next(i for i in full_slots(table) if key_of(table._slots[i]["key"]) == k)
    spare = next(i for i in range(at + 1, at + FLOW_PROBES) if table._ctl[i] == SLOT_EMPTY)
    twin = table._slots[at].copy()
    twin["stats"]["packets"] = [3, 4]
    twin["stats"]["bytes"] = [300, 400]
    twin["stats"]["last_ns"] += 1000
    size = len(table._ctl) * SLOT_DTYPE.itemsize
    with bpfsys.map_mmap(kernel.program.bpf[b"flows"].map_fd, size, writable=True) as raw:
        np.frombuffer(raw, SLOT_DTYPE, len(table._ctl))[spare] = twin
    table._ctl[spare] = table._ctl[at]  # FULL, with the key's hash: a claimed, filled slot
    np.frombuffer(table._maps[2], "<u8")[0] += 1  # and the claim counted, as flow.c does
    found = kernel.flows()
    assert found[k]["packets"].tolist() == [5, 4] and found[k]["bytes"].tolist() == [356, 400]
    assert found[k_other]["packets"].tolist() == [1, 0]
    looked_up = table.lookup(key_row(k))
    assert looked_up is not None and looked_up["packets"].tolist() == [5, 4]
    (taken,) = take_keys(kernel, k)
    assert taken["packets"].tolist() == [5, 4] and taken["last_ns"] == found[k]["last_ns"]
    assert table.occupancy()["full"] == 1  # both slots of k deleted
    kernel.run(frame)
    assert kernel.flows()[k]["packets"].tolist() == [1, 0]


def test_table_holds_exactly_its_capacity() -> None:
    """The kernel counts claims against user space's deletes: capacity entries fit, one
    more is refused (counted), and a delete makes room again."""
    prog = FlowProgram(8)
    try:
        small = Kernel(prog)
        flows = new_flows(10)
        for frame, _ in flows[:9]:
            small.run(frame)
        assert len(small.flows()) == 8
        small.assert_counters(packets=9, new_flows=8, map_full=1, map_full_bytes=28)
        take_keys(small, flows[0][1])
        small.run(flows[9][0])
        assert set(small.flows()) == {k for _, k in flows[1:8]} | {flows[9][1]}
        small.assert_counters(packets=10, new_flows=9, map_full=1, map_full_bytes=28)
    finally:
        prog.close()
