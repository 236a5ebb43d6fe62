"""`mermin flows`: its snapshots (--stdout, --json, --once, filters, --sort, --top) against
known UDP traffic, the full-screen view driven under tmux, its own engine when no capture
runs, and the message when it may not start one."""

from __future__ import annotations

import json
import re
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mermin_cli.cli.flows_cmd import negations
from mermin_cli.errors import UsageError
from mermin_cli.views.snapshot import FilterFlag, FlowMatch

try:
    from .capture_run import MERMIN, start_capture, write_config
except ImportError:
    from capture_run import MERMIN, start_capture, write_config

API_PORT = 18081
CONFIG = f"""
internal "metrics" {{
  port = 19251
}}
internal "server" {{
  port = {API_PORT}
}}
"""
UNPRIVILEGED = ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")

# Echo server in namespace a: UDP port 7000 answers each datagram with the same bytes,
# port 7001 only receives; IPv4 and IPv6.
SERVER = """
import select, socket
socks = []
for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    for port in (7000, 7001):
        s = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port)); socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(65535)
        if s.getsockname()[1] == 7000:
            s.sendto(data, peer)
"""
# Client in namespace b: one flow per call, COUNT datagrams of SIZE bytes GAP seconds apart.
CLIENT = """
import socket, sys, time
src, sport, dst, dport, count, size, gap = sys.argv[1:]
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM); s.bind((src, int(sport))); s.settimeout(2)
for i in range(int(count)):
    if i:
        time.sleep(float(gap))
    s.sendto(b"x" * int(size), (dst, int(dport)))
    if int(dport) == 7000:
        s.recv(65535)
"""


def flow_plan(link) -> dict[str, dict[str, Any]]:
    """The flows sent, with what the capture must count (IP bytes: 20/40 + 8 + payload)."""
    a, b = link.a, link.b
    plan = {
        "echo": (b.ip4, 41001, a.ip4, 7000, 5, 200, 0.15, 20),
        "oneway": (b.ip4, 41002, a.ip4, 7001, 2, 1000, 0, 20),
        "small": (b.ip4, 41003, a.ip4, 7000, 10, 10, 0.02, 20),
        "six": (b.ip6, 41004, a.ip6, 7000, 3, 100, 0.05, 40),
    }
    out = {}
    for name, (src, sport, dst, dport, count, size, gap, ip_header) in plan.items():
        back = count if dport == 7000 else 0
        length = ip_header + 8 + size
        out[name] = {
            "args": (src, sport, dst, dport, count, size, gap),
            "source.address": src,
            "source.port": sport,
            "destination.address": dst,
            "destination.port": dport,
            "packets": [count, back],
            "bytes": [count * length, back * length],
        }
    return out


def send(link, plan: dict[str, dict[str, Any]]) -> None:
    server = link.a.popen("python3", "-c", SERVER, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        for flow in plan.values():
            link.b.run("python3", "-c", CLIENT, *map(str, flow["args"]))
    finally:
        server.kill()
        server.wait()


def by_port(flows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {f["source.port"]: f for f in flows}


def flows_cli(host, *args: str, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    prefix = UNPRIVILEGED if unprivileged else ()
    return host.run(*prefix, MERMIN, "flows", "--api", f"http://127.0.0.1:{API_PORT}", *args)


def snapshot(host, *args: str) -> dict[str, Any]:
    out = flows_cli(host, "--once", "--json", *args, unprivileged=True).stdout
    assert out.count("\n") == 1, out
    return json.loads(out)


def order(snap: dict[str, Any]) -> list[int]:
    return [f["source.port"] for f in snap["flows"]]


@pytest.fixture
def traffic(link, tmp_path: Path):
    """A capture in namespace a (UDP flows stay active for 30 s) that saw the planned flows."""
    cfg = write_config(tmp_path, extra=CONFIG)
    cfg.write_text(re.sub(r'udp_timeout\s*= "1s"', 'udp_timeout = "30s"', cfg.read_text()))
    cap = start_capture(link.a, "-i", link.a.ifname, "-c", str(cfg))
    try:
        plan = flow_plan(link)
        send(link, plan)
        time.sleep(0.6)  # a poll (200 ms) after the last packet
        yield plan
    finally:
        assert cap.stop() == 0, "".join(cap.stderr)


# ------------------------------------------------------------------ without the kernel


def test_not_negates_the_next_filter_flag() -> None:
    args = ["--ip", "10.0.0.1", "--not", "--sort", "rate", "--ip=10.0.0.2", "-iveth0"]
    args += ["--not", "-i", "--not", "--port", "53", "--", "--not"]
    assert negations(args) == {
        "ip": [False, True],
        "port": [False],  # `--not` after -i is its value, not a flag
        "protocol": [],
        "interface": [False, True],
    }
    with pytest.raises(UsageError, match="--not must come before a filter flag"):
        negations(["--ip", "10.0.0.1", "--not"])


def test_filters_combine_like_hubble() -> None:
    def flow(src: str, dport: int, transport: str = "udp", iface: str = "eth0") -> dict:
        return {
            "source.address": src, "destination.address": "10.9.0.1", "source.port": 40000,
            "destination.port": dport, "network.transport": transport,
            "network.type": "ipv6" if ":" in src else "ipv4", "network.interface.name": iface,
        }  # fmt: skip

    match = FlowMatch.from_flags(
        [
            FilterFlag("ip", "10.1.0.0/16"),
            FilterFlag("ip", "fd00::/8"),
            FilterFlag("port", "50-60"),
            FilterFlag("port", "443", negated=True),
            FilterFlag("interface", "tun*", negated=True),
        ]
    )
    assert match(flow("10.1.2.3", 53))
    assert match(flow("fd00::1", 55))  # either --ip, and --port
    assert not match(flow("10.2.0.1", 53))  # no --ip matches
    assert not match(flow("10.1.2.3", 80))  # no --port matches
    assert not match(flow("10.1.2.3", 53, iface="tun0"))  # --not -i
    assert not match(flow("10.1.2.3", 53, "icmp"))  # ICMP has no ports
    assert FlowMatch.from_flags([FilterFlag("protocol", "17")])(flow("10.1.2.3", 1))
    assert FlowMatch.from_flags([FilterFlag("protocol", "IPv6")])(flow("fd00::1", 1))


def test_bad_filters_are_usage_errors() -> None:
    for args, message in (
        (["--not"], "--not must come before a filter flag"),
        (["--ip", "10.0.0.300"], "--ip '10.0.0.300' is invalid"),
        (["--port", "80-70"], "--port '80-70' is invalid"),
        (["--protocol", "tpc"], "(did you mean tcp?)"),
        (["--stdout", "--json"], "--stdout and --json exclude each other"),
    ):
        res = subprocess.run([MERMIN, "flows", "--once", *args], capture_output=True, text=True)
        assert res.returncode == 2, res
        assert message in res.stderr and res.stderr.count("\n") == 1


# ------------------------------------------------------------------ a running capture


@pytest.mark.bpf
@pytest.mark.usefixtures("require_bpf")
def test_json_snapshots_count_the_traffic_sent(link, traffic) -> None:
    a = link.a
    snap = snapshot(a, "--protocol", "udp")  # unprivileged: the API needs no capabilities
    assert snap["schema"] == "mermin.flows/v1" and snap["sort"] == "bytes"
    assert snap["interfaces"] == [a.ifname]
    got = by_port(snap["flows"])
    assert sorted(got) == [f["source.port"] for f in traffic.values()]
    for want in traffic.values():
        flow = got[want["source.port"]]
        for key in ("source.address", "destination.address", "destination.port", "packets"):
            assert flow[key] == want[key], (key, flow)
        assert flow["bytes"] == want["bytes"], flow
        assert flow["network.transport"] == "udp" and flow["network.interface.name"] == a.ifname
        assert flow["kind"] == "server"
    totals = snap["totals"]
    assert totals["flows"] == 4 and totals["active_flows"] >= 4
    assert totals["packets"] == [sum(f["packets"][d] for f in traffic.values()) for d in (0, 1)]
    assert totals["bytes"] == [sum(f["bytes"][d] for f in traffic.values()) for d in (0, 1)]
    assert set(snap["loss"]) == {
        "table_full_packets", "ringbuf_dropped", "backpressure_dropped", "export_dropped",
        "filtered_flows",
    }  # fmt: skip
    assert not any(snap["loss"].values())
    # bytes 2280 > 2056 > 888 > 760
    assert order(snap) == [41001, 41002, 41004, 41003]


@pytest.mark.bpf
@pytest.mark.usefixtures("require_bpf")
def test_filters_sort_and_top(link, traffic) -> None:
    a, b = link.a, link.b
    udp = ("--protocol", "udp")
    assert order(snapshot(a, *udp, "--sort", "packets")) == [41003, 41001, 41004, 41002]
    assert order(snapshot(a, *udp, "--sort", "duration"))[:3] == [41001, 41003, 41004]
    rates = [f["bytes_per_second"] for f in snapshot(a, *udp, "--sort", "rate")["flows"]]
    assert rates == sorted(rates, reverse=True)
    top = snapshot(a, *udp, "--sort", "packets", "-n", "2")
    assert order(top) == [41003, 41001] and top["totals"]["flows"] == 4  # totals: all matching
    assert sorted(order(snapshot(a, "--ip", b.ip4, *udp))) == [41001, 41002, 41003]
    assert order(snapshot(a, "--not", "--ip", b.ip4, *udp)) == [41004]
    assert order(snapshot(a, "--ip", f"{a.ip4}/32", "--ip", a.ip6, *udp)) == order(
        snapshot(a, *udp)
    )
    assert order(snapshot(a, "--port", "7001")) == [41002]
    assert order(snapshot(a, "--port", "41003-41004", "--protocol", "ipv6")) == [41004]
    assert sorted(order(snapshot(a, "--not", "--port", "7001", *udp))) == [41001, 41003, 41004]
    assert sorted(order(snapshot(a, "--not", "--port=7000", "--not", "--protocol", "icmpv6"))) == [
        41002
    ]
    assert len(snapshot(a, "-i", a.ifname, *udp)["flows"]) == 4
    assert snapshot(a, "--not", "-i", "veth*", *udp)["flows"] == []


@pytest.mark.bpf
@pytest.mark.usefixtures("require_bpf")
def test_stdout_is_plain_aligned_text(link, traffic) -> None:
    a = link.a
    out = flows_cli(a, "--once", "--stdout", "--protocol", "udp", unprivileged=True).stdout
    assert "\x1b" not in out and "\r" not in out
    lines = out.splitlines()
    assert lines[0].startswith(f"mermin flows  http://127.0.0.1:{API_PORT}  on {a.ifname}  ")
    assert lines[0].endswith("sort: bytes")
    assert lines[1].startswith("flows: 4 of ") and "packets: 38  bytes: 6.0kB" in lines[1]
    assert lines[2] == (
        "loss: table full 0 packets, ring buffer 0 events, backpressure 0 events, "
        "export 0 records  filtered: 0 flows"
    )
    assert lines[3] == ""
    titles, rows = lines[4], lines[5:]
    assert titles.split() == [
        "SOURCE", "DESTINATION", "PROTO", "STATE", "IFACE", "PKTS->", "PKTS<-", "BYTES->",
        "BYTES<-", "BYTES/S", "PKTS/S", "DURATION",
    ]  # fmt: skip
    assert len(rows) == 4 and {len(r) for r in rows} == {len(titles)}  # right edge aligned
    b = link.b
    want = [  # by bytes; UDP has no state, so 11 cells
        [f"{b.ip4}:41001", f"{a.ip4}:7000", "udp", a.ifname, "5", "5", "1.1kB", "1.1kB"],
        [f"{b.ip4}:41002", f"{a.ip4}:7001", "udp", a.ifname, "2", "0", "2.1kB", "0B"],
        [f"[{b.ip6}]:41004", f"[{a.ip6}]:7000", "udp", a.ifname, "3", "3", "444B", "444B"],
        [f"{b.ip4}:41003", f"{a.ip4}:7000", "udp", a.ifname, "10", "10", "380B", "380B"],
    ]
    assert [r.split()[:8] for r in rows] == want
    for r in rows:  # each cell in its column: the right-aligned counters end under their title
        end = titles.index("BYTES<-") + len("BYTES<-")
        assert r[:end].split()[-1] == r.split()[7]
    duration = [float(r.split()[-1].rstrip("s")) for r in rows]
    assert duration[0] >= 0.6 and duration[1] < 0.1


@pytest.mark.bpf
@pytest.mark.usefixtures("require_bpf")
def test_stdout_refreshes_every_interval(link, traffic) -> None:
    proc = link.a.popen(
        *UNPRIVILEGED, MERMIN, "flows", "--api", f"http://127.0.0.1:{API_PORT}", "--stdout",
        "--interval", "0.3", "--port", "7001", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(3.0)  # start-up (up to ~1.5 s on a slow VM), then several refreshes
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    blocks = out.split("mermin flows  ")[1:]  # one per refresh, a blank line apart
    assert len(blocks) >= 3, out
    assert all(block.endswith("0.0s\n\n") and "41002" in block for block in blocks), out
    assert "\x1b" not in out


# ------------------------------------------------------------------ the full screen


class Tmux:
    """A tmux server of our own (its own socket) with one window."""

    def __init__(self, tmp_path: Path) -> None:
        self.socket = str(tmp_path / "tmux.sock")

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-S", self.socket, *args], check=True, capture_output=True, text=True
        ).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "flows")

    def wait_for(
        self, *texts: str, where: Callable[[str], bool] = lambda _: True, timeout: float = 30
    ) -> str:
        """The first screen that shows every one of `texts` and satisfies `where` (a screen
        caught halfway through a redraw shows only some of a frame's lines)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if all(text in screen for text in texts) and where(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{texts!r} did not appear on the screen:\n{screen}")
            time.sleep(0.1)

    def flag(self, name: str) -> str:
        return self("display-message", "-p", "-t", "flows", f"#{{{name}}}").strip()


@pytest.fixture
def tmux(tmp_path: Path):
    if subprocess.run(["which", "tmux"], capture_output=True).returncode:
        pytest.skip("tmux is not installed (scripts/setup.sh installs it)")
    t = Tmux(tmp_path)
    try:
        yield t
    finally:
        subprocess.run(["tmux", "-S", t.socket, "kill-server"], capture_output=True)


@pytest.mark.bpf
@pytest.mark.usefixtures("require_bpf")
def test_full_screen_view_under_tmux(link, traffic, tmux) -> None:
    a, b = link.a, link.b
    command = shlex.join(  # pytest exports COLUMNS=80, LINES=24: the real size instead
        ["env", "-u", "COLUMNS", "-u", "LINES", *UNPRIVILEGED, MERMIN, "flows", "--api", f"http://127.0.0.1:{API_PORT}",
         "--protocol", "udp", "--interval", "0.3"]
    )  # fmt: skip
    script = f'{command}; echo "exit=$?"; stty -a; sleep 60'
    tmux(
        "new-session", "-d", "-s", "flows", "-x", "200", "-y", "30",
        "ip", "netns", "exec", a.ns, "sh", "-c", script,
    )  # fmt: skip
    screen = tmux.wait_for(f"{b.ip4}:41001", f"{b.ip4}:41003", f"[{b.ip6}]:41004", "flows: 4 of ")
    assert tmux.flag("alternate_on") == "1" and tmux.flag("cursor_flag") == "0"
    lines = screen.splitlines()
    assert lines[0].startswith(f"mermin flows  http://127.0.0.1:{API_PORT}  on {a.ifname}")
    assert "sort: bytes" in lines[0]
    assert lines[1].startswith("flows: 4 of ") and lines[2].startswith("loss: table full 0")
    assert "BYTES-> ▼" in lines[4] and "PKTS-> ▼" not in lines[4]
    rows = [line.split() for line in lines[5:9]]
    assert [r[0] for r in rows] == [
        f"{b.ip4}:41001", f"{b.ip4}:41002", f"[{b.ip6}]:41004", f"{b.ip4}:41003",
    ]  # fmt: skip
    assert rows[0][1:8] == [f"{a.ip4}:7000", "udp", a.ifname, "5", "5", "1.1kB", "1.1kB"]

    tmux("send-keys", "-t", "flows", "p")
    first_row = lambda screen: screen.splitlines()[5].split()[:1] == [f"{b.ip4}:41003"]  # noqa: E731
    screen = tmux.wait_for("sort: packets", "PKTS-> ▼", where=first_row)
    lines = screen.splitlines()
    assert "PKTS-> ▼" in lines[4] and "BYTES-> ▼" not in lines[4]
    assert lines[5].split()[0] == f"{b.ip4}:41003"  # 20 packets

    tmux("send-keys", "-t", "flows", "q")
    screen = tmux.wait_for("exit=")
    assert "exit=0" in screen
    assert tmux.flag("alternate_on") == "0" and tmux.flag("cursor_flag") == "1"
    stty = " " + " ".join(screen.split()) + " "
    assert " icanon " in stty and " echo " in stty  # cbreak undone
    assert "mermin flows" not in screen  # the table went with the alternate screen


# ------------------------------------------------------------------ no capture running


def ours_attached(host) -> list[str]:
    """Our programs on the host's interface (TCX or tc), as `mermin interfaces` sees them."""
    rows = json.loads(host.run(MERMIN, "interfaces", "--json").stdout)
    row = next(r for r in rows if r["name"] == host.ifname)
    return [p["name"] for p in row["tc_programs"] if p["ours"]]


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise AssertionError("no snapshot in time")
    return proc.stdout.readline()


@pytest.mark.bpf
@pytest.mark.usefixtures("require_bpf")
def test_runs_its_own_engine_when_no_capture_runs(link) -> None:
    a = link.a
    proc = a.popen(
        MERMIN, "flows", "-i", a.ifname, "--json", "--interval", "0.3", "--protocol", "udp",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        first = json.loads(read_line(proc, 60))  # the engine has attached and polled once
        assert first["source"] == "own capture" and first["interfaces"] == [a.ifname]
        assert ours_attached(a) == ["mermin_l2", "mermin_l2"]
        plan = flow_plan(link)
        del plan["echo"], plan["small"]
        send(link, plan)
        deadline = time.monotonic() + 20
        while True:
            snap = json.loads(read_line(proc, 10))
            got = by_port(snap["flows"])
            if all(got.get(p["source.port"], {}).get("bytes") == p["bytes"] for p in plan.values()):
                break
            assert time.monotonic() < deadline, snap
        for want in plan.values():
            assert got[want["source.port"]]["packets"] == want["packets"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "no capture answers at http://127.0.0.1:8080; starting one" in err
    assert "Traceback" not in err
    assert ours_attached(a) == []


@pytest.mark.bpf
@pytest.mark.usefixtures("require_bpf")
def test_no_capture_and_no_privileges_is_one_clear_sentence(link) -> None:
    res = link.a.run(*UNPRIVILEGED, MERMIN, "flows", "--once", "--stdout", check=False)
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr == (
        "mermin: No capture is running at http://127.0.0.1:8080 and starting one needs root "
        "(sudo mermin flows --once --stdout).\n"
    )
