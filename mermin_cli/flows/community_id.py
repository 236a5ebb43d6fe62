"""Community ID v1 flow hashing, per the Corelight specification.

Spec: https://github.com/corelight/community-id-spec (reference implementation:
pycommunityid). The hash input is ``seed(2) . saddr . daddr . proto(1) . 0x00``
followed by ``sport(2) . dport(2)`` for TCP, UDP, SCTP, ICMP and ICMPv6 only; every
other protocol hashes no port bytes. All fields are big-endian.

Endpoints are ordered so the smaller address (equal addresses: smaller port) comes
first. For ICMP/ICMPv6 the port slots carry the message type and code: a type with a
request/reply counterpart uses ``(type, counterpart type)``, any other type uses
``(type, code)`` and is treated as one-way, i.e. its endpoints are never reordered.
"""

from __future__ import annotations

import base64
import hashlib
import struct

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132

_PORT_PROTOS = frozenset({PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6, PROTO_SCTP})


def _symmetric(*pairs: tuple[int, int]) -> dict[int, int]:
    """Map each type of every (a, b) pair to the other one."""
    table: dict[int, int] = {}
    for a, b in pairs:
        table[a] = b
        table[b] = a
    return table


# Echo, timestamp, information, router solicitation/advertisement, address mask.
_ICMPV4_COUNTERPART = _symmetric((8, 0), (13, 14), (15, 16), (10, 9), (17, 18))
# Echo, MLD query/report, router and neighbor discovery, node information (WRU),
# home agent address discovery.
_ICMPV6_COUNTERPART = _symmetric(
    (128, 129), (130, 131), (133, 134), (135, 136), (139, 140), (144, 145)
)


def community_id(
    proto: int,
    saddr: bytes,
    daddr: bytes,
    sport: int | None,
    dport: int | None,
    seed: int = 0,
    *,
    b64: bool = True,
) -> str:
    """Return the Community ID v1 string (``"1:..."``) of a flow tuple.

    ``saddr``/``daddr`` are packed addresses of one family (4 or 16 bytes). For TCP,
    UDP and SCTP ``sport``/``dport`` are the ports; for ICMP (1) and ICMPv6 (58) they
    are the message type and code. Ports of any other protocol are ignored. With
    ``b64=False`` the digest is rendered as hex instead of base64.

    Raises ValueError on malformed input.
    """
    if not 0 <= proto <= 255:
        raise ValueError(f"IP protocol must be in 0..255, got {proto}")
    if len(saddr) not in (4, 16) or len(daddr) not in (4, 16):
        raise ValueError(
            f"addresses must be 4 (IPv4) or 16 (IPv6) bytes, got {len(saddr)} and {len(daddr)}"
        )
    if len(saddr) != len(daddr):
        raise ValueError("source and destination addresses are of different families")
    if not 0 <= seed <= 0xFFFF:
        raise ValueError(f"seed must be in 0..65535, got {seed}")

    ports = b""
    if proto in _PORT_PROTOS:
        if sport is None or dport is None:
            raise ValueError(f"IP protocol {proto} needs both ports (ICMP: type and code)")
        if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
            raise ValueError(f"ports must be in 0..65535, got {sport} and {dport}")
        one_way = False
        if proto in (PROTO_ICMP, PROTO_ICMPV6):
            table = _ICMPV4_COUNTERPART if proto == PROTO_ICMP else _ICMPV6_COUNTERPART
            counterpart = table.get(sport)
            if counterpart is None:
                one_way = True
            else:
                dport = counterpart
        if not one_way and (daddr, dport) < (saddr, sport):
            saddr, daddr, sport, dport = daddr, saddr, dport, sport
        ports = struct.pack("!HH", sport, dport)
    elif daddr < saddr:
        saddr, daddr = daddr, saddr

    data = struct.pack("!H", seed) + saddr + daddr + struct.pack("!BB", proto, 0) + ports
    digest = hashlib.sha1(data, usedforsecurity=False).digest()
    rendered = base64.b64encode(digest).decode("ascii") if b64 else digest.hex()
    return "1:" + rendered
