"""The record logic above the kernel map, driven with a synthetic flow table.

The table here is a stand-in (numpy rows in the kernel's exact layout) because these
tests need exact control of time and counters; the same code runs against the real map
in test_capture.py.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math

import communityid
import numpy as np
import pytest

from mermin_cli.config.schema import SpanConfig
from mermin_cli.engine.layout import DIR_NONE, EVENT_DTYPE, KEY_DTYPE, STATS_DTYPE
from mermin_cli.flows.direction import LocalHost
from mermin_cli.flows.filters import FlowFilter
from mermin_cli.flows.tracker import FlowTracker, first_of_event, first_of_stats

try:
    from . import netns  # type: ignore[import-not-found]
except ImportError:
    import netns  # type: ignore[no-redef]

S = 1_000_000_000
A, B = "10.203.9.1", "10.203.9.2"  # A < B: A is the key's lo side
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10


class FakeTable:
    """Rows in the kernel layout; `take` removes rows of the last read, as engine/table.py."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self.rows: dict[bytes, tuple[np.void, np.void]] = {}
        self.last_read: list[bytes] = []

    def settled(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.array([k for k, _ in self.rows.values()], dtype=KEY_DTYPE)
        vals = np.array([v for _, v in self.rows.values()], dtype=STATS_DTYPE)
        self.last_read = list(self.rows)
        return keys, vals

    def take(self, rows: np.ndarray) -> np.ndarray:
        taken = [self.rows.pop(self.last_read[i])[1] for i in rows]
        return np.array(taken, dtype=STATS_DTYPE)

    def put(self, key: np.void, stats: np.void) -> None:
        self.rows[key.tobytes()] = (key, stats)


def make_key(proto: int, lo_port: int, hi_port: int, lo: str = A, hi: str = B) -> np.void:
    key = np.zeros(1, dtype=KEY_DTYPE)[0]
    key["lo_addr"] = ipaddress.ip_address(lo).packed.ljust(16, b"\0")
    key["hi_addr"] = ipaddress.ip_address(hi).packed.ljust(16, b"\0")
    key["lo_port"], key["hi_port"] = lo_port, hi_port
    key["ifindex"], key["proto"], key["ip_ver"] = 7, proto, 4
    return key


def make_stats(
    packets: tuple[int, int],
    first: float,
    last: float,
    flags: tuple[int, int] = (0, 0),
    first_dir: int = 0,
    syn_dir: int = DIR_NONE,
    synack_dir: int = DIR_NONE,
    icmp: tuple[int, int] = (0, 0),
) -> np.void:
    s = np.zeros(1, dtype=STATS_DTYPE)[0]
    s["packets"] = packets
    s["bytes"] = (packets[0] * 100, packets[1] * 1000)
    s["first_ns"], s["last_ns"] = int(first * S), int(last * S)
    s["tcp_flags"] = flags
    s["first_dir"], s["syn_dir"], s["synack_dir"] = first_dir, syn_dir, synack_dir
    s["meta_seen"] = 3
    s["icmp_type"] = icmp
    return s


def make_event(key: np.void, stats: np.void) -> np.void:
    """The new-flow event the kernel sends with an entry (times already in ns)."""
    ev = np.zeros(1, dtype=EVENT_DTYPE)[0]
    ev["key"], ev["ts"] = key, stats["first_ns"]
    d = int(stats["first_dir"])
    for name in ("first_dir", "syn_dir", "synack_dir"):
        ev[name] = stats[name]
    ev["icmp_type"], ev["icmp_code"] = stats["icmp_type"][d], stats["icmp_code"][d]
    return ev


def tracker(table: FakeTable, **span: float) -> FlowTracker:
    host = LocalHost(addresses={ipaddress.ip_address(A).packed}, refresh_interval=math.inf)
    return FlowTracker(table, SpanConfig(**span), {7: "veth7"}.get, host)


def reasons(records) -> list[str]:
    return [r.attributes["flow.end_reason"] for r in records]


def test_fin_shortens_the_timeout_when_it_is_seen_not_at_creation() -> None:
    table = FakeTable()
    t = tracker(table, tcp_timeout=20, tcp_fin_timeout=5)
    key = make_key(6, 40000, 80)
    table.put(key, make_stats((3, 2), 0, 1, flags=(SYN | ACK, SYN | ACK), syn_dir=0, synack_dir=1))
    assert t.poll(now_ns=10 * S) == []  # 9 s idle < 20 s
    table.put(key, make_stats((4, 3), 0, 11, flags=(SYN | ACK | FIN, SYN | ACK), syn_dir=0))
    assert t.poll(now_ns=15 * S) == []  # 4 s after the FIN < 5 s
    out = t.poll(now_ns=16 * S + 1)
    assert reasons(out) == ["end_of_flow_detected"]
    assert key.tobytes() not in table.rows


def test_idle_is_measured_from_the_kernel_last_seen_time() -> None:
    table = FakeTable()
    t = tracker(table, tcp_timeout=20, max_record_interval=1000)
    key = make_key(6, 40000, 80)
    for now in range(10, 100, 10):  # busy for 90 s, far beyond tcp_timeout
        table.put(key, make_stats((now, now), 0, now - 1, flags=(ACK, ACK)))
        assert t.poll(now_ns=now * S) == []
    assert reasons(t.poll(now_ns=(89 + 20) * S)) == ["idle_timeout"]


def test_interim_records_deltas_and_zero_suppression() -> None:
    table = FakeTable()
    t = tracker(table, udp_timeout=100, max_record_interval=10)
    key = make_key(17, 5000, 6000)
    table.put(key, make_stats((5, 1), 0, 4))
    assert t.poll(now_ns=5 * S) == []
    first = t.poll(now_ns=10 * S + 1)
    assert reasons(first) == ["active_timeout"]
    a = first[0].attributes
    assert (a["flow.packets.delta"], a["flow.packets.total"]) == (5, 5)
    assert (a["flow.reverse.bytes.delta"], a["flow.reverse.bytes.total"]) == (1000, 1000)
    assert t.poll(now_ns=20 * S + 1) == []  # boundary crossed, nothing new: suppressed
    assert t.zero_suppressed == 1
    table.put(key, make_stats((8, 1), 0, 25))
    second = t.poll(now_ns=30 * S + 1)
    b = second[0].attributes
    assert (b["flow.packets.delta"], b["flow.packets.total"]) == (3, 8)
    assert b["flow.reverse.packets.delta"] == 0
    assert second[0].start_time_unix_nano == first[0].end_time_unix_nano
    assert second[0].trace_id == first[0].trace_id


def test_table_near_full_closes_oldest_flows_as_lack_of_resources() -> None:
    table = FakeTable(capacity=10)
    t = tracker(table, udp_timeout=100)
    for i in range(9):  # 90 % full
        table.put(make_key(17, 1000 + i, 53), make_stats((1, 0), 0, 1 + i))
    out = t.poll(now_ns=20 * S)
    assert reasons(out) == ["lack_of_resources"]  # down to 80 %: the oldest one
    assert out[0].attributes["source.port"] == 1000
    assert len(table.rows) == 8


def test_flush_emits_forced_end_for_every_flow() -> None:
    table = FakeTable()
    t = tracker(table)
    table.put(make_key(17, 1, 2), make_stats((1, 0), 0, 1))
    table.put(make_key(6, 3, 4), make_stats((1, 1), 0, 1, flags=(SYN, SYN | ACK), syn_dir=0))
    assert sorted(reasons(t.flush())) == ["forced_end", "forced_end"]


def test_same_community_id_keeps_trace_id_until_timeout() -> None:
    table = FakeTable()
    t = tracker(table, udp_timeout=1, trace_id_timeout=60)
    key = make_key(17, 5000, 53)
    table.put(key, make_stats((1, 1), 0, 1))
    first = t.poll(now_ns=5 * S)[0]
    table.put(key, make_stats((1, 1), 10, 11))  # a new kernel entry, same 5-tuple
    second = t.poll(now_ns=15 * S)[0]
    table.put(key, make_stats((1, 1), 100, 101))  # 90 s later: beyond trace_id_timeout
    third = t.poll(now_ns=105 * S)[0]
    assert first.trace_id == second.trace_id != third.trace_id
    assert len({first.span_id, second.span_id, third.span_id}) == 3


@pytest.mark.parametrize(
    ("desc", "stats", "client", "kind"),
    [
        ("SYN from hi side", dict(syn_dir=1, first_dir=0), (B, 80), "server"),
        ("only SYN+ACK seen, sent by lo", dict(synack_dir=0, first_dir=0), (B, 80), "server"),
        ("mid-stream, lo listens on 80", dict(first_dir=0), (B, 80), "server"),
    ],
)
def test_tcp_initiator(desc: str, stats: dict, client: tuple[str, int], kind: str) -> None:
    table = FakeTable()
    host = LocalHost(
        addresses={ipaddress.ip_address(A).packed}, listening={80}, refresh_interval=math.inf
    )
    t = FlowTracker(table, SpanConfig(), {}.get, host)
    # lo = A:80 (a local listener), hi = B:40000
    table.put(make_key(6, 80, 40000), make_stats((2, 2), 0, 1, flags=(ACK, ACK), **stats))
    rec = t.flush()[0]
    a = rec.attributes
    assert (a["source.address"], a["destination.port"]) == (B, 80), desc
    assert a["source.port"] == 40000
    assert rec.kind == kind and a["flow.direction"] == "reverse"
    # Forward counters follow the source: hi -> lo is direction 1 in the key.
    assert a["flow.bytes.total"] == 2 * 1000 and a["flow.reverse.bytes.total"] == 2 * 100


def test_icmp_reply_seen_first_still_makes_the_requester_the_source() -> None:
    table = FakeTable()
    t = tracker(table)
    # First packet: echo reply (type 0) from lo (A) to hi (B); B sent the request.
    table.put(make_key(1, 9, 9), make_stats((1, 1), 0, 1, first_dir=0, icmp=(0, 8)))
    rec = t.flush()[0]
    a = rec.attributes
    assert (a["source.address"], a["destination.address"]) == (B, A)
    assert a["flow.icmp.type.name"] == "echo_request"
    assert a["flow.reverse.icmp.type.name"] == "echo_reply"
    assert rec.kind == "server"
    cid = communityid.CommunityID().calc(communityid.FlowTuple.make_icmp(A, B, 0, 0))
    assert a["flow.community_id"] == cid


@pytest.mark.parametrize("seed", [0, 1])
def test_community_id_matches_reference_implementation(seed: int) -> None:
    table = FakeTable()
    t = tracker(table, community_id_seed=seed)
    table.put(make_key(6, 40000, 443), make_stats((1, 1), 0, 1, syn_dir=0, flags=(SYN, SYN | ACK)))
    table.put(make_key(47, 0, 0), make_stats((1, 0), 0, 1))  # GRE: no ports
    got = {r.attributes["network.transport"]: r.attributes["flow.community_id"] for r in t.flush()}
    cid = communityid.CommunityID(seed)
    assert got["tcp"] == cid.calc(communityid.FlowTuple.make_tcp(A, B, 40000, 443))
    assert got["gre"] == cid.calc(communityid.FlowTuple(47, A, B))


LISTENERS = """
import json, socket
from pathlib import Path
from mermin_cli.flows.direction import LocalHost, _read_listening_proc

def tcp(family, addr, port, listen):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    if listen:
        s.listen()
    return s

held = [
    tcp(socket.AF_INET, "0.0.0.0", 8080, True),
    tcp(socket.AF_INET6, "::", 9443, True),
    tcp(socket.AF_INET, "127.0.0.1", 7001, False),  # bound, not listening
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM),  # UDP: never a listener
]
held[-1].bind(("0.0.0.0", 5353))
client = socket.create_connection(("127.0.0.1", 8080))  # an established socket too
host = LocalHost()
host.refresh(force=True)
print(json.dumps([sorted(host.listening), sorted(_read_listening_proc(Path("/proc")))]))
"""


def test_listening_ports_are_those_of_the_namespace(link: netns.Link) -> None:
    """Real sockets in a namespace of the test's own: sock_diag and /proc agree."""
    link.a.run("ip", "link", "set", "lo", "up")
    diag, proc = json.loads(link.a.exec_python(LISTENERS))
    assert diag == proc == [8080, 9443]


@pytest.mark.parametrize(
    "stats",
    [
        make_stats((1, 0), 3, 3, flags=(SYN, 0), syn_dir=0),
        make_stats((0, 1), 3, 3, flags=(0, SYN | ACK), first_dir=1, synack_dir=1),
        make_stats((1, 1), 3, 4, first_dir=1, icmp=(0, 8)),
    ],
)
def test_event_and_entry_tell_the_same_first_packet(stats: np.void) -> None:
    stats["icmp_code"] = (3, 5)
    assert first_of_event(make_event(make_key(1, 9, 9), stats)) == first_of_stats(stats)


def test_adopting_from_events_matches_the_table_and_closed_flows_stay_gone() -> None:
    table = FakeTable()  # no lookup(): adopting from an event must not need the table
    t = tracker(table, icmp_timeout=10)
    t.flow_filter = FlowFilter(())  # what a capture without filters sets: no rules
    key = make_key(1, 9, 9)
    stats = make_stats((1, 1), 0, 1, first_dir=0, icmp=(0, 8))  # reply seen first
    table.put(key, stats)
    event = make_event(key, stats)
    assert t.adopt(event) == "created"
    assert t.adopt(event) == "known"
    adopted = t.flows[key.tobytes()]
    closed = t.poll(now_ns=20 * S)
    assert reasons(closed) == ["idle_timeout"]
    assert t.adopt(event) == "gone"  # its event came late: the flow is closed, not reopened
    assert t.flows == {}
    polled = tracker(FakeTable())  # the same entry, seen first at a poll
    polled.table.put(key, stats)
    from_table = polled.flush()[0]
    assert adopted.community_id == from_table.attributes["flow.community_id"]
    assert closed[0].attributes["source.address"] == from_table.attributes["source.address"] == B
    again = make_stats((1, 0), 30, 30, first_dir=0, icmp=(8, 0))  # the key starts anew
    table.put(key, again)
    assert t.adopt(make_event(key, again)) == "created"
