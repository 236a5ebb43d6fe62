"""Naming tables for flow record attributes.

Protocol keywords, ICMP/ICMPv6 type and code names are derived from the IANA
registries ("Assigned Internet Protocol Numbers", "ICMP Type Numbers", "ICMPv6
Parameters"), lowercased and, for ICMP, snake_cased. Values without a name render
as their decimal string.
"""

from __future__ import annotations

_TCP_FLAGS = ("fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr")

# IANA protocol keywords, lowercased. 58 (IPv6-ICMP) renders as "icmpv6"; numbers
# without a keyword (61, 63, 68, 99, 114, unassigned, 253/254) are absent.
_TRANSPORT_NAMES: dict[int, str] = {
    0: "hopopt",
    1: "icmp",
    2: "igmp",
    3: "ggp",
    4: "ipv4",
    5: "st",
    6: "tcp",
    7: "cbt",
    8: "egp",
    9: "igp",
    10: "bbn-rcc-mon",
    11: "nvp-ii",
    12: "pup",
    13: "argus",
    14: "emcon",
    15: "xnet",
    16: "chaos",
    17: "udp",
    18: "mux",
    19: "dcn-meas",
    20: "hmp",
    21: "prm",
    22: "xns-idp",
    23: "trunk-1",
    24: "trunk-2",
    25: "leaf-1",
    26: "leaf-2",
    27: "rdp",
    28: "irtp",
    29: "iso-tp4",
    30: "netblt",
    31: "mfe-nsp",
    32: "merit-inp",
    33: "dccp",
    34: "3pc",
    35: "idpr",
    36: "xtp",
    37: "ddp",
    38: "idpr-cmtp",
    39: "tp++",
    40: "il",
    41: "ipv6",
    42: "sdrp",
    43: "ipv6-route",
    44: "ipv6-frag",
    45: "idrp",
    46: "rsvp",
    47: "gre",
    48: "dsr",
    49: "bna",
    50: "esp",
    51: "ah",
    52: "i-nlsp",
    53: "swipe",
    54: "narp",
    55: "min-ipv4",
    56: "tlsp",
    57: "skip",
    58: "icmpv6",
    59: "ipv6-nonxt",
    60: "ipv6-opts",
    62: "cftp",
    64: "sat-expak",
    65: "kryptolan",
    66: "rvd",
    67: "ippc",
    69: "sat-mon",
    70: "visa",
    71: "ipcv",
    72: "cpnx",
    73: "cphb",
    74: "wsn",
    75: "pvp",
    76: "br-sat-mon",
    77: "sun-nd",
    78: "wb-mon",
    79: "wb-expak",
    80: "iso-ip",
    81: "vmtp",
    82: "secure-vmtp",
    83: "vines",
    84: "ttp",
    85: "nsfnet-igp",
    86: "dgp",
    87: "tcf",
    88: "eigrp",
    89: "ospfigp",
    90: "sprite-rpc",
    91: "larp",
    92: "mtp",
    93: "ax.25",
    94: "ipip",
    95: "micp",
    96: "scc-sp",
    97: "etherip",
    98: "encap",
    100: "gmtp",
    101: "ifmp",
    102: "pnni",
    103: "pim",
    104: "aris",
    105: "scps",
    106: "qnx",
    107: "a/n",
    108: "ipcomp",
    109: "snp",
    110: "compaq-peer",
    111: "ipx-in-ip",
    112: "vrrp",
    113: "pgm",
    115: "l2tp",
    116: "ddx",
    117: "iatp",
    118: "stp",
    119: "srp",
    120: "uti",
    121: "smp",
    122: "sm",
    123: "ptp",
    124: "isis",
    125: "fire",
    126: "crtp",
    127: "crudp",
    128: "sscopmce",
    129: "iplt",
    130: "sps",
    131: "pipe",
    132: "sctp",
    133: "fc",
    134: "rsvp-e2e-ignore",
    135: "mobility-header",
    136: "udplite",
    137: "mpls-in-ip",
    138: "manet",
    139: "hip",
    140: "shim6",
    141: "wesp",
    142: "rohc",
    143: "ethernet",
    144: "aggfrag",
    145: "nsh",
}

_ICMPV4_TYPES: dict[int, str] = {
    0: "echo_reply",
    3: "destination_unreachable",
    4: "source_quench",
    5: "redirect",
    6: "alternate_host_address",
    8: "echo_request",
    9: "router_advertisement",
    10: "router_solicitation",
    11: "time_exceeded",
    12: "parameter_problem",
    13: "timestamp",
    14: "timestamp_reply",
    15: "information_request",
    16: "information_reply",
    17: "address_mask_request",
    18: "address_mask_reply",
    30: "traceroute",
    31: "datagram_conversion_error",
    32: "mobile_host_redirect",
    33: "ipv6_where_are_you",
    34: "ipv6_i_am_here",
    35: "mobile_registration_request",
    36: "mobile_registration_reply",
    37: "domain_name_request",
    38: "domain_name_reply",
    39: "skip",
    40: "photuris",
    41: "experimental_mobility",
    42: "extended_echo_request",
    43: "extended_echo_reply",
    253: "experiment_1",
    254: "experiment_2",
}

_NO_CODE: dict[int, str] = {0: ""}

_EXTENDED_ECHO_REPLY_CODES: dict[int, str] = {
    0: "no_error",
    1: "malformed_query",
    2: "no_such_interface",
    3: "no_such_table_entry",
    4: "multiple_interfaces_satisfy_query",
}

_ICMPV4_CODES: dict[int, dict[int, str]] = {
    0: _NO_CODE,
    3: {
        0: "net_unreachable",
        1: "host_unreachable",
        2: "protocol_unreachable",
        3: "port_unreachable",
        4: "fragmentation_needed",
        5: "source_route_failed",
        6: "destination_network_unknown",
        7: "destination_host_unknown",
        8: "source_host_isolated",
        9: "network_administratively_prohibited",
        10: "host_administratively_prohibited",
        11: "network_unreachable_for_tos",
        12: "host_unreachable_for_tos",
        13: "communication_administratively_prohibited",
        14: "host_precedence_violation",
        15: "precedence_cutoff_in_effect",
    },
    4: _NO_CODE,
    5: {
        0: "redirect_for_network",
        1: "redirect_for_host",
        2: "redirect_for_tos_and_network",
        3: "redirect_for_tos_and_host",
    },
    6: {0: "alternate_address_for_host"},
    8: _NO_CODE,
    9: {0: "normal_router_advertisement", 16: "does_not_route_common_traffic"},
    10: _NO_CODE,
    11: {0: "ttl_exceeded_in_transit", 1: "fragment_reassembly_time_exceeded"},
    12: {0: "pointer_indicates_error", 1: "missing_required_option", 2: "bad_length"},
    13: _NO_CODE,
    14: _NO_CODE,
    15: _NO_CODE,
    16: _NO_CODE,
    17: _NO_CODE,
    18: _NO_CODE,
    40: {
        0: "bad_spi",
        1: "authentication_failed",
        2: "decompression_failed",
        3: "decryption_failed",
        4: "need_authentication",
        5: "need_authorization",
    },
    42: {0: "no_error"},
    43: _EXTENDED_ECHO_REPLY_CODES,
}

_ICMPV6_TYPES: dict[int, str] = {
    1: "destination_unreachable",
    2: "packet_too_big",
    3: "time_exceeded",
    4: "parameter_problem",
    128: "echo_request",
    129: "echo_reply",
    130: "multicast_listener_query",
    131: "multicast_listener_report",
    132: "multicast_listener_done",
    133: "router_solicitation",
    134: "router_advertisement",
    135: "neighbor_solicitation",
    136: "neighbor_advertisement",
    137: "redirect_message",
    138: "router_renumbering",
    139: "node_information_query",
    140: "node_information_response",
    141: "inverse_neighbor_discovery_solicitation",
    142: "inverse_neighbor_discovery_advertisement",
    143: "version_2_multicast_listener_report",
    144: "home_agent_address_discovery_request",
    145: "home_agent_address_discovery_reply",
    146: "mobile_prefix_solicitation",
    147: "mobile_prefix_advertisement",
    148: "certification_path_solicitation",
    149: "certification_path_advertisement",
    150: "experimental_mobility",
    151: "multicast_router_advertisement",
    152: "multicast_router_solicitation",
    153: "multicast_router_termination",
    154: "fmipv6",
    155: "rpl_control",
    156: "ilnpv6_locator_update",
    157: "duplicate_address_request",
    158: "duplicate_address_confirmation",
    159: "mpl_control",
    160: "extended_echo_request",
    161: "extended_echo_reply",
}

_ICMPV6_CODES: dict[int, dict[int, str]] = {
    1: {
        0: "no_route_to_destination",
        1: "communication_administratively_prohibited",
        2: "beyond_scope_of_source_address",
        3: "address_unreachable",
        4: "port_unreachable",
        5: "source_address_failed_policy",
        6: "reject_route_to_destination",
        7: "error_in_source_routing_header",
        8: "headers_too_long",
    },
    2: _NO_CODE,
    3: {0: "hop_limit_exceeded_in_transit", 1: "fragment_reassembly_time_exceeded"},
    4: {
        0: "erroneous_header_field",
        1: "unrecognized_next_header",
        2: "unrecognized_ipv6_option",
        3: "incomplete_header_chain",
        4: "sr_upper_layer_header_error",
        5: "unrecognized_next_header_by_intermediate_node",
        6: "extension_header_too_big",
        7: "extension_header_chain_too_long",
        8: "too_many_extension_headers",
        9: "too_many_options_in_extension_header",
        10: "option_too_big",
    },
    128: _NO_CODE,
    129: _NO_CODE,
    130: _NO_CODE,
    131: _NO_CODE,
    132: _NO_CODE,
    133: _NO_CODE,
    134: _NO_CODE,
    135: _NO_CODE,
    136: _NO_CODE,
    137: _NO_CODE,
    138: {
        0: "router_renumbering_command",
        1: "router_renumbering_result",
        255: "sequence_number_reset",
    },
    139: {0: "subject_is_ipv6_address", 1: "subject_is_name", 2: "subject_is_ipv4_address"},
    140: {0: "successful_reply", 1: "refused", 2: "unknown_qtype"},
    141: _NO_CODE,
    142: _NO_CODE,
    143: _NO_CODE,
    144: _NO_CODE,
    145: _NO_CODE,
    146: _NO_CODE,
    147: _NO_CODE,
    148: _NO_CODE,
    149: _NO_CODE,
    151: _NO_CODE,
    152: _NO_CODE,
    153: _NO_CODE,
    160: {0: "no_error"},
    161: _EXTENDED_ECHO_REPLY_CODES,
}

# Request/reply message pairs used to infer which side is the client.
_ICMPV4_REQUESTS = frozenset({8, 13, 15, 17})
_ICMPV4_REPLIES = frozenset({0, 14, 16, 18})
_ICMPV6_REQUESTS = frozenset({128, 130, 133, 135, 139})
_ICMPV6_REPLIES = frozenset({129, 131, 134, 136, 140})

_DSCP_NAMES: dict[int, str] = {
    0: "df",
    1: "le",
    8: "cs1",
    10: "af11",
    12: "af12",
    14: "af13",
    16: "cs2",
    18: "af21",
    20: "af22",
    22: "af23",
    24: "cs3",
    26: "af31",
    28: "af32",
    30: "af33",
    32: "cs4",
    34: "af41",
    36: "af42",
    38: "af43",
    40: "cs5",
    44: "voice",
    45: "nqb",
    46: "ef",
    48: "cs6",
    56: "cs7",
}

_ECN_NAMES: dict[int, str] = {0: "non-ect", 1: "ect1", 2: "ect0", 3: "ce"}


def tcp_flag_tags(bits: int) -> list[str]:
    """Names of the TCP flags set in ``bits``, in order fin,syn,rst,psh,ack,urg,ece,cwr."""
    return [name for i, name in enumerate(_TCP_FLAGS) if bits & (1 << i)]


def transport_name(proto: int) -> str:
    """Lowercase IANA keyword of an IP protocol number (58 is ``icmpv6``)."""
    return _TRANSPORT_NAMES.get(proto, str(proto))


def _icmp_version(version: int) -> bool:
    """Return True for ICMPv6 (IP version 6), False for ICMPv4; reject anything else."""
    if version not in (4, 6):
        raise ValueError(f"IP version must be 4 or 6, got {version}")
    return version == 6


def icmp_type_name(version: int, type_: int) -> str:
    """Snake_case name of an ICMP (``version`` 4) or ICMPv6 (6) message type."""
    types = _ICMPV6_TYPES if _icmp_version(version) else _ICMPV4_TYPES
    return types.get(type_, str(type_))


def icmp_code_name(version: int, type_: int, code: int) -> str:
    """Snake_case name of an ICMP/ICMPv6 code; ``""`` for the code of a code-less type."""
    codes = _ICMPV6_CODES if _icmp_version(version) else _ICMPV4_CODES
    name = codes.get(type_, {}).get(code)
    return str(code) if name is None else name


def icmp_is_request(version: int, type_: int) -> bool | None:
    """True for a request type, False for its reply, None for one-way/error types."""
    if _icmp_version(version):
        requests, replies = _ICMPV6_REQUESTS, _ICMPV6_REPLIES
    else:
        requests, replies = _ICMPV4_REQUESTS, _ICMPV4_REPLIES
    if type_ in requests:
        return True
    if type_ in replies:
        return False
    return None


def dscp_name(dscp: int) -> str:
    """Lowercase DSCP name (0 ``df``, 46 ``ef``, ...) or the decimal value."""
    return _DSCP_NAMES.get(dscp, str(dscp))


def ecn_name(ecn: int) -> str:
    """ECN codepoint name: ``non-ect``, ``ect1``, ``ect0`` or ``ce``."""
    return _ECN_NAMES.get(ecn, str(ecn))
