"""Naming tables for flow record attributes."""

from __future__ import annotations

import pytest

from mermin_cli.flows.names import (
    dscp_name,
    ecn_name,
    icmp_code_name,
    icmp_is_request,
    icmp_type_name,
    tcp_flag_tags,
    transport_name,
)


@pytest.mark.parametrize(
    ("bits", "tags"),
    [
        (0x00, []),
        (0x01, ["fin"]),
        (0x02, ["syn"]),
        (0x12, ["syn", "ack"]),
        (0x11, ["fin", "ack"]),
        (0x14, ["rst", "ack"]),
        (0x18, ["psh", "ack"]),
        (0xC2, ["syn", "ece", "cwr"]),
        (0xFF, ["fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr"]),
    ],
)
def test_tcp_flag_tags(bits: int, tags: list[str]) -> None:
    assert tcp_flag_tags(bits) == tags


@pytest.mark.parametrize(
    ("proto", "name"),
    [
        (0, "hopopt"),
        (1, "icmp"),
        (2, "igmp"),
        (4, "ipv4"),
        (6, "tcp"),
        (17, "udp"),
        (33, "dccp"),
        (41, "ipv6"),
        (46, "rsvp"),
        (47, "gre"),
        (50, "esp"),
        (51, "ah"),
        (58, "icmpv6"),
        (89, "ospfigp"),
        (94, "ipip"),
        (103, "pim"),
        (112, "vrrp"),
        (115, "l2tp"),
        (132, "sctp"),
        (136, "udplite"),
        (143, "ethernet"),
        (61, "61"),
        (200, "200"),
        (253, "253"),
        (255, "255"),
    ],
)
def test_transport_name(proto: int, name: str) -> None:
    assert transport_name(proto) == name


@pytest.mark.parametrize(
    ("version", "type_", "name"),
    [
        (4, 0, "echo_reply"),
        (4, 3, "destination_unreachable"),
        (4, 5, "redirect"),
        (4, 8, "echo_request"),
        (4, 11, "time_exceeded"),
        (4, 12, "parameter_problem"),
        (4, 13, "timestamp"),
        (4, 14, "timestamp_reply"),
        (4, 1, "1"),
        (4, 200, "200"),
        (6, 1, "destination_unreachable"),
        (6, 2, "packet_too_big"),
        (6, 3, "time_exceeded"),
        (6, 4, "parameter_problem"),
        (6, 128, "echo_request"),
        (6, 129, "echo_reply"),
        (6, 130, "multicast_listener_query"),
        (6, 133, "router_solicitation"),
        (6, 134, "router_advertisement"),
        (6, 135, "neighbor_solicitation"),
        (6, 136, "neighbor_advertisement"),
        (6, 143, "version_2_multicast_listener_report"),
        (6, 8, "8"),
        (6, 0, "0"),
    ],
)
def test_icmp_type_name(version: int, type_: int, name: str) -> None:
    assert icmp_type_name(version, type_) == name


@pytest.mark.parametrize(
    ("version", "type_", "code", "name"),
    [
        (4, 8, 0, ""),
        (4, 0, 0, ""),
        (4, 8, 5, "5"),
        (4, 3, 0, "net_unreachable"),
        (4, 3, 1, "host_unreachable"),
        (4, 3, 3, "port_unreachable"),
        (4, 3, 4, "fragmentation_needed"),
        (4, 3, 13, "communication_administratively_prohibited"),
        (4, 3, 16, "16"),
        (4, 11, 0, "ttl_exceeded_in_transit"),
        (4, 11, 1, "fragment_reassembly_time_exceeded"),
        (4, 5, 1, "redirect_for_host"),
        (4, 200, 0, "0"),
        (6, 128, 0, ""),
        (6, 129, 0, ""),
        (6, 135, 0, ""),
        (6, 2, 0, ""),
        (6, 1, 0, "no_route_to_destination"),
        (6, 1, 3, "address_unreachable"),
        (6, 1, 4, "port_unreachable"),
        (6, 3, 0, "hop_limit_exceeded_in_transit"),
        (6, 4, 1, "unrecognized_next_header"),
        (6, 1, 99, "99"),
    ],
)
def test_icmp_code_name(version: int, type_: int, code: int, name: str) -> None:
    assert icmp_code_name(version, type_, code) == name


@pytest.mark.parametrize(
    ("version", "type_", "expected"),
    [
        (4, 8, True),
        (4, 13, True),
        (4, 15, True),
        (4, 17, True),
        (4, 0, False),
        (4, 14, False),
        (4, 16, False),
        (4, 18, False),
        (4, 3, None),
        (4, 11, None),
        (6, 128, True),
        (6, 130, True),
        (6, 133, True),
        (6, 135, True),
        (6, 139, True),
        (6, 129, False),
        (6, 131, False),
        (6, 134, False),
        (6, 136, False),
        (6, 140, False),
        (6, 1, None),
        (6, 2, None),
        (6, 8, None),
    ],
)
def test_icmp_is_request(version: int, type_: int, expected: bool | None) -> None:
    assert icmp_is_request(version, type_) is expected


@pytest.mark.parametrize("version", [0, 1, 5, 58])
def test_icmp_rejects_unknown_ip_version(version: int) -> None:
    with pytest.raises(ValueError):
        icmp_type_name(version, 0)
    with pytest.raises(ValueError):
        icmp_code_name(version, 0, 0)
    with pytest.raises(ValueError):
        icmp_is_request(version, 0)


@pytest.mark.parametrize(
    ("dscp", "name"),
    [
        (0, "df"),
        (1, "le"),
        (8, "cs1"),
        (10, "af11"),
        (34, "af41"),
        (44, "voice"),
        (45, "nqb"),
        (46, "ef"),
        (48, "cs6"),
        (56, "cs7"),
        (2, "2"),
        (63, "63"),
    ],
)
def test_dscp_name(dscp: int, name: str) -> None:
    assert dscp_name(dscp) == name


def test_dscp_names_are_the_documented_set() -> None:
    names = [dscp_name(value) for value in range(64)]
    assert [n for n in names if not n.isdigit()] == [
        "df",
        "le",
        "cs1",
        "af11",
        "af12",
        "af13",
        "cs2",
        "af21",
        "af22",
        "af23",
        "cs3",
        "af31",
        "af32",
        "af33",
        "cs4",
        "af41",
        "af42",
        "af43",
        "cs5",
        "voice",
        "nqb",
        "ef",
        "cs6",
        "cs7",
    ]


@pytest.mark.parametrize(
    ("ecn", "name"), [(0, "non-ect"), (1, "ect1"), (2, "ect0"), (3, "ce"), (4, "4")]
)
def test_ecn_name(ecn: int, name: str) -> None:
    assert ecn_name(ecn) == name
