"""numpy mirrors of the C structs in bpf/flow.c (checked against BCC's sizes at load)."""

from __future__ import annotations

import numpy as np

from mermin_cli.engine.compiler import EVENT_BYTES

KEY_DTYPE = np.dtype(
    [
        ("lo_addr", "V16"),
        ("hi_addr", "V16"),
        ("lo_port", "<u2"),
        ("hi_port", "<u2"),
        ("ifindex", "<u4"),
        ("proto", "u1"),
        ("ip_ver", "u1"),
        ("pad", "<u2"),
    ]
)

STATS_DTYPE = np.dtype(
    [
        ("packets", "<u8", (2,)),
        ("bytes", "<u8", (2,)),
        ("first_ns", "<u8"),
        ("last_ns", "<u8"),
        ("tcp_flags", "u1", (2,)),
        ("first_dir", "u1"),
        ("first_hook", "u1"),
        ("syn_dir", "u1"),
        ("synack_dir", "u1"),
        ("meta_seen", "u1"),
        ("flags", "u1"),
        ("ttl", "u1", (2,)),
        ("tos", "u1", (2,)),
        ("icmp_type", "u1", (2,)),
        ("icmp_code", "u1", (2,)),
        ("flow_label", "<u4", (2,)),
        ("vlan_id", "<u2"),
        ("mac", "V6"),
        ("syn_ns", "<u8"),
        ("synack_ns", "<u8"),
    ]
)

# struct flow_slot: one slot of the open-addressing flow table
SLOT_DTYPE = np.dtype(
    [
        ("key", KEY_DTYPE),
        ("pad0", "<u4"),
        ("pad1", "<u8", (2,)),
        ("stats", STATS_DTYPE),
        ("pad2", "<u8", (4,)),
    ]
)
# A slot's control word in `flow_ctl` is hash << 32 | state (bpf/flow.c).
SLOT_EMPTY, SLOT_FULL, SLOT_DELETED, SLOT_CLAIMED = 0, 1, 2, 3
SLOT_STATE = 3  # the state's bits

DIR_NONE = 0xFF
FLOW_F_FRAGMENT = 0x01
HOOK_EGRESS = 1

# Per-CPU counter slots, in the order of the enum in bpf/flow.c.
COUNTERS = (
    "packets",
    "non_ip",
    "truncated",
    "fragment",
    "ipv6_ext_limit",
    "new_flows",
    "insert_race",
    "map_full",
    "map_full_bytes",
    "filtered_flows",
    "filtered_packets",
    "events_dropped",
    "cache_lost",
)

EVENT_DTYPE = np.dtype(
    [
        ("key", KEY_DTYPE),
        ("ip_len", "<u4"),
        ("ts", "<u8"),  # converted to ns by EventRings.read(), like the table's times
        ("first_dir", "u1"),
        ("syn_dir", "u1"),
        ("synack_dir", "u1"),
        ("icmp_type", "u1"),
        ("icmp_code", "u1"),
        ("pad", "u1", (3,)),
    ]
)

PROGRAMS = {
    # l3 device? -> function name in bpf/flow.c (one program serves both hooks)
    False: "mermin_l2",
    True: "mermin_l3",
}

assert KEY_DTYPE.itemsize == 44 and STATS_DTYPE.itemsize == 96 and SLOT_DTYPE.itemsize == 192
assert EVENT_DTYPE.itemsize == EVENT_BYTES
