"""Flow filters: kernel maps built from the config, the kernel verdicts on crafted
packets (BPF_PROG_TEST_RUN), the Python-side predicate, and a live capture."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import dpkt
import pytest

from mermin_cli.config.loader import load_config
from mermin_cli.flows import filters as f

try:
    from .capture_run import start_capture, write_config
except ImportError:
    from capture_run import start_capture, write_config

SYN, ACK, RST = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_RST


def config(tmp_path: Path, text: str):
    path = tmp_path / "filters.hcl"
    path.write_text(text)
    return load_config(path).filter


def test_kernel_filter_maps_from_config(tmp_path: Path) -> None:
    kf = f.KernelFilter.from_config(
        config(
            tmp_path,
            """
filter "source" {
  address = { match = ["10.1.0.0/16"], not_match = ["10.1.2.3", "fd00::/8"] }
}
filter "destination" {
  port = { match = ["443", "8000-8002"], not_match = ["8001"] }
}
filter "network" {
  transport = { not_match = ["icmp*"] }
  type = { match = ["ipv4"] }
}
""",
        )
    )
    assert kf.active == (
        f.F_SRC_ADDR_MATCH | f.F_SRC_ADDR_NOT | f.F_DST_PORT_MATCH | f.F_DST_PORT_NOT
        | f.F_PROTO | f.F_REJECT_V6
    )  # fmt: skip
    assert [(lst, str(net)) for lst, net in kf.addresses] == [
        (f.LIST_SRC_MATCH, "10.1.0.0/16"),
        (f.LIST_SRC_NOT, "10.1.2.3/32"),
        (f.LIST_SRC_NOT, "fd00::/8"),
    ]
    assert kf.ports == {
        443: f.PORT_DST_MATCH,
        8000: f.PORT_DST_MATCH,
        8001: f.PORT_DST_MATCH | f.PORT_DST_NOT,
        8002: f.PORT_DST_MATCH,
    }
    allowed = {p for p in range(256) if kf.protos[p]}
    assert 1 not in allowed and 58 not in allowed and {6, 17, 132} <= allowed
    assert len(allowed) == 254


def test_flow_filter_semantics(tmp_path: Path) -> None:
    ff = f.FlowFilter.from_config(
        config(
            tmp_path,
            """
filter "network" {
  interface_name = { match = ["veth*"] }
}
filter "flow" {
  tcp_flags_tags = { not_match = ["rst"] }
  ip_ttl = { match = ["60-64"] }
}
""",
        )
    )
    base = {"network.interface.name": "veth0", "flow.ip.ttl": 64}
    assert ff.allows(base)  # no TCP flags attribute: a UDP flow skips that field
    assert ff.allows({**base, "flow.tcp.flags.tags": ["syn", "ack"]})
    assert not ff.allows({**base, "flow.tcp.flags.tags": ["syn", "rst"]})
    assert not ff.allows({**base, "flow.ip.ttl": 128})
    assert not ff.allows({**base, "network.interface.name": "eth0"})
    assert not ff.allows({"flow.ip.ttl": 64})  # unknown interface name: rejected
    assert not f.FlowFilter.from_config(config(tmp_path, ""))  # no rules: falsy


@pytest.mark.bpf
@pytest.mark.usefixtures("require_bpf")
def test_kernel_verdicts_on_crafted_packets(tmp_path: Path) -> None:
    from mermin_cli.engine import bpfsys
    from mermin_cli.engine.program import FlowProgram

    cfg = config(
        tmp_path,
        """
filter "destination" {
  port = { match = ["80", "8000-8010"] }
}
filter "source" {
  address = { not_match = ["10.0.0.9/32"] }
}
filter "network" {
  transport = { match = ["tcp"] }
}
""",
    )
    program = FlowProgram(1024)
    try:
        f.KernelFilter.from_config(cfg).load(program.bpf)

        def send(src: str, dst: str, sport: int, dport: int, flags: int = SYN) -> None:
            tcp = dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags)
            ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=6, data=tcp)
            frame = dpkt.ethernet.Ethernet(src=b"\2" * 6, dst=b"\4" * 6, data=ip)
            for _ in range(2):  # the second packet of a filtered flow hits the LRU
                assert bpfsys.prog_test_run(program.prog_fd(False), bytes(frame)).retval == -1

        send("10.0.0.2", "10.0.0.1", 40000, 80)  # allowed
        send("10.0.0.2", "10.0.0.1", 40001, 22)  # destination port not listed
        send("10.0.0.9", "10.0.0.1", 40002, 80)  # source address excluded
        send("10.0.0.1", "10.0.0.2", 8005, 40003, SYN | ACK)  # answer: 10.0.0.2 initiated
        send("10.0.0.1", "10.0.0.2", 8005, 40004)  # SYN from 8005 to 40004: port 40004
        keys, _ = program.table.read()
        assert sorted((int(k["lo_port"]), int(k["hi_port"])) for k in keys) == [
            (80, 40000),
            (8005, 40003),
        ]
        c = program.counters()
        assert (c["new_flows"], c["filtered_flows"], c["filtered_packets"]) == (2, 3, 6)
        f.KernelFilter().load(program.bpf)  # filters off again: the next SYN is tracked
        send("10.0.0.2", "10.0.0.1", 40001, 22)
        assert program.counters()["new_flows"] == 3
    finally:
        program.close()


UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, int(sys.argv[2]))
for port in sys.argv[3:]:
    s.sendto(b"f" * 10, (sys.argv[1], int(port)))
"""


@pytest.mark.bpf
@pytest.mark.usefixtures("require_bpf")
def test_live_capture_with_filters(link, tmp_path: Path) -> None:
    a, b = link.a, link.b
    extra = """
filter "destination" {
  port = { not_match = ["7001"] }
}
filter "network" {
  transport = { match = ["udp"] }
}
filter "flow" {
  ip_ttl = { match = ["64"] }
}
"""
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path, extra=extra)))
    try:
        b.run("python3", "-c", UDP_SEND, a.ip4, "64", "7000", "7001", "7002")
        b.run("python3", "-c", UDP_SEND, a.ip4, "32", "7003")  # ttl 32: rejected in Python
        b.run("ping", "-c", "1", a.ip4)  # ICMP: filtered in the kernel
        b.run("ping", "-c", "1", a.ip4)
        time.sleep(1.5)
    finally:
        assert cap.stop() == 0, "".join(cap.stderr)
    ports = sorted(r["attributes"]["destination.port"] for r in cap.records)
    assert ports == [7000, 7002]
    summary = next(line for line in cap.stderr if "done:" in line)
    # Kernel: UDP to 7001 (1 packet), two pings with two echo ids (2 x 2), one ICMP
    # port-unreachable flow (4 packets: the answers to 7000-7003 share a key).
    # Python: the TTL-32 flow to 7003.
    assert "filtered: 4 flows (9 packets) in the kernel, 1 flows after" in summary, summary


def test_capture_rejects_a_bad_filter(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, extra='filter "source" {\n  address = { match = ["10.*"] }\n}\n')
    res = subprocess.run(
        [str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "mermin"),
         "config", "validate", str(cfg)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 2
    assert "filter.source.address" in res.stderr and "10.*" in res.stderr
