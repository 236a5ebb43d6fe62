"""Community ID v1 against the Corelight spec's baseline data, pcaps and vectors."""

from __future__ import annotations

import gzip
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dpkt
import pytest

from mermin_cli.flows.community_id import community_id

# Baseline file, seed, base64 output.
_BASELINES = [
    ("baseline_deflt.json", 0, True),
    ("baseline_seed1.json", 1, True),
    ("baseline_nob64.json", 0, False),
]

_PCAPS = [
    "icmp.pcap",
    "icmp6.pcap",
    "ipv6.pcap",
    "rsvp.pcap",
    "sctp.pcap",
    "tcp.pcap",
    "udp.pcap",
    "combined.pcap.gz",
]

FlowTuple = tuple[int, bytes, bytes, int | None, int | None]


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


A4, B4 = _packed("1.2.3.4"), _packed("5.6.7.8")
A6 = _packed("fe80:1:203:405:607:809:a0b:c0d")
B6 = _packed("fe80:1011:1213:1415:1617:1819:1a1b:1c1d")


def _load(data_dir: Path, name: str) -> list[dict[str, Any]]:
    entries = json.loads((data_dir / name).read_text())
    assert entries, f"{name} is empty"
    return entries


def _entry_id(entry: dict[str, Any], seed: int, b64: bool) -> str:
    return community_id(
        entry["proto"],
        _packed(entry["saddr"]),
        _packed(entry["daddr"]),
        entry["sport"],
        entry["dport"],
        seed,
        b64=b64,
    )


@pytest.mark.parametrize(("name", "seed", "b64"), _BASELINES)
def test_baseline(community_id_data: Path, name: str, seed: int, b64: bool) -> None:
    entries = _load(community_id_data, name)
    mismatches = [
        (entry, got)
        for entry in entries
        if (got := _entry_id(entry, seed, b64)) != entry["communityid"]
    ]
    assert mismatches == []


def _packet_tuples(path: Path) -> Iterator[FlowTuple]:
    """Yield (proto, saddr, daddr, sport, dport) of every IP packet; ICMP gives type/code."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        reader = dpkt.pcap.Reader(fh)
        assert reader.datalink() == dpkt.pcap.DLT_EN10MB
        for _ts, buf in reader:
            ip = dpkt.ethernet.Ethernet(buf).data
            if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6):
                continue  # ARP
            l4 = ip.data
            if isinstance(l4, dpkt.tcp.TCP | dpkt.udp.UDP | dpkt.sctp.SCTP):
                yield ip.p, ip.src, ip.dst, l4.sport, l4.dport
            elif isinstance(l4, dpkt.icmp.ICMP | dpkt.icmp6.ICMP6):
                yield ip.p, ip.src, ip.dst, l4.type, l4.code
            else:
                assert ip.p not in (1, 6, 17, 58, 132), f"unparsed transport {ip.p} in {path}"
                yield ip.p, ip.src, ip.dst, None, None


def _baseline_by_key(data_dir: Path) -> dict[tuple[int, bytes, bytes, int | None], str]:
    """Baseline ids keyed by (proto, saddr, daddr, sport); sport is the ICMP type.

    The baseline's dport for ICMP is the counterpart type rather than the packet's code,
    so the key leaves it out; the assertion below proves the key is still unique.
    """
    entries = _load(data_dir, "baseline_deflt.json")
    table = {
        (e["proto"], _packed(e["saddr"]), _packed(e["daddr"]), e["sport"]): e["communityid"]
        for e in entries
    }
    assert len(table) == len(entries)
    return table


def test_every_pcap_is_covered(community_id_data: Path) -> None:
    found = {p.name for p in community_id_data.iterdir() if p.name.endswith((".pcap", ".pcap.gz"))}
    assert found == {*_PCAPS, "arp.pcap"}


@pytest.mark.parametrize("name", _PCAPS)
def test_pcap_packets_match_baseline(community_id_data: Path, name: str) -> None:
    data_dir = community_id_data
    baseline = _baseline_by_key(data_dir)
    seen = 0
    for proto, saddr, daddr, sport, dport in _packet_tuples(data_dir / name):
        expected = baseline[(proto, saddr, daddr, sport)]
        assert community_id(proto, saddr, daddr, sport, dport) == expected
        seen += 1
    assert seen > 0


def test_combined_pcap_yields_exactly_the_baseline_ids(community_id_data: Path) -> None:
    data_dir = community_id_data
    ids = {community_id(*tpl) for tpl in _packet_tuples(data_dir / "combined.pcap.gz")}
    baseline = {e["communityid"] for e in _load(data_dir, "baseline_deflt.json")}
    assert ids == baseline


def test_arp_pcap_has_no_ip_packets(community_id_data: Path) -> None:
    assert list(_packet_tuples(community_id_data / "arp.pcap")) == []


@pytest.mark.parametrize(
    ("args", "seed", "expected"),
    [
        ((6, A4, B4, 1122, 3344), 0, "1:wCb3OG7yAFWelaUydu0D+125CLM="),
        ((6, B4, A4, 3344, 1122), 0, "1:wCb3OG7yAFWelaUydu0D+125CLM="),
        ((17, A4, B4, 1122, 3344), 0, "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg="),
        ((132, A4, B4, 1122, 3344), 0, "1:EKt4MsxuyaE6mL+hmrEkQ9csDD8="),
        ((1, A4, B4, 8, 0), 0, "1:crodRHL2FEsHjbv3UkRrfbs4bZ0="),
        ((1, B4, A4, 0, 0), 0, "1:crodRHL2FEsHjbv3UkRrfbs4bZ0="),
        ((1, A4, B4, 11, 0), 0, "1:f/YiSyWqczrTgfUCZlBUnvHRcPk="),
        ((58, A6, B6, 128, 0), 0, "1:0bf7hyMJUwt3fMED7z8LIfRpBeo="),
        ((58, B6, A6, 129, 0), 0, "1:0bf7hyMJUwt3fMED7z8LIfRpBeo="),
        ((58, A6, B6, 146, 0), 0, "1:fYC8+pz24E+EhANP1EZhpX0Dw10="),
        ((6, A4, B4, 1122, 3344), 1, "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk="),
        ((46, A4, B4, None, None), 0, "1:ikv3kmf89luf73WPz1jOs49S768="),
        ((46, B4, A4, None, None), 0, "1:ikv3kmf89luf73WPz1jOs49S768="),
    ],
    ids=[
        "tcp",
        "tcp-reversed",
        "udp",
        "sctp",
        "icmp-echo",
        "icmp-echo-reply",
        "icmp-time-exceeded",
        "icmpv6-echo",
        "icmpv6-echo-reply",
        "icmpv6-146-one-way",
        "tcp-seed1",
        "rsvp",
        "rsvp-reversed",
    ],
)
def test_reference_vectors(args: FlowTuple, seed: int, expected: str) -> None:
    assert community_id(*args, seed) == expected


def test_portless_protocol_hashes_no_ports() -> None:
    spec = community_id(46, A4, B4, None, None)
    assert community_id(46, A4, B4, 0, 0) == spec
    assert community_id(46, A4, B4, 1, 2) == spec
    assert spec != "1:hZHQjvhiT2t0BQWM3zNp/Kq7jHw="  # Mermin (Rust) appends zero ports


def test_one_way_icmp_is_not_reordered() -> None:
    assert community_id(1, A4, B4, 11, 0) != community_id(1, B4, A4, 11, 0)
    assert community_id(58, A6, B6, 146, 0) != community_id(58, B6, A6, 146, 0)


@pytest.mark.parametrize(
    ("proto", "request_type", "reply_type"),
    [
        (1, 8, 0),
        (1, 13, 14),
        (1, 15, 16),
        (1, 10, 9),
        (1, 17, 18),
        (58, 128, 129),
        (58, 130, 131),
        (58, 133, 134),
        (58, 135, 136),
        (58, 139, 140),
        (58, 144, 145),
    ],
)
def test_icmp_pairs_share_an_id(proto: int, request_type: int, reply_type: int) -> None:
    a, b = (A4, B4) if proto == 1 else (A6, B6)
    assert community_id(proto, a, b, request_type, 0) == community_id(proto, b, a, reply_type, 0)


def test_equal_addresses_order_by_port() -> None:
    assert community_id(6, A4, A4, 80, 1234) == community_id(6, A4, A4, 1234, 80)


def test_spec_readme_example_is_direction_free() -> None:
    a, b = _packed("10.0.0.1"), _packed("127.0.0.1")
    assert community_id(6, a, b, 1234, 80) == community_id(6, b, a, 80, 1234)


def test_hex_output() -> None:
    value = community_id(6, A4, B4, 1122, 3344, b64=False)
    assert value.startswith("1:")
    assert len(value) == 42
    assert set(value[2:]) <= set("0123456789abcdef")


@pytest.mark.parametrize(
    "args",
    [
        (6, b"\x01\x02\x03", B4, 1, 2, 0),
        (6, A4, A6, 1, 2, 0),
        (6, A6, A4, 1, 2, 0),
        (6, A4, B4, 1, 2, -1),
        (6, A4, B4, 1, 2, 65536),
        (6, A4, B4, None, 2, 0),
        (17, A4, B4, 1, None, 0),
        (1, A4, B4, None, None, 0),
        (6, A4, B4, 70000, 2, 0),
        (6, A4, B4, 1, -1, 0),
        (256, A4, B4, None, None, 0),
        (-1, A4, B4, None, None, 0),
    ],
    ids=[
        "short-address",
        "v4-v6",
        "v6-v4",
        "seed-negative",
        "seed-too-big",
        "tcp-no-sport",
        "udp-no-dport",
        "icmp-no-type",
        "port-too-big",
        "port-negative",
        "proto-too-big",
        "proto-negative",
    ],
)
def test_invalid_input_raises(args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        community_id(*args)
