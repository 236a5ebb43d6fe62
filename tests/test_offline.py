"""`mermin capture --read`: pcaps through the kernel program, times from the recording.

Oracles: the Community ID spec's baseline for its pcaps; pcaps written here with dpkt
whose flows, timeouts and interim records are known exactly; and a live capture of the
same traffic that tcpdump wrote to the pcap read back.
"""

from __future__ import annotations

import gzip
import itertools
import json
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import dpkt
import pytest

try:  # tests/ as a package, or (default) as a plain directory on sys.path
    from .capture_run import MERMIN, start_capture, start_tcpdump, write_config
    from .test_capture import UDP_SEND, tcp_exchange
except ImportError:
    from capture_run import MERMIN, start_capture, start_tcpdump, write_config
    from test_capture import UDP_SEND, tcp_exchange

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("require_bpf")]

T0 = 1_700_000_000  # seconds: the recordings start here
NS = 1_000_000_000
C4, S4 = "10.203.50.1", "10.203.50.2"
C6, S6 = "fd00:203:50::1", "fd00:203:50::2"
MAC_C, MAC_S = bytes.fromhex("02cb00320001"), bytes.fromhex("02cb00320002")
SYN, ACK, FIN, PSH = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_FIN, dpkt.tcp.TH_PUSH

OFFLINE_CONFIG = """
span {
  max_record_interval = "60s"
  udp_timeout         = "60s"
  icmp_timeout        = "10s"
  tcp_fin_timeout     = "5s"
  community_id_seed   = %(seed)d
}
pipeline {
  flow_producer { flow_store_poll_interval = "1s" }
}
"""


def read(
    path: str | Path, tmp: Path, *args: str, seed: int = 0, stdin: bytes | None = None
) -> tuple[int, list[dict[str, Any]], str]:
    """Run `mermin capture --read` (NDJSON); returns exit status, records, stderr."""
    cfg = tmp / f"offline-{seed}.hcl"
    cfg.write_text(OFFLINE_CONFIG % {"seed": seed})
    res = subprocess.run(
        [MERMIN, "capture", "--read", str(path), "-o", "json", "-c", str(cfg), *args],
        input=stdin,
        capture_output=True,
        timeout=120,
    )
    records = [json.loads(line) for line in res.stdout.decode().splitlines()]
    return res.returncode, records, res.stderr.decode()


# --- packets -------------------------------------------------------------------------------


def ip4(src: str, dst: str, l4: dpkt.Packet, proto: int) -> dpkt.ip.IP:
    pkt = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, data=l4)
    pkt.len = len(pkt)
    return pkt


def ip6(src: str, dst: str, l4: dpkt.Packet, nxt: int) -> dpkt.ip6.IP6:
    return dpkt.ip6.IP6(
        src=socket.inet_pton(socket.AF_INET6, src),
        dst=socket.inet_pton(socket.AF_INET6, dst),
        nxt=nxt,
        hlim=64,
        data=l4,
        plen=len(l4),
    )


def tcp(sport: int, dport: int, flags: int, payload: int = 0) -> dpkt.tcp.TCP:
    return dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, data=b"t" * payload)


def udp(sport: int, dport: int, payload: int = 100) -> dpkt.udp.UDP:
    return dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + payload, data=b"u" * payload)


def eth(ip: dpkt.Packet, from_client: bool = True) -> bytes:
    src, dst = (MAC_C, MAC_S) if from_client else (MAC_S, MAC_C)
    kind = dpkt.ethernet.ETH_TYPE_IP6 if isinstance(ip, dpkt.ip6.IP6) else dpkt.ethernet.ETH_TYPE_IP
    return bytes(dpkt.ethernet.Ethernet(src=src, dst=dst, type=kind, data=ip))


Packet = tuple[Decimal, bytes, int]  # (seconds since T0, frame, wire length)


def write_pcap(
    path: Path,
    packets: list[Packet],
    linktype: int = dpkt.pcap.DLT_EN10MB,
    unit: str = "ns",
    order: str = "<",
) -> None:
    """A classic pcap (nanosecond or microsecond times, little- or big-endian); a frame
    shorter than its wire length is a snaplen cut."""
    magic = 0xA1B23C4D if unit == "ns" else 0xA1B2C3D4
    per_s = NS if unit == "ns" else 1_000_000
    with path.open("wb") as fh:
        fh.write(struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype))
        for at, frame, wire in packets:
            frac = int(at * per_s)
            fh.write(struct.pack(order + "IIII", T0 + frac // per_s, frac % per_s,
                                 len(frame), wire) + frame)  # fmt: skip


def ns_at(seconds: float | Decimal) -> int:
    return T0 * NS + int(Decimal(seconds) * NS)


# --- Community ID: the spec's pcaps --------------------------------------------------------


BASELINES = [(0, "baseline_deflt.json"), (1, "baseline_seed1.json")]


@pytest.mark.parametrize(("seed", "baseline"), BASELINES)
def test_community_ids_equal_the_spec_baseline(
    tmp_path: Path, community_id_data: Path, seed: int, baseline: str
) -> None:
    data = community_id_data
    code, records, err = read(data / "combined.pcap.gz", tmp_path, seed=seed)
    assert code == 0, err
    entries = json.loads((data / baseline).read_text())
    by_sender = {
        (e["proto"], e["saddr"], e["daddr"], e["sport"]): e["communityid"] for e in entries
    }
    by_pair: dict[tuple[int, frozenset[str]], set[str]] = {}
    for e in entries:
        by_pair.setdefault((e["proto"], frozenset((e["saddr"], e["daddr"]))), set()).add(
            e["communityid"]
        )
    assert len(records) >= 10
    for r in records:
        a = r["attributes"]
        src, dst = a["source.address"], a["destination.address"]
        proto = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmpv6": 58, "rsvp": 46}[
            a["network.transport"]
        ]
        if proto in (6, 17, 132):  # the initiator's packets carry the flow's ID
            assert a["flow.community_id"] == by_sender[(proto, src, dst, a["source.port"])], r
        else:  # ICMP, port-less: the ID of the flow's first packet, whichever way it went
            assert a["flow.community_id"] in by_pair[(proto, frozenset((src, dst)))], r
    missing = {e["communityid"] for e in entries} - {
        r["attributes"]["flow.community_id"] for r in records
    }
    # Only a neighbour solicitation answering one in the other direction: the kernel keys
    # both directions of an ICMP request/reply pair as one flow, named by its first packet.
    assert all(e["proto"] == 58 for e in entries if e["communityid"] in missing)
    assert len(missing) <= 1


# --- generated recordings ------------------------------------------------------------------


def scenario() -> list[Packet]:
    """Known flows, one per behaviour under test (times in seconds since T0)."""
    pkts: list[tuple[Decimal, dpkt.Packet | bytes, bool]] = []

    def add(at: str | int, ip: dpkt.Packet | bytes, from_client: bool = True) -> None:
        pkts.append((Decimal(at), ip, from_client))

    # TCP handshake, request, response, FIN both ways: closed 5 s later (tcp_fin_timeout).
    add("0.000", ip4(C4, S4, tcp(40000, 80, SYN), 6))
    add("0.001", ip4(S4, C4, tcp(80, 40000, SYN | ACK), 6), False)
    add("0.002", ip4(C4, S4, tcp(40000, 80, ACK), 6))
    add("0.003", ip4(C4, S4, tcp(40000, 80, PSH | ACK, 100), 6))
    add("0.004", ip4(S4, C4, tcp(80, 40000, PSH | ACK, 300), 6), False)
    add("0.005", ip4(C4, S4, tcp(40000, 80, FIN | ACK), 6))
    add("0.006", ip4(S4, C4, tcp(80, 40000, FIN | ACK), 6), False)
    add("0.007", ip4(C4, S4, tcp(40000, 80, ACK), 6))
    # UDP with a 70 s gap: two flows (udp_timeout 60 s). Each part's packets share one
    # timestamp: a flow active for any time reaches its max_record_interval boundary
    # (first + 60 s) before its idle timeout (last + 60 s) and ends with an interim record.
    add(1, ip4(C4, S4, udp(5000, 53), 17))
    add(1, ip4(C4, S4, udp(5000, 53), 17))
    add(71, ip4(C4, S4, udp(5000, 53), 17))
    add(71, ip4(S4, C4, udp(53, 5000, 20), 17), False)
    # A 150 s UDP flow, one packet a second: interim records at 60 s and 120 s.
    for t in range(10, 160):
        add(t, ip4(C4, S4, udp(6000, 6001, 10), 17))
    # ICMP echo and reply; one IPv6 UDP packet.
    echo = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=7, seq=1, data=b"p" * 56))
    reply = dpkt.icmp.ICMP(type=0, data=dpkt.icmp.ICMP.Echo(id=7, seq=1, data=b"p" * 56))
    add("3.000", ip4(C4, S4, echo, 1))
    add("3.001", ip4(S4, C4, reply, 1), False)
    add(4, ip6(C6, S6, udp(7000, 7001), 17))
    pkts.sort(key=lambda p: p[0])
    out: list[Packet] = [(at, eth(ip, fc), len(eth(ip, fc))) for at, ip, fc in pkts]
    # A 10-byte frame (shorter than an Ethernet header: truncated), an ARP request (non-IP),
    # and a packet of 1042 bytes captured with a 100-byte snaplen.
    arp = dpkt.ethernet.Ethernet(src=MAC_C, dst=b"\xff" * 6, type=0x0806, data=b"\0" * 28)
    big = eth(ip4(C4, S4, udp(8000, 8001, 1000), 17))
    out += [(Decimal("5.0"), b"\x02" * 10, 10), (Decimal("5.1"), bytes(arp), 42)]
    out.append((Decimal("5.2"), big[:100], len(big)))
    out.sort(key=lambda p: p[0])
    return out


@pytest.fixture(scope="module")
def scenario_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], str]:
    tmp = tmp_path_factory.mktemp("scenario")
    write_pcap(tmp / "scenario.pcap", scenario())
    code, records, err = read(tmp / "scenario.pcap", tmp)
    assert code == 0, err
    return records, err


def flow(records: list[dict[str, Any]], sport: int, **attrs: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r["attributes"]["source.port"] == sport
        and all(r["attributes"].get(k) == v for k, v in attrs.items())
    ]


def counts(r: dict[str, Any]) -> tuple[int, int, int, int]:
    a = r["attributes"]
    return (
        a["flow.packets.delta"],
        a["flow.bytes.delta"],
        a["flow.reverse.packets.delta"],
        a["flow.reverse.bytes.delta"],
    )


def test_tcp_close_counts_and_times_are_the_recordings(scenario_run) -> None:
    records, _ = scenario_run
    [rec] = flow(records, 40000)
    a = rec["attributes"]
    assert a["flow.end_reason"] == "end_of_flow_detected"
    assert counts(rec) == (5, 40 * 4 + 140, 3, 40 * 2 + 340)
    assert (rec["start_time_unix_nano"], rec["end_time_unix_nano"]) == (ns_at(0), ns_at("0.007"))
    assert a["flow.tcp.handshake.latency"] == 1_000_000
    assert a["flow.connection.state"] == "time_wait"
    assert (a["source.address"], a["destination.address"]) == (C4, S4)
    assert rec["kind"] == "internal" and a["flow.direction"] == "unknown"
    assert a["network.interface.name"] == "scenario.pcap"
    assert a["network.interface.index"] == 0
    assert a["network.interface.mac"] == MAC_C.hex(":")


def test_udp_gap_longer_than_the_timeout_makes_two_flows(scenario_run) -> None:
    records, _ = scenario_run
    first, second = flow(records, 5000)
    assert [r["attributes"]["flow.end_reason"] for r in (first, second)] == ["idle_timeout"] * 2
    assert counts(first) == (2, 256, 0, 0) and counts(second) == (1, 128, 1, 48)
    assert first["start_time_unix_nano"] == first["end_time_unix_nano"] == ns_at(1)
    assert second["start_time_unix_nano"] == second["end_time_unix_nano"] == ns_at(71)
    assert first["trace_id"] == second["trace_id"]  # same Community ID, within 24h


def test_long_flow_has_interim_records_at_interval_boundaries(scenario_run) -> None:
    records, _ = scenario_run
    recs = flow(records, 6000)
    assert [r["attributes"]["flow.end_reason"] for r in recs] == [
        "active_timeout",
        "active_timeout",
        "forced_end",
    ]
    assert [counts(r)[0] for r in recs] == [60, 60, 30]
    assert [r["end_time_unix_nano"] for r in recs] == [ns_at(69), ns_at(129), ns_at(159)]
    assert recs[0]["start_time_unix_nano"] == ns_at(10)
    for prev, nxt in itertools.pairwise(recs):
        assert nxt["start_time_unix_nano"] == prev["end_time_unix_nano"]
    assert recs[-1]["attributes"]["flow.packets.total"] == 150
    assert recs[-1]["attributes"]["flow.bytes.total"] == 150 * 38


def test_icmp_ipv6_and_snaplen_cut_packets(scenario_run) -> None:
    records, _ = scenario_run
    [icmp] = flow(records, 8, **{"network.transport": "icmp"})
    assert counts(icmp) == (1, 84, 1, 84)
    assert icmp["attributes"]["flow.end_reason"] == "idle_timeout"
    [v6] = flow(records, 7000)
    assert counts(v6) == (1, 148, 0, 0) and v6["name"] == "flow_ipv6_udp"
    [cut] = flow(records, 8000)
    assert counts(cut) == (1, 1028, 0, 0)  # IP bytes on the wire, not the 86 captured


def test_frames_longer_than_a_test_run_count_in_full(tmp_path: Path) -> None:
    """A jumbo frame and GSO super-packets (as a capture on veth records them) exceed the
    ~3.7 kB a kernel test run takes; their IP bytes still count as recorded."""
    jumbo = eth(ip4(C4, S4, udp(8100, 9, 9000 - 28), 17))
    gso = eth(ip4(C4, S4, udp(8200, 9, 60000 - 28), 17))
    snapped = eth(ip4(C4, S4, udp(8300, 9, 20000 - 28), 17))
    write_pcap(
        tmp_path / "long.pcap",
        [
            (Decimal(1), jumbo, len(jumbo)),
            (Decimal(2), gso, len(gso)),
            (Decimal(3), snapped[:200], len(snapped)),  # and cut by a 200-byte snaplen
        ],
    )
    code, records, err = read(tmp_path / "long.pcap", tmp_path)
    assert code == 0, err
    assert [counts(r) for p in (8100, 8200, 8300) for r in flow(records, p)] == [
        (1, 9000, 0, 0),
        (1, 60000, 0, 0),
        (1, 20000, 0, 0),
    ]
    assert "longer than" not in err


def test_long_frames_staged_through_libpcap_count_in_full(tmp_path: Path) -> None:
    """The same for pcapng, which libpcap reads and mermin stages: the record holds what a
    window can, the recorded length rides along."""
    frames = [eth(ip4(C4, S4, udp(port, 9, size - 28), 17)) for port, size in
              ((8100, 9000), (8200, 60000))]  # fmt: skip
    write_pcapng(tmp_path / "long.pcapng", frames, [Decimal(1), Decimal(2)])
    code, records, err = read(tmp_path / "long.pcapng", tmp_path)
    assert code == 0, err
    assert "staged through libpcap" in err
    assert [counts(r) for p in (8100, 8200) for r in flow(records, p)] == [
        (1, 9000, 0, 0),
        (1, 60000, 0, 0),
    ]


@pytest.mark.parametrize(
    ("container", "payload"), [("pcap", 4), ("pcap", 1000), ("pcapng", 4), ("pcapng", 1000)]
)
def test_thousands_of_records_across_windows(tmp_path: Path, container: str, payload: int) -> None:
    """9,000 frames of 3,000 interleaved UDP flows, a poll every second of packet time.
    Minimal frames: about 48 records fit a window, more than one kernel run takes (34 tail
    calls). 1 kB frames: three fit a window as they lie, so mermin stages their first bytes
    instead, 13 to a window. Every flow's counts and times must come out as written."""
    flows, gap = 3000, Decimal("0.001")
    frames, times, expected = [], [], {}
    for round_ in range(3):
        for f in range(flows):
            sport = 10000 + f
            at = (round_ * flows + f) * gap
            up = round_ < 2
            ip = (
                ip4(C4, S4, udp(sport, 53, payload), 17)
                if up
                else ip4(S4, C4, udp(53, sport, payload), 17)
            )
            frames.append(eth(ip, from_client=up))
            times.append(at)
            first = expected.setdefault(sport, [at, at])
            first[1] = at
    if container == "pcap":
        pkts = [(at, fr, len(fr)) for at, fr in zip(times, frames, strict=True)]
        write_pcap(tmp_path / "many", pkts)
    else:
        write_pcapng(tmp_path / "many", frames, times)
    code, records, err = read(tmp_path / "many", tmp_path)
    assert code == 0, err
    assert f"done: {len(frames)} packets read" in err
    per_run = float(err.split(" per kernel run")[0].rsplit(", ", 1)[-1])
    assert per_run > (20 if payload < 100 else 10), err  # as they lie, 3 fit a 1 kB window
    assert len(records) == flows
    ip_bytes = 28 + payload
    for r in records:
        a = r["attributes"]
        start, end = expected[a["source.port"]]
        assert counts(r) == (2, 2 * ip_bytes, 1, ip_bytes)
        assert (r["start_time_unix_nano"], r["end_time_unix_nano"]) == (ns_at(start), ns_at(end))
    assert sorted(r["attributes"]["source.port"] for r in records) == sorted(expected)


def test_short_and_non_ip_frames_are_counted_not_fatal(scenario_run) -> None:
    records, err = scenario_run
    assert len(records) == 1 + 2 + 3 + 1 + 1 + 1
    assert "1 non-IP, 1 truncated, 0 table full" in err
    assert f"{len(scenario())} packets read" in err


# --- link types, containers, stdin ---------------------------------------------------------


def ip_packets() -> list[tuple[Decimal, dpkt.Packet]]:
    return [
        (Decimal("0.0"), ip4(C4, S4, tcp(41000, 443, SYN), 6)),
        (Decimal("0.5"), ip4(S4, C4, tcp(443, 41000, SYN | ACK), 6)),
        (Decimal("1.0"), ip4(C4, S4, tcp(41000, 443, ACK, 500), 6)),
        (Decimal("1.5"), ip6(C6, S6, udp(5353, 5353, 40), 17)),
        (Decimal("2.0"), ip6(S6, C6, udp(5353, 5353, 60), 17)),
    ]


def _sll(ip: dpkt.Packet) -> bytes:
    proto = 0x86DD if isinstance(ip, dpkt.ip6.IP6) else 0x0800
    return struct.pack("!HHH8sH", 4, 1, 6, MAC_C + b"\0\0", proto) + bytes(ip)


def _sll2(ip: dpkt.Packet) -> bytes:
    proto = 0x86DD if isinstance(ip, dpkt.ip6.IP6) else 0x0800
    return struct.pack("!HHIHBB8s", proto, 0, 2, 1, 4, 6, MAC_C + b"\0\0") + bytes(ip)


def _null(ip: dpkt.Packet) -> bytes:
    family = 24 if isinstance(ip, dpkt.ip6.IP6) else 2
    return struct.pack("<I", family) + bytes(ip)


LINK_TYPES: dict[str, tuple[int, Callable[[dpkt.Packet], bytes]]] = {
    "raw": (101, bytes),
    "sll": (113, _sll),
    "sll2": (276, _sll2),
    "null": (0, _null),
}


def _write_variant(variant: str, path: Path) -> None:
    pkts = ip_packets()
    if variant in LINK_TYPES:
        linktype, frame = LINK_TYPES[variant]
        write_pcap(path, [(at, frame(ip), len(frame(ip))) for at, ip in pkts], linktype)
    elif variant == "pcapng":
        write_pcapng(path, [eth(ip) for _, ip in pkts], [at for at, _ in pkts])
    else:
        unit, order = {"usec": ("us", "<"), "big-endian": ("ns", ">")}.get(variant, ("ns", "<"))
        write_pcap(path, [(at, eth(ip), len(eth(ip))) for at, ip in pkts], unit=unit, order=order)


def write_pcapng(path: Path, frames: list[bytes], times: list[Decimal]) -> None:
    with path.open("wb") as fh:
        writer = dpkt.pcapng.Writer(fh, snaplen=65535)
        for frame, at in zip(frames, times, strict=True):
            writer.writepkt(frame, ts=float(T0 + at))


# Classic pcaps in this host's byte order with Ethernet frames are walked by the kernel as
# they lie; everything else is staged through libpcap. Both must read alike.
KERNEL_WALKED = {"ethernet", "usec", "gzip", "stdin", "stdin-gzip"}


def _summary(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(
        (
            r["attributes"]["flow.community_id"],
            r["attributes"]["source.port"],
            r["start_time_unix_nano"],
            r["end_time_unix_nano"],
            counts(r),
        )
        for r in records
    )


@pytest.fixture(scope="module")
def ethernet_summary(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Any, ...]]:
    tmp = tmp_path_factory.mktemp("eth")
    _write_variant("ethernet", tmp / "eth.pcap")
    code, records, err = read(tmp / "eth.pcap", tmp)
    assert code == 0, err
    assert len(records) == 2
    return _summary(records)


@pytest.mark.parametrize(
    "variant", [*LINK_TYPES, "pcapng", "usec", "big-endian", "gzip", "stdin", "stdin-gzip"]
)
def test_link_types_containers_and_stdin_read_alike(
    tmp_path: Path, ethernet_summary: list[tuple[Any, ...]], variant: str
) -> None:
    path = tmp_path / "v.pcap"
    _write_variant(variant, path)
    stdin = None
    if "gzip" in variant:
        path.write_bytes(gzip.compress(path.read_bytes()))
    if variant.startswith("stdin"):
        stdin, path = path.read_bytes(), Path("-")
    code, records, err = read(path, tmp_path, stdin=stdin)
    assert code == 0, err
    assert _summary(records) == ethernet_summary
    assert {r["attributes"]["network.interface.name"] for r in records} == {
        "stdin" if stdin else "v.pcap"
    }
    how = "records walked by the kernel" if variant in KERNEL_WALKED else "staged through libpcap"
    assert how in err


# --- errors --------------------------------------------------------------------------------


def test_not_a_pcap_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not a capture file\n" * 10)
    code, records, err = read(path, tmp_path)
    assert code == 1 and records == []
    assert "is not a pcap or pcapng file" in err and "0 packets were read" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_file_reports_what_was_read(tmp_path: Path, compressed: bool) -> None:
    path = tmp_path / "cut.pcap"
    pkts = [(at + 3 * i, ip) for i in range(2000) for at, ip in ip_packets()]
    write_pcap(path, [(at, eth(ip), len(eth(ip))) for at, ip in pkts])
    data = path.read_bytes()
    data = gzip.compress(data) if compressed else data
    data = data[: len(data) // 2] if compressed else data[:-30]
    path.write_bytes(data)
    code, records, err = read(path, tmp_path)
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert "truncated or damaged" in last and "Traceback" not in err
    read_before = int(last.split("; ")[-1].split()[0])
    assert read_before == len(pkts) - 1 if not compressed else 0 < read_before < len(pkts)
    assert records, "the flows of the packets before the damage are reported"


def test_record_with_an_impossible_length_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "bad.pcap"
    frame = eth(ip4(C4, S4, udp(7100, 9), 17))
    write_pcap(path, [(Decimal(0), frame, len(frame))] * 3)
    data = bytearray(path.read_bytes())
    second = 24 + 16 + len(frame)
    struct.pack_into("<I", data, second + 8, 0x50000)  # caplen 320 KiB: beyond libpcap's limit
    path.write_bytes(bytes(data))
    code, records, err = read(path, tmp_path)
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert "truncated or damaged (a record claims more than 256 KiB of data)" in last
    assert "; 1 packets were read" in last
    assert [counts(r) for r in records] == [(1, len(frame) - 14, 0, 0)]


def test_missing_file_and_conflicting_flags_are_usage_errors(tmp_path: Path) -> None:
    code, _, err = read(tmp_path / "nope.pcap", tmp_path)
    assert code == 2 and "Cannot read" in err and "No such file" in err
    code, _, err = read(tmp_path / "nope.pcap", tmp_path, "-i", "eth0")
    assert code == 2 and "--read" in err


def test_unsupported_link_type_is_named(tmp_path: Path) -> None:
    write_pcap(tmp_path / "wifi.pcap", [(Decimal(0), b"\0" * 40, 40)], linktype=105)
    code, _, err = read(tmp_path / "wifi.pcap", tmp_path)
    assert code == 1 and "IEEE802_11" in err and "cannot read" in err


# --- live and offline agree ----------------------------------------------------------------


def test_live_and_offline_records_agree(link, tmp_path: Path) -> None:
    a, b = link.a, link.b
    a.ip, b.ip = a.ip4, b.ip4
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path)))
    oracle = start_tcpdump(a, tmp_path / "live.pcap")
    try:
        # Small transfers: a test run takes frames up to about a page (no GSO batches).
        tcp_exchange(a, b, 8088, 41000, up=1200, down=2500)
        b.run("python3", "-c", UDP_SEND, a.ip, "5353", "4", b.ip, "43000", "0.01")
        a.run("ping", "-c", "3", "-i", "0.2", b.ip)
        a.run("ping", "-c", "2", "-i", "0.2", b.ip6)
        time.sleep(0.5)
        oracle.stop()
    finally:
        assert cap.stop() == 0, "".join(cap.stderr)
    code, offline, err = read(tmp_path / "live.pcap", tmp_path)
    assert code == 0, err

    def per_flow(records: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[int]]:
        out: dict[tuple[Any, ...], list[int]] = {}
        for r in records:
            x = r["attributes"]
            key = (
                x["flow.community_id"],
                x["source.address"],
                x["source.port"],
                x["destination.address"],
                x["destination.port"],
            )
            total = out.setdefault(key, [0, 0, 0, 0])
            for i, n in enumerate(counts(r)):
                total[i] += n
        return out

    live = per_flow(cap.records)
    assert len(live) >= 4
    assert per_flow(offline) == live


def test_without_bpf_privileges_says_which_are_needed(tmp_path: Path) -> None:
    _write_variant("ethernet", tmp_path / "eth.pcap")
    res = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--",
         MERMIN, "capture", "--read", str(tmp_path / "eth.pcap")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "CAP_BPF" in res.stderr and "run it as root" in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
