"""Where kernel flow entries become flow records.

Every poll reads the whole table once, decides with vectorised numpy masks which flows
are idle (timeout from the kernel's last-seen time, re-chosen each poll from the TCP
flags seen so far) or due for an interim record (a `max_record_interval` boundary since
the flow's first packet was crossed since the previous poll), and does Python work only
for those: cost grows with flows and records, never with packets.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from mermin_cli.engine.layout import (
    DIR_NONE,
    EVENT_DTYPE,
    FLOW_F_FRAGMENT,
    KEY_DTYPE,
    STATS_DTYPE,
)
from mermin_cli.flows import names
from mermin_cli.flows.community_id import community_id
from mermin_cli.flows.direction import LocalHost, initiator_dir, span_kind
from mermin_cli.flows.filters import FlowFilter
from mermin_cli.flows.record import (
    DIRECTION_OF_KIND,
    END_ACTIVE,
    END_FORCED,
    END_IDLE,
    END_OF_FLOW,
    END_RESOURCES,
    FlowRecord,
)
from mermin_cli.flows.traceids import TraceIds

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from mermin_cli.config.schema import SpanConfig

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
PORTED = {6, 17, 132, 136}  # TCP, UDP, SCTP, UDP-Lite
ICMP = {1, 58}
NS = 1_000_000_000

# Table usage at which the oldest flows are closed early, and the level to bring it to.
EVICT_HIGH, EVICT_TARGET = 0.9, 0.8


class Table(Protocol):
    """The kernel flow table as the tracker sees it (see engine/table.py)."""

    capacity: int

    def settled(self) -> AbstractContextManager[None]: ...

    def read(self) -> tuple[np.ndarray, np.ndarray]: ...

    def take(self, rows: np.ndarray) -> np.ndarray: ...

    def lookup(self, key: np.void) -> np.void | None: ...


@dataclass(slots=True)
class FlowState:
    """What we remember about a flow between its records."""

    fwd: int  # key direction index of source -> destination
    kind: str
    community_id: str
    first_ns: int
    filtered: bool = False  # rejected by the Python-side filters: emits nothing
    prev_end: int = 0  # wall-clock end of the previous record (start of the next window)
    packets: tuple[int, int] = (0, 0)  # forward, reverse totals at the previous record
    octets: tuple[int, int] = (0, 0)


def _addr(raw: bytes, ip_ver: int) -> bytes:
    return raw[:4] if ip_ver == 4 else raw


class First(NamedTuple):
    """What a flow's first packet tells about it: all _new_state needs besides the key."""

    first_dir: int
    syn_dir: int
    synack_dir: int
    icmp_type: int  # of the first packet's direction
    icmp_code: int
    first_ns: int


# Decoded with one struct call per row: _new_state runs once per adopted flow, and a dozen
# numpy field accesses cost as much as the rest of it.
_KEY = struct.Struct("<16s16sHH4xBB")  # lo/hi addr, lo/hi port, (ifindex), proto, ip_ver
_FIRST = struct.Struct("<2xBxBB6x4B")  # first/syn/synack dir, icmp_type[2] + icmp_code[2]
_FIRST_OFFSET = STATS_DTYPE.fields["tcp_flags"][1]
_FIRST_NS_OFFSET = STATS_DTYPE.fields["first_ns"][1]
_U64 = struct.Struct("<Q")
_EVENT = struct.Struct("<48xQ5B")  # ts, first/syn/synack dir, icmp type and code
assert KEY_DTYPE.fields["proto"][1] == 40 and _KEY.size == KEY_DTYPE.itemsize - 2
assert STATS_DTYPE.fields["icmp_code"][1] == _FIRST_OFFSET + _FIRST.size - 2
assert EVENT_DTYPE.fields["ts"][1] == 48 and EVENT_DTYPE.fields["icmp_code"][1] == _EVENT.size - 1


def first_of_stats(stats: np.void) -> First:
    """The first-packet fields of a table entry."""
    raw = stats.tobytes()
    first_dir, syn_dir, synack_dir, *icmp = _FIRST.unpack_from(raw, _FIRST_OFFSET)
    first_ns = _U64.unpack_from(raw, _FIRST_NS_OFFSET)[0]
    return First(first_dir, syn_dir, synack_dir, icmp[first_dir], icmp[2 + first_dir], first_ns)


def first_of_event(event: np.void) -> First:
    """The same fields from the new-flow event the kernel sent with the entry."""
    ts, first_dir, syn_dir, synack_dir, icmp_type, icmp_code = _EVENT.unpack_from(event.tobytes())
    return First(first_dir, syn_dir, synack_dir, icmp_type, icmp_code, ts)


class Clock(Protocol):
    """The time base of the kernel's timestamps."""

    def now_ns(self) -> int:
        """Current time on the kernel's clock."""
        ...

    def wall_offset_ns(self) -> int:
        """Unix time minus kernel time."""
        ...


class MonotonicClock:
    """Live capture: the kernel stamps with CLOCK_MONOTONIC, as time.monotonic_ns()."""

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def wall_offset_ns(self) -> int:
        """From the tightest of a few bracketed readings, fresh every poll (NTP steps)."""
        best = None
        for _ in range(3):
            m0 = time.monotonic_ns()
            wall = time.time_ns()
            m1 = time.monotonic_ns()
            if best is None or m1 - m0 < best[0]:
                best = (m1 - m0, wall - (m0 + m1) // 2)
        assert best is not None
        return best[1]


class FlowTracker:
    """Turns polls of the kernel table into FlowRecords."""

    def __init__(
        self,
        table: Table,
        span: SpanConfig,
        interface_name: Callable[[int], str | None],
        host: LocalHost | None = None,
        flow_filter: FlowFilter | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.table = table
        self.span = span
        self.flow_filter = flow_filter
        self.clock = clock or MonotonicClock()
        self.interface_name = interface_name
        self.host = host or LocalHost()
        self.host.refresh()  # before the first flow is adopted
        self.trace_ids = TraceIds(
            int(span.trace_id_timeout * NS), max_entries=max(65536, 4 * table.capacity)
        )
        self.flows: dict[bytes, FlowState] = {}
        self._prev_poll_ns = 0
        # Flows closed by this poll and the one before (key -> first_ns): an event that
        # comes after its flow was closed must not adopt it again.
        self._closed: dict[bytes, int] = {}
        self._closed_before: dict[bytes, int] = {}
        self.records_emitted = 0
        self.zero_suppressed = 0
        self.evicted = 0
        self.filtered = 0  # flows rejected by the Python-side filters
        self.table_size = 0  # entries in the kernel table at the last poll
        self.last_poll_seconds = 0.0
        # The last two reads, for the live view: (kernel time, keys, stats).
        self.snapshot: tuple[int, np.ndarray, np.ndarray] | None = None
        self.previous_snapshot: tuple[int, np.ndarray, np.ndarray] | None = None
        self.lock = threading.Lock()  # flows is shared by the poller and the workers

    # -- polling -------------------------------------------------------------------

    def adopt(self, event: np.void) -> str:
        """Worker stage: start tracking a new flow from the kernel's event about it.

        The event carries what orientation and the Community ID need, so adopting costs
        no table lookup, unless filters are set (they judge the whole entry). Returns
        "created", "filtered", "known" (already tracked) or "gone" (closed first).
        """
        key = event["key"]
        kb = key.tobytes()
        stats = None
        if self.flow_filter:  # an empty FlowFilter (no rules) is false
            stats = self.table.lookup(key)
            if stats is None:
                return "gone"
            first = first_of_stats(stats)
        else:
            first = first_of_event(event)
        self.host.refresh()
        with self.lock:
            if first.first_ns in (self._closed.get(kb), self._closed_before.get(kb)):
                return "gone"
            state = self.flows.get(kb)
            if state is not None and state.first_ns == first.first_ns:
                return "known"
            state = self.flows[kb] = self._new_state(key, first, stats)
            return "filtered" if state.filtered else "created"

    def poll(self, now_ns: int | None = None) -> list[FlowRecord]:
        """One poll: records for idle, closing, due and (table nearly full) evicted flows."""
        started = time.perf_counter()
        self.host.refresh()
        offset = self.clock.wall_offset_ns()
        with self.table.settled():
            keys, vals = self.table.read()
            now = self.clock.now_ns() if now_ns is None else now_ns
            with self.lock:
                records = self._poll(keys, vals, now, offset)
        self.table_size = len(keys)
        self.previous_snapshot, self.snapshot = self.snapshot, (now, keys, vals)
        self.last_poll_seconds = time.perf_counter() - started
        return records

    def _poll(self, keys: np.ndarray, vals: np.ndarray, now: int, offset: int) -> list[FlowRecord]:
        out: list[FlowRecord] = []

        last = vals["last_ns"].astype(np.int64)
        first = vals["first_ns"].astype(np.int64)
        idle = (now - last) >= self._timeouts_ns(keys, vals)
        interval = max(1, int(self.span.max_record_interval * NS))
        prev = np.maximum(first, self._prev_poll_ns)
        due = ~idle & (((now - first) // interval) > ((prev - first) // interval))
        self._prev_poll_ns = now
        self._closed_before, self._closed = self._closed, {}

        closing = np.flatnonzero(idle)
        for i, final in zip(closing, self.table.take(closing), strict=True):
            out.extend(self._close(keys[i], final, self._end_reason(final), offset))
        for i in np.flatnonzero(due):
            out.extend(self._emit(keys[i], vals[i], END_ACTIVE, offset))
        out.extend(self._evict(keys, vals, idle, offset))
        self.records_emitted += len(out)
        return out

    def flush(self) -> list[FlowRecord]:
        """Final `forced_end` records of every active flow (shutdown / end of input)."""
        offset = self.clock.wall_offset_ns()
        out: list[FlowRecord] = []
        with self.table.settled():
            keys, vals = self.table.read()
            with self.lock:
                for i in range(len(keys)):
                    out.extend(self._close(keys[i], vals[i], END_FORCED, offset))
        self.records_emitted += len(out)
        return out

    def _timeouts_ns(self, keys: np.ndarray, vals: np.ndarray) -> np.ndarray:
        s = self.span
        proto = keys["proto"]
        flags = vals["tcp_flags"][:, 0] | vals["tcp_flags"][:, 1]
        tcp = proto == 6
        seconds = np.select(
            [
                tcp & ((flags & TCP_RST) != 0),
                tcp & ((flags & TCP_FIN) != 0),
                tcp,
                (proto == 17) | (proto == 136),
                (proto == 1) | (proto == 58),
            ],
            [s.tcp_rst_timeout, s.tcp_fin_timeout, s.tcp_timeout, s.udp_timeout, s.icmp_timeout],
            default=s.generic_timeout,
        )
        return (seconds * NS).astype(np.int64)

    @staticmethod
    def _end_reason(stats: np.void) -> str:
        flags = int(stats["tcp_flags"][0]) | int(stats["tcp_flags"][1])
        return END_OF_FLOW if flags & (TCP_FIN | TCP_RST) else END_IDLE

    def _evict(
        self, keys: np.ndarray, vals: np.ndarray, idle: np.ndarray, offset: int
    ) -> Iterator[FlowRecord]:
        """Close the least recently active flows when the table is nearly full."""
        live = np.flatnonzero(~idle)
        cap = self.table.capacity
        if len(live) < EVICT_HIGH * cap:
            return
        excess = len(live) - int(EVICT_TARGET * cap)
        oldest = live[np.argsort(vals["last_ns"][live], kind="stable")[:excess]]
        for i, final in zip(oldest, self.table.take(oldest), strict=True):
            self.evicted += 1
            yield from self._close(keys[i], final, END_RESOURCES, offset)

    # -- records ---------------------------------------------------------------------

    def _close(self, key: np.void, stats: np.void, reason: str, offset: int) -> list[FlowRecord]:
        records = list(self._emit(key, stats, reason, offset))
        kb = key.tobytes()
        self.flows.pop(kb, None)
        self._closed[kb] = int(stats["first_ns"])
        return records

    def _emit(self, key: np.void, stats: np.void, reason: str, offset: int) -> Iterator[FlowRecord]:
        kb = key.tobytes()
        state = self.flows.get(kb)
        if state is None or state.first_ns != int(stats["first_ns"]):
            state = self.flows[kb] = self._new_state(key, first_of_stats(stats), stats)
        if state.filtered:
            return
        f, r = state.fwd, 1 - state.fwd
        packets = (int(stats["packets"][f]), int(stats["packets"][r]))
        octets = (int(stats["bytes"][f]), int(stats["bytes"][r]))
        dp = (packets[0] - state.packets[0], packets[1] - state.packets[1])
        if dp == (0, 0):
            self.zero_suppressed += 1
            return
        do = (octets[0] - state.octets[0], octets[1] - state.octets[1])
        # Times are monotonic in the kernel; windows chain exactly in wall-clock time.
        start = state.prev_end or state.first_ns + offset
        end = max(int(stats["last_ns"]) + offset, start)
        state.prev_end, state.packets, state.octets = end, packets, octets

        attrs = self.static_attributes(key, stats, state)
        attrs["flow.end_reason"] = reason
        attrs.update(
            {
                "flow.bytes.delta": do[0],
                "flow.bytes.total": octets[0],
                "flow.packets.delta": dp[0],
                "flow.packets.total": packets[0],
                "flow.reverse.bytes.delta": do[1],
                "flow.reverse.bytes.total": octets[1],
                "flow.reverse.packets.delta": dp[1],
                "flow.reverse.packets.total": packets[1],
            }
        )
        attrs.update(_dynamic_attributes(key, stats, f))
        yield FlowRecord(
            name=f"flow_{attrs['network.type']}_{attrs['network.transport']}",
            kind=state.kind,
            trace_id=self.trace_ids.get(state.community_id, int(stats["last_ns"])),
            span_id=secrets.token_hex(8),
            start_time_unix_nano=start,
            end_time_unix_nano=end,
            attributes=attrs,
        )

    def _new_state(self, key: np.void, first: First, stats: np.void | None) -> FlowState:
        """Orientation, kind and Community ID, decided once; filters applied once (they
        need the entry's `stats`, which the caller then provides)."""
        lo_raw, hi_raw, lo_port, hi_port, proto, ip_ver = _KEY.unpack_from(key.tobytes())
        lo, hi = _addr(lo_raw, ip_ver), _addr(hi_raw, ip_ver)
        ports = (lo_port, hi_port)
        first_dir, icmp_type, icmp_code = first.first_dir, first.icmp_type, first.icmp_code
        fwd = initiator_dir(proto, ip_ver, ports, (lo, hi), first_dir, first.syn_dir,
                            first.synack_dir, icmp_type, self.host)  # fmt: skip
        src, dst = (lo, hi) if fwd == 0 else (hi, lo)
        seed = self.span.community_id_seed
        if proto in ICMP:
            # Community ID hashes the first packet as it was sent (one-way types keep order).
            sender = (lo, hi) if first_dir == 0 else (hi, lo)
            cid = community_id(proto, *sender, icmp_type, icmp_code, seed)
        elif proto in PORTED:
            sport, dport = (ports[0], ports[1]) if fwd == 0 else (ports[1], ports[0])
            cid = community_id(proto, src, dst, sport, dport, seed)
        else:
            cid = community_id(proto, src, dst, None, None, seed)
        state = FlowState(
            fwd=fwd,
            kind=span_kind(src, dst, self.host),
            community_id=cid,
            first_ns=first.first_ns,
        )
        if self.flow_filter:
            assert stats is not None, "filters judge the whole entry"
            attrs = {
                **self.static_attributes(key, stats, state),
                **_dynamic_attributes(key, stats, fwd),
            }
            if not self.flow_filter.allows(attrs):
                state.filtered = True
                self.filtered += 1
        return state

    def static_attributes(self, key: np.void, stats: np.void, state: FlowState) -> dict[str, Any]:
        """Attributes fixed for a flow's lifetime, rebuilt per record (not kept per flow:
        a tracked flow costs a few hundred bytes of Python memory, not kilobytes)."""
        ip_ver, proto = int(key["ip_ver"]), int(key["proto"])
        ends = [
            (_addr(key["lo_addr"].tobytes(), ip_ver), int(key["lo_port"])),
            (_addr(key["hi_addr"].tobytes(), ip_ver), int(key["hi_port"])),
        ]
        (src, sport), (dst, dport) = ends[state.fwd], ends[1 - state.fwd]
        if proto in ICMP:
            # ICMP has no ports: show the initiator's type and code, as Community ID does.
            sport = int(stats["icmp_type"][state.fwd])
            dport = int(stats["icmp_code"][state.fwd])
        elif proto not in PORTED:
            sport = dport = 0
        ifindex = int(key["ifindex"])
        attrs: dict[str, Any] = {
            "flow.community_id": state.community_id,
            "flow.direction": DIRECTION_OF_KIND[state.kind],
            "source.address": str(ipaddress.ip_address(src)),
            "source.port": sport,
            "destination.address": str(ipaddress.ip_address(dst)),
            "destination.port": dport,
            "network.type": f"ipv{ip_ver}",
            "network.transport": names.transport_name(proto),
            "network.interface.index": ifindex,
        }
        ifname = self.interface_name(ifindex)
        if ifname is not None:
            attrs["network.interface.name"] = ifname
        if int(stats["vlan_id"]):
            attrs["network.vlan.id"] = int(stats["vlan_id"])
        mac = stats["mac"].tobytes()
        if any(mac):
            attrs["network.interface.mac"] = mac.hex(":")
        if int(stats["flags"]) & FLOW_F_FRAGMENT:
            attrs["flow.ip.fragmented"] = True
        return attrs


def _dynamic_attributes(key: np.void, stats: np.void, f: int) -> dict[str, Any]:
    """Attributes that may change between records: TCP state and flags, IP/ICMP metadata."""
    r = 1 - f
    ip_ver, proto = int(key["ip_ver"]), int(key["proto"])
    seen = int(stats["meta_seen"])
    out: dict[str, Any] = {}
    if proto == 6:
        fwd_flags, rev_flags = int(stats["tcp_flags"][f]), int(stats["tcp_flags"][r])
        out["flow.connection.state"] = tcp_state(fwd_flags, rev_flags, stats, f)
        out["flow.tcp.flags.bits"] = fwd_flags
        out["flow.tcp.flags.tags"] = names.tcp_flag_tags(fwd_flags)
        out["flow.reverse.tcp.flags.bits"] = rev_flags
        out["flow.reverse.tcp.flags.tags"] = names.tcp_flag_tags(rev_flags)
        syn_dir, synack_dir = int(stats["syn_dir"]), int(stats["synack_dir"])
        if syn_dir != DIR_NONE and synack_dir != DIR_NONE and syn_dir != synack_dir:
            latency = int(stats["synack_ns"]) - int(stats["syn_ns"])
            if latency >= 0:
                out["flow.tcp.handshake.latency"] = latency
    for d, prefix in ((f, "flow."), (r, "flow.reverse.")):
        if not seen & (1 << d):
            continue
        tos = int(stats["tos"][d])
        out[prefix + "ip.dscp.id"] = tos >> 2
        out[prefix + "ip.dscp.name"] = names.dscp_name(tos >> 2)
        out[prefix + "ip.ecn.id"] = tos & 3
        out[prefix + "ip.ecn.name"] = names.ecn_name(tos & 3)
        out[prefix + "ip.ttl"] = int(stats["ttl"][d])
        if ip_ver == 6:
            out[prefix + "ip.flow_label"] = int(stats["flow_label"][d])
        if proto in ICMP:
            t, c = int(stats["icmp_type"][d]), int(stats["icmp_code"][d])
            out[prefix + "icmp.type.id"] = t
            out[prefix + "icmp.type.name"] = names.icmp_type_name(ip_ver, t)
            out[prefix + "icmp.code.id"] = c
            out[prefix + "icmp.code.name"] = names.icmp_code_name(ip_ver, t, c)
    return out


def tcp_state(fwd_flags: int, rev_flags: int, stats: np.void, f: int) -> str:
    """Coarse RFC 9293 state from the flags each side sent (the client's view)."""
    if (fwd_flags | rev_flags) & TCP_RST:
        return "closed"
    fin_fwd, fin_rev = bool(fwd_flags & TCP_FIN), bool(rev_flags & TCP_FIN)
    if fin_fwd and fin_rev:
        return "time_wait"
    if fin_fwd:
        return "fin_wait_1"
    if fin_rev:
        return "close_wait"
    syn_dir, synack_dir = int(stats["syn_dir"]), int(stats["synack_dir"])
    if syn_dir == f and synack_dir == DIR_NONE:
        return "syn_sent"
    if synack_dir != DIR_NONE and not (fwd_flags & TCP_ACK):
        return "syn_received"
    return "established"
