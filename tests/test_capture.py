"""End-to-end: the real `mermin capture` in a test namespace, real traffic, tcpdump as oracle."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
from pathlib import Path

import communityid
import pytest

try:
    from .capture_run import MERMIN, oracle_key, start_capture, start_tcpdump, write_config
except ImportError:
    from capture_run import MERMIN, oracle_key, start_capture, start_tcpdump, write_config

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("require_bpf")]

TCP_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); print("up", flush=True)
c, _ = s.accept(); got = 0
while (d := c.recv(65536)): got += len(d)
c.sendall(b"r" * int(sys.argv[3])); c.close(); print(got, flush=True)
"""

TCP_CLIENT = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
c = socket.socket(fam); c.bind((sys.argv[4], int(sys.argv[5])))
c.connect((sys.argv[1], int(sys.argv[2]))); c.sendall(b"q" * int(sys.argv[3]))
c.shutdown(socket.SHUT_WR)
got = 0
while (d := c.recv(65536)): got += len(d)
c.close(); print(got)
"""

UDP_SEND = """
import socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((sys.argv[4], int(sys.argv[5])))
for _ in range(int(sys.argv[3])):
    s.sendto(b"u" * 100, (sys.argv[1], int(sys.argv[2]))); time.sleep(float(sys.argv[6]))
"""


def tcp_exchange(server, client, port, cport, up: int, down: int) -> None:
    srv = server.popen(
        "python3", "-c", TCP_SERVER, server.ip, str(port), str(down), stdout=subprocess.PIPE
    )
    assert srv.stdout.readline().strip() == "up"
    out = client.run(
        "python3", "-c", TCP_CLIENT, server.ip, str(port), str(up), client.ip, str(cport)
    )
    assert int(out.stdout) == down
    assert int(srv.communicate(timeout=10)[0]) == up


@pytest.fixture
def hosts(link):
    """The link's ends with an `ip` attribute per family under test."""
    link.a.ip, link.b.ip = link.a.ip4, link.b.ip4
    return link


def totals(records: list[dict]) -> tuple[int, int, int, int]:
    a = records[-1]["attributes"]
    return (
        a["flow.packets.total"],
        a["flow.bytes.total"],
        a["flow.reverse.packets.total"],
        a["flow.reverse.bytes.total"],
    )


def assert_deltas_sum_to_totals(records: list[dict]) -> None:
    for field in ("flow.packets", "flow.bytes", "flow.reverse.packets", "flow.reverse.bytes"):
        assert (
            sum(r["attributes"][field + ".delta"] for r in records)
            == (records[-1]["attributes"][field + ".total"])
        ), field


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tcp_udp_icmp_match_tcpdump(link, tmp_path: Path, family: str) -> None:
    a, b = link.a, link.b
    a.ip, b.ip = (a.ip4, b.ip4) if family == "ipv4" else (a.ip6, b.ip6)
    cfg = write_config(tmp_path)
    cap = start_capture(a, "-i", a.ifname, "-c", str(cfg))
    oracle = start_tcpdump(a, tmp_path / "a.pcap")
    try:
        # B connects to A (A is the server), then A connects to B.
        tcp_exchange(a, b, 8088, 41000, up=5000, down=120_000)
        tcp_exchange(b, a, 9090, 42000, up=70_000, down=300)
        b.run("python3", "-c", UDP_SEND, a.ip, "5353", "4", b.ip, "43000", "0.01")
        a.run("ping", "-c", "3", "-i", "0.2", b.ip)
        time.sleep(3.0)  # every flow times out (tcp fin 0.5s, udp/icmp 1s) + polls
        seen = oracle.stop()
    finally:
        code = cap.stop()
    assert code == 0, "".join(cap.stderr)
    proto_tcp, proto_udp = 6, 17

    def check(proto: int, client: tuple[str, int], server: tuple[str, int], kind: str):
        recs = cap.for_flow(
            **{
                "source.address": client[0],
                "source.port": client[1],
                "destination.address": server[0],
                "destination.port": server[1],
            }
        )
        assert recs, f"no record for {client} -> {server}"
        counts = seen[oracle_key(proto, client, server)]
        assert totals(recs) == (*counts[client], *counts[server])
        assert_deltas_sum_to_totals(recs)
        assert {r["kind"] for r in recs} == {kind}
        assert recs[0]["attributes"]["network.interface.name"] == a.ifname
        tup = communityid.FlowTuple(proto, client[0], server[0], client[1], server[1])
        assert recs[0]["attributes"]["flow.community_id"] == communityid.CommunityID().calc(tup)
        return recs

    tcp_in = check(proto_tcp, (b.ip, 41000), (a.ip, 8088), "server")
    tcp_out = check(proto_tcp, (a.ip, 42000), (b.ip, 9090), "client")
    for recs in (tcp_in, tcp_out):
        last = recs[-1]
        attrs = last["attributes"]
        assert last["name"] == f"flow_{family}_tcp"
        assert attrs["flow.end_reason"] == "end_of_flow_detected"
        assert {"syn", "ack", "fin"} <= set(attrs["flow.tcp.flags.tags"])
        assert {"syn", "ack", "fin"} <= set(attrs["flow.reverse.tcp.flags.tags"])
        assert attrs["flow.connection.state"] == "time_wait"
        assert attrs["flow.tcp.handshake.latency"] > 0
    assert tcp_in[0]["attributes"]["flow.direction"] == "reverse"
    assert tcp_out[0]["attributes"]["flow.direction"] == "forward"

    udp = check(proto_udp, (b.ip, 43000), (a.ip, 5353), "server")
    assert udp[-1]["attributes"]["flow.end_reason"] == "idle_timeout"
    assert totals(udp)[0] == 4
    icmp = cap.for_flow(
        **{"network.transport": "icmp" if family == "ipv4" else "icmpv6", "source.address": a.ip}
    )
    echo = [r for r in icmp if r["attributes"]["flow.icmp.type.name"] == "echo_request"]
    assert len(echo) == 1
    assert totals(echo)[0] == 3 and totals(echo)[2] == 3
    assert echo[0]["attributes"]["flow.end_reason"] == "idle_timeout"
    assert echo[0]["kind"] == "client"
    for r in cap.records:
        assert r["schema"] == "mermin.flow/v1"
        assert len(r["trace_id"]) == 32 and len(r["span_id"]) == 16
        assert r["start_time_unix_nano"] <= r["end_time_unix_nano"]


def test_interim_records_and_expiry_timing(hosts, tmp_path: Path) -> None:
    a, b = hosts.a, hosts.b
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path, interval="2s")))
    try:
        sent_at = time.time()
        b.run("python3", "-c", UDP_SEND, a.ip, "6000", "25", b.ip, "44000", "0.1")
        last_packet = time.time()
        time.sleep(2.5)
    finally:
        assert cap.stop() == 0, "".join(cap.stderr)
    recs = cap.for_flow(**{"source.port": 44000, "destination.port": 6000})
    reasons = [r["attributes"]["flow.end_reason"] for r in recs]
    # 2.5 s of traffic, 2 s record interval, 1 s UDP timeout: the interim record at 2 s,
    # then the final one at ~3.5 s (before the next interval boundary at 4 s).
    assert reasons == ["active_timeout", "idle_timeout"]
    assert_deltas_sum_to_totals(recs)
    assert totals(recs)[0] == 25
    assert len({r["trace_id"] for r in recs}) == 1
    assert len({r["span_id"] for r in recs}) == len(recs)
    for prev, cur in itertools.pairwise(recs):
        assert cur["start_time_unix_nano"] == prev["end_time_unix_nano"]
    # The final record arrives within udp_timeout (1 s) + poll (0.2 s) + slack.
    arrival = cap.arrivals[cap.records.index(recs[-1])]
    assert arrival - last_packet < 1.0 + 0.2 + 0.6
    assert recs[0]["start_time_unix_nano"] / 1e9 >= sent_at - 0.5


def test_shutdown_flushes_active_flows_as_forced_end(hosts, tmp_path: Path) -> None:
    a, b = hosts.a, hosts.b
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path)))
    b.run("python3", "-c", UDP_SEND, a.ip, "6001", "3", b.ip, "45000", "0")
    assert cap.stop(signal.SIGINT) == 0
    recs = cap.for_flow(**{"source.port": 45000})
    assert [r["attributes"]["flow.end_reason"] for r in recs] == ["forced_end"]
    assert totals(recs)[0] == 3


def test_duration_ends_capture_and_detaches(hosts, tmp_path: Path) -> None:
    a = hosts.a
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path)), "--duration", "1")
    assert cap.wait(timeout=20) == 0
    assert attached_programs(a) == []


def attached_programs(host) -> list[str]:
    """Names of our BPF programs attached anywhere: tc filters on the host's interface,
    plus programs behind TCX links (bpftool 7.1 shows those as link type 11, without
    the interface, so this counts all of them; tests run one capture at a time)."""
    out = host.run("bpftool", "-j", "net", "show", "dev", host.ifname).stdout
    found = [hook.get("name", "") for section in json.loads(out) for hook in section.get("tc", [])]
    for link in json.loads(host.run("bpftool", "-j", "link", "show").stdout or "[]"):
        if link.get("type") in (11, "tcx"):
            prog = json.loads(
                host.run("bpftool", "-j", "prog", "show", "id", str(link["prog_id"])).stdout
            )
            found.append(prog.get("name", ""))
    return [name for name in found if name.startswith("mermin")]


def tc_filters(host) -> str:
    return "".join(
        host.run("tc", "filter", "show", "dev", host.ifname, d).stdout
        for d in ("ingress", "egress")
    )


@pytest.mark.parametrize("mode", ["tcx", "tc"])
def test_nothing_left_attached_after_sigterm(hosts, tmp_path: Path, mode: str) -> None:
    a = hosts.a
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path)), "--attach", mode)
    assert len(attached_programs(a)) == 2
    assert cap.stop() == 0
    assert attached_programs(a) == []
    qdiscs = a.run("tc", "qdisc", "show", "dev", a.ifname).stdout
    assert "clsact" not in qdiscs


def test_sigkill_orphans_are_removed_by_next_run(hosts, tmp_path: Path) -> None:
    a, b = hosts.a, hosts.b
    cfg = str(write_config(tmp_path))
    cap = start_capture(a, "-i", a.ifname, "-c", cfg, "--attach", "tc")
    cap.stop(signal.SIGKILL)
    assert "mermin_" in tc_filters(a)  # tc filters outlive a killed process
    cap = start_capture(a, "-i", a.ifname, "-c", cfg, "--attach", "tc")
    assert any("removed 2 filter(s)" in line for line in cap.stderr)
    b.run("ping", "-c", "2", "-i", "0.2", a.ip)
    assert cap.stop() == 0
    echo = cap.for_flow(**{"source.address": b.ip, "network.transport": "icmp"})
    assert totals(echo)[0] == 2  # counted once, by the new run only
    assert tc_filters(a) == ""


FOREIGN_FILTER = """
from bcc import BPF
from pyroute2 import IPRoute
from mermin_cli.engine.kernel_headers import prepare_bcc_headers
prepare_bcc_headers()
prog = BPF(text="int foreign(struct __sk_buff *skb) { return -1; }")
fd = prog.load_func(b"foreign", BPF.SCHED_CLS).fd
with IPRoute() as ipr:
    idx = ipr.link_lookup(ifname="IFNAME")[0]
    ipr.tc("add", "clsact", idx)
    ipr.tc("add-filter", "bpf", idx, 1, fd=fd, name="foreign", parent="ffff:fff2",
           prio=1, direct_action=True)
"""


def test_foreign_clsact_and_filter_are_kept(hosts, tmp_path: Path) -> None:
    """Another tool's clsact qdisc and cls_bpf filter at our priority survive our run."""
    a, b = hosts.a, hosts.b
    a.exec_python(FOREIGN_FILTER.replace("IFNAME", a.ifname))
    assert "foreign" in tc_filters(a)
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path)), "--attach", "tc")
    b.run("ping", "-c", "2", "-i", "0.2", a.ip)  # traffic still flows through both
    assert cap.stop() == 0
    filters = tc_filters(a)
    assert "foreign" in filters and "mermin" not in filters
    assert "clsact" in a.run("tc", "qdisc", "show", "dev", a.ifname).stdout
    assert totals(cap.for_flow(**{"source.address": b.ip, "network.transport": "icmp"}))[0] == 2


def test_interface_vanishing_mid_capture(hosts, tmp_path: Path) -> None:
    a, b = hosts.a, hosts.b
    # A second veth pair with both ends inside the test namespace; deleted mid-capture.
    a.run("ip", "link", "add", "mvanish0", "type", "veth", "peer", "name", "mvanish1")
    a.run("ip", "link", "set", "mvanish0", "up")
    cap = start_capture(a, "-i", "mvanish0", "-i", a.ifname, "-c", str(write_config(tmp_path)))
    a.run("ip", "link", "del", "mvanish0")
    time.sleep(0.6)
    b.run("ping", "-c", "1", a.ip)
    assert cap.stop() == 0
    assert any("mvanish0 disappeared" in line for line in cap.stderr), cap.stderr
    assert totals(cap.for_flow(**{"source.address": b.ip}))[0] == 1


def test_last_interface_vanishing_ends_capture_with_records(hosts, tmp_path: Path) -> None:
    a = hosts.a
    a.run("ip", "link", "add", "mvanish0", "type", "veth", "peer", "name", "mvanish1")
    a.run("ip", "link", "set", "mvanish0", "up")
    a.run("ip", "link", "set", "mvanish1", "up")
    no_discovery = 'discovery "instrument" {\n  auto_discover_interfaces = false\n}\n'
    cap = start_capture(a, "-i", "mvanish0", "-c", str(write_config(tmp_path, extra=no_discovery)))
    a.run("ip", "link", "del", "mvanish0")
    assert cap.wait(timeout=10) == 1
    assert "Every captured interface has disappeared" in cap.stderr[-1]


def run_cli(host, *args: str) -> subprocess.CompletedProcess[str]:
    return host.run(MERMIN, *args, check=False)


def test_pattern_matching_nothing_lists_interfaces(hosts, tmp_path: Path) -> None:
    res = run_cli(hosts.a, "capture", "-i", "nosuch*", "-c", str(write_config(tmp_path)))
    assert res.returncode == 2
    assert "'nosuch*' matched nothing" in res.stderr
    assert hosts.a.ifname in res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout == ""


def test_unprivileged_capture_is_refused_cleanly(hosts, tmp_path: Path) -> None:
    res = hosts.a.run(
        "setpriv", "--inh-caps=-all", "--bounding-set=-all", "--",
        MERMIN,
        "capture", "-i", hosts.a.ifname, "-c", str(write_config(tmp_path)),
        check=False,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "run it as root" in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert attached_programs(hosts.a) == []


def test_bad_format_is_a_usage_error(hosts) -> None:
    res = run_cli(hosts.a, "capture", "--format", "xml")
    assert res.returncode == 2
    flat = " ".join(res.stderr.replace("│", " ").split())
    assert "'xml' is not one of 'text', 'json'" in flat


def test_l3_device_without_ethernet_header(l3_link, tmp_path: Path) -> None:
    a, b = l3_link.a, l3_link.b
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path)))
    try:
        b.run("ping", "-c", "3", "-i", "0.2", "-s", "100", a.ip4)
        b.run("python3", "-c", UDP_SEND, a.ip6, "7000", "2", b.ip6, "46000", "0")
    finally:
        assert cap.stop() == 0, "".join(cap.stderr)
    echo = cap.for_flow(**{"source.address": b.ip4, "network.transport": "icmp"})
    assert totals(echo) == (3, 3 * 128, 3, 3 * 128)  # 20 IP + 8 ICMP + 100 data
    udp = cap.for_flow(**{"source.address": b.ip6, "source.port": 46000})
    assert totals(udp)[:2] == (2, 2 * (40 + 8 + 100))
    assert udp[0]["name"] == "flow_ipv6_udp"


def test_busy_tcp_flow_is_not_cut_at_tcp_timeout(hosts, tmp_path: Path) -> None:
    """Idle means no packets: a flow busier than tcp_timeout (2 s) stays one flow."""
    a, b = hosts.a, hosts.b
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path, interval="60s")))
    chatty = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 8081))
for _ in range(10):
    s.sendall(b"x" * 10); time.sleep(0.4)
s.close()
"""
    try:
        srv = a.popen("python3", "-c", TCP_SERVER, a.ip, "8081", "0", stdout=subprocess.PIPE)
        assert srv.stdout.readline().strip() == "up"
        b.run("python3", "-c", chatty, a.ip)
        srv.communicate(timeout=10)
        time.sleep(1.2)
    finally:
        assert cap.stop() == 0
    recs = cap.for_flow(**{"destination.port": 8081})
    assert reasons_of(recs) == ["end_of_flow_detected"]
    assert recs[0]["attributes"]["flow.bytes.total"] > 10 * 10


def reasons_of(records: list[dict]) -> list[str]:
    return [r["attributes"]["flow.end_reason"] for r in records]


def test_full_flow_table_is_reported_not_silent(hosts, tmp_path: Path) -> None:
    a, b = hosts.a, hosts.b
    extra = "pipeline {\n  flow_capture {\n    flow_stats_capacity = 8\n  }\n}\n"
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path, extra=extra)))
    burst = """
import socket, sys
for port in range(47000, 47012):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("", port))
    s.sendto(b"z" * 10, (sys.argv[1], 9))
"""
    try:
        b.run("python3", "-c", burst, a.ip)
        time.sleep(2)
    finally:
        assert cap.stop() == 0
    udp = [r for r in cap.records if 47000 <= r["attributes"]["source.port"] < 47012]
    accounted = sum(r["attributes"]["flow.packets.delta"] for r in udp)
    warnings = [line for line in cap.stderr if "flow table full (8 entries)" in line]
    assert warnings, cap.stderr
    not_accounted = sum(int(w.split(": ")[1].split()[0]) for w in warnings)
    assert accounted + not_accounted >= 12  # the table may also hold ICMP replies
    assert accounted < 12
    assert "lack_of_resources" in reasons_of(cap.records)


def add_veth(link, name: str, subnet: int, *, up: bool = True) -> tuple[str, str]:
    """A second veth pair between the link's namespaces: `name`0 in a, `name`1 in b."""
    a, b = link.a, link.b
    a.run(
        "ip", "link", "add", f"{name}0", "type", "veth", "peer", "name", f"{name}1", "netns", b.ns
    )
    ip_a, ip_b = f"10.203.{subnet}.1", f"10.203.{subnet}.2"
    a.run("ip", "addr", "add", f"{ip_a}/24", "dev", f"{name}0")
    b.run("ip", "addr", "add", f"{ip_b}/24", "dev", f"{name}1")
    b.run("ip", "link", "set", f"{name}1", "up")
    if up:
        a.run("ip", "link", "set", f"{name}0", "up")
    return ip_a, ip_b


def test_auto_discovery_attaches_new_and_forgets_deleted_interfaces(hosts, tmp_path: Path) -> None:
    a, b = hosts.a, hosts.b
    cap = start_capture(a, "-i", a.ifname, "-i", "mauto*", "-c", str(write_config(tmp_path)))
    ip_a, ip_b = add_veth(hosts, "mauto", 201)
    deadline = time.time() + 5
    while not any("attached to mauto0" in line for line in cap.stderr) and time.time() < deadline:
        time.sleep(0.05)
    b.run("ping", "-c", "2", "-i", "0.2", ip_a)
    time.sleep(1.5)  # icmp_timeout 1 s + poll
    a.run("ip", "link", "del", "mauto0")
    time.sleep(0.5)
    assert cap.proc.poll() is None  # still capturing on veth0
    assert cap.stop() == 0
    echo = cap.for_flow(**{"source.address": ip_b, "network.interface.name": "mauto0"})
    assert totals(echo)[:1] == (2,)
    assert any("mauto0 disappeared" in line for line in cap.stderr)


def test_interface_down_at_start_is_captured_once_up(hosts, tmp_path: Path) -> None:
    a, b = hosts.a, hosts.b
    ip_a, ip_b = add_veth(hosts, "mdown", 202, up=False)
    cap = start_capture(a, "-i", "mdown0", "-c", str(write_config(tmp_path)))
    a.run("ip", "link", "set", "mdown0", "up")
    time.sleep(0.3)
    b.run("ping", "-c", "3", "-i", "0.2", ip_a)
    assert cap.stop() == 0
    assert totals(cap.for_flow(**{"source.address": ip_b}))[0] == 3


def test_sighup_reloads_valid_config_and_refuses_invalid(hosts, tmp_path: Path) -> None:
    a, b = hosts.a, hosts.b
    ip_a, ip_b = add_veth(hosts, "mhup", 203)
    cfg = write_config(
        tmp_path,
        extra=f'auto_reload = true\ndiscovery "instrument" {{\n  interfaces = ["{a.ifname}"]\n}}\n',
    )
    cap = start_capture(a, "-c", str(cfg))
    cfg.write_text(cfg.read_text() + "span {\n  bogus_key = 1\n}\n")
    cap.proc.send_signal(signal.SIGHUP)
    time.sleep(0.6)
    assert any("reload refused" in line and "bogus_key" in line for line in cap.stderr)
    # A valid change: also capture on mhup0 (patterns come from the file now).
    cfg.write_text(
        write_config(
            tmp_path,
            extra='auto_reload = true\ndiscovery "instrument" {\n'
            f'  interfaces = ["{a.ifname}", "mhup0"]\n}}\n',
        ).read_text()
    )
    cap.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 5
    while not any("attached to mhup0" in line for line in cap.stderr) and time.time() < deadline:
        time.sleep(0.05)
    b.run("ping", "-c", "2", "-i", "0.2", ip_a)
    assert cap.stop() == 0
    assert any("configuration reloaded" in line for line in cap.stderr)
    assert totals(cap.for_flow(**{"source.address": ip_b}))[0] == 2
