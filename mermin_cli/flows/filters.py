"""Flow filters: what is decided in the kernel, and what once per flow in Python.

In the kernel (bpf/flow.c, only when a packet misses the flow table, so filtered flows
never reach Python and never fill the table):
  filter "source" / "destination": address, port      (source = the flow's initiator)
  filter "network": transport, type

In Python, once per flow when its first record is due (rejected flows emit nothing):
  filter "network": interface_name, interface_index, interface_mac
  filter "flow": every field (connection_state, tcp_flags_tags, ip_*, icmp_*)

A value is allowed iff it matches no `not_match` entry and, when `match` is non-empty,
at least one `match` entry. All fields of all blocks must allow the flow.
"""

from __future__ import annotations

import ctypes
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mermin_cli.config.schema import FilterBlock, FilterConfig, Matcher
from mermin_cli.config.values import compile_pattern, parse_cidrs, parse_ranges
from mermin_cli.flows import names

# Bits of filter_cfg.active and filter_ports values, as in bpf/flow.c.
F_SRC_ADDR_MATCH, F_SRC_ADDR_NOT, F_DST_ADDR_MATCH, F_DST_ADDR_NOT = 0x1, 0x2, 0x4, 0x8
F_SRC_PORT_MATCH, F_SRC_PORT_NOT, F_DST_PORT_MATCH, F_DST_PORT_NOT = 0x10, 0x20, 0x40, 0x80
F_PROTO, F_REJECT_V4, F_REJECT_V6 = 0x100, 0x200, 0x400
PORT_SRC_MATCH, PORT_SRC_NOT, PORT_DST_MATCH, PORT_DST_NOT = 0x1, 0x2, 0x4, 0x8
LIST_SRC_MATCH, LIST_SRC_NOT, LIST_DST_MATCH, LIST_DST_NOT = 0, 1, 2, 3

# Python-side fields: (block, field) -> record attribute it is compared with.
FLOW_FIELDS = {
    ("network", "interface_name"): "network.interface.name",
    ("network", "interface_index"): "network.interface.index",
    ("network", "interface_mac"): "network.interface.mac",
    ("flow", "connection_state"): "flow.connection.state",
    ("flow", "tcp_flags_tags"): "flow.tcp.flags.tags",
    ("flow", "ip_dscp_name"): "flow.ip.dscp.name",
    ("flow", "ip_ecn_name"): "flow.ip.ecn.name",
    ("flow", "ip_ttl"): "flow.ip.ttl",
    ("flow", "ip_flow_label"): "flow.ip.flow_label",
    ("flow", "icmp_type_name"): "flow.icmp.type.name",
    ("flow", "icmp_code_name"): "flow.icmp.code.name",
}
NUMERIC = {"interface_index": (0, 2**32 - 1), "ip_ttl": (0, 255), "ip_flow_label": (0, 2**20 - 1)}
# A flow whose interface has no name is rejected by an interface_name filter (like the
# Rust tool); every other attribute a flow lacks (ICMP fields of a TCP flow) is skipped.
REQUIRED = {"network.interface.name"}


def _allows(
    matcher: Matcher, test: Callable[[str], Callable[[Any], bool]]
) -> Callable[[Any], bool]:
    """Predicate for one matcher; `test(entry)` builds the per-entry test."""
    yes = [test(m) for m in matcher.match]
    no = [test(m) for m in matcher.not_match]

    def allowed(value: Any) -> bool:
        values = value if isinstance(value, list) else [value]
        if any(t(v) for t in no for v in values):
            return False
        return not yes or any(t(v) for t in yes for v in values)

    return allowed


def _glob(entry: str) -> Callable[[Any], bool]:
    rx = compile_pattern(entry.strip().lower(), ignore_case=True)
    return lambda v: rx.search(str(v).lower()) is not None


def _numeric(bounds: tuple[int, int]) -> Callable[[str], Callable[[Any], bool]]:
    def test(entry: str) -> Callable[[Any], bool]:
        ((lo, hi),) = parse_ranges([entry], *bounds)
        return lambda v: isinstance(v, int) and lo <= v <= hi

    return test


@dataclass(frozen=True)
class FlowFilter:
    """The Python-side part: one predicate per configured field."""

    rules: tuple[tuple[str, Callable[[Any], bool]], ...]

    @classmethod
    def from_config(cls, config: FilterConfig) -> FlowFilter:
        rules = []
        for (block, field), attr in FLOW_FIELDS.items():
            matcher: Matcher | None = getattr(getattr(config, block), field)
            if matcher and (matcher.match or matcher.not_match):
                test = _numeric(NUMERIC[field]) if field in NUMERIC else _glob
                rules.append((attr, _allows(matcher, test)))
        return cls(tuple(rules))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def allows(self, attributes: dict[str, Any]) -> bool:
        for attr, allowed in self.rules:
            if attr not in attributes:
                if attr in REQUIRED:
                    return False
                continue
            if not allowed(attributes[attr]):
                return False
        return True


@dataclass
class KernelFilter:
    """The kernel-side part, as the contents of the filter maps of bpf/flow.c."""

    active: int = 0
    addresses: tuple[tuple[int, ipaddress.IPv4Network | ipaddress.IPv6Network], ...] = ()
    ports: dict[int, int] | None = None  # port -> PORT_* bits (only ports with bits)
    protos: bytes = b""  # 256 bytes, 1 = allowed (used when F_PROTO is set)

    @classmethod
    def from_config(cls, config: FilterConfig) -> KernelFilter:
        kf = cls(ports={})
        addrs: list[tuple[int, Any]] = []
        for block, (match_bit, not_bit, list_base) in {
            "source": (F_SRC_ADDR_MATCH, F_SRC_ADDR_NOT, LIST_SRC_MATCH),
            "destination": (F_DST_ADDR_MATCH, F_DST_ADDR_NOT, LIST_DST_MATCH),
        }.items():
            m: Matcher | None = getattr(config, block).address
            if m and m.match:
                kf.active |= match_bit
                addrs += [(list_base, net) for net in parse_cidrs(m.match)]
            if m and m.not_match:
                kf.active |= not_bit
                addrs += [(list_base + 1, net) for net in parse_cidrs(m.not_match)]
        kf.addresses = tuple(addrs)
        kf._ports(config.source, F_SRC_PORT_MATCH, F_SRC_PORT_NOT, PORT_SRC_MATCH)
        kf._ports(config.destination, F_DST_PORT_MATCH, F_DST_PORT_NOT, PORT_DST_MATCH)
        kf._network(config.network)
        return kf

    def _ports(self, block: FilterBlock, match_bit: int, not_bit: int, port_bit: int) -> None:
        assert self.ports is not None
        m = block.port
        for entries, flag, bit in ((m and m.match, match_bit, port_bit),
                                   (m and m.not_match, not_bit, port_bit << 1)):  # fmt: skip
            if not entries:
                continue
            self.active |= flag
            for lo, hi in parse_ranges(entries, 0, 65535):
                for port in range(lo, hi + 1):
                    self.ports[port] = self.ports.get(port, 0) | bit

    def _network(self, block: FilterBlock) -> None:
        if block.transport and (block.transport.match or block.transport.not_match):
            allowed = _allows(block.transport, _glob)
            self.active |= F_PROTO
            self.protos = bytes(int(allowed(names.transport_name(p))) for p in range(256))
        if block.type and (block.type.match or block.type.not_match):
            allowed = _allows(block.type, _glob)
            self.active |= (0 if allowed("ipv4") else F_REJECT_V4) | (
                0 if allowed("ipv6") else F_REJECT_V6
            )

    def load(self, bpf: Any) -> None:
        """Write the maps of a loaded program (replacing earlier filters)."""
        cfg, lpm = bpf[b"filter_cfg"], bpf[b"filter_addrs"]
        cfg[ctypes.c_int(0)] = cfg.Leaf(0)  # off while the maps change
        lpm.clear()
        bpf[b"filtered"].clear()
        for list_id, net in self.addresses:
            key = lpm.Key()
            raw = bytearray(20)
            raw[0] = list_id
            packed = net.network_address.packed
            if net.version == 4:
                raw[11:13] = b"\xff\xff"
                raw[13:17] = packed
                key.prefixlen = 8 + 96 + net.prefixlen
            else:
                raw[1:17] = packed
                key.prefixlen = 8 + net.prefixlen
            key.data = (ctypes.c_ubyte * 20)(*raw)
            lpm[key] = lpm.Leaf(1)
        _fill(bpf[b"filter_ports"], (self.ports or {}).items(), 65536)
        protos = self.protos or bytes(256)
        _fill(bpf[b"filter_protos"], enumerate(protos), 256)
        cfg[ctypes.c_int(0)] = cfg.Leaf(self.active)


def _fill(table: Any, items: Iterable[tuple[int, int]], size: int) -> None:
    """Set an array map to `items` (others zero) in one batched update."""
    values = bytearray(size)
    for idx, val in items:
        values[idx] = val
    keys = (ctypes.c_uint32 * size)(*range(size))
    leaves = (table.Leaf * size)(*values)
    table.items_update_batch(keys, leaves)
