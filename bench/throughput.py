"""Throughput overhead: iperf3 TCP and UDP over veth pairs with an empty eBPF program
on the hooks, mermin, softflowd and pmacctd, the CPU each tool used, and what mermin's
program costs per packet in the real path.

Throughput lost. This VM's speed drifts by a third from one run of a few seconds to the
next (the same TCP run gives 8 to 18 Gbit/s), so a run with a tool compared with a run
without it says nothing about a 5 % cost. Instead two identical veth pairs each carry an
iperf3 stream, started together, both clients on CPU 0 and both servers on CPU 1: the
streams share the same CPUs at the same moments and see the same drift. The tool watches
one pair; the stream it watches needs more CPU per byte and gets fewer bytes through, and
the ratio of the two rates is the cost. Each run watches pair 1, then pair 2, and the
geometric mean of the two ratios cancels any difference between the pairs:
lost = 1 - sqrt(watched1/other1 x watched2/other2). "no capture" runs the same procedure
with nothing attached (the method's own noise); "empty eBPF hooks" is a two-instruction
pass-through program at TCX ingress and egress (bench/empty_hooks.py): what any TC-hook
tool pays before doing anything. A tool's own process runs beside both streams and slows
both alike, so it shows in the CPU measurement, not here.

CPU is the whole machine's: the run time of all its tasks (see busy_seconds) during an
iperf3 run at a fixed load well below saturation, minus that of the no-capture run right
before it. The load is one where per-packet work dominates: UDP in 64-byte datagrams at
`--udp-rate`; TCP at `--tcp-rate` in 1,448-byte writes with Nagle off, one segment each
(about 26k data packets/s at 300 Mbit/s; in 128 KiB writes TCP leaves the sender as
GSO packets of ~43 KB, under a thousand a second, and every tool's cost is lost in the
noise). Counting the tool's
process alone would leave out what each tool makes the kernel do in the senders'
context: mermin's eBPF programs, and the AF_PACKET copies of every packet that feed
softflowd's and pmacctd's libpcap. At a fixed rate that work shows as busy time, where at
full speed it only shows as lost throughput.

Live cost per packet: mermin and the empty program attached together to one veth, the
kernel's run-time statistics on (BPF_ENABLE_STATS) for one iperf3 run per protocol: ns per
program run as the kernel measures it in the real path, where caches are colder than in
bench/kernel_cost.py's BPF_PROG_TEST_RUN loop.

    sudo .venv/bin/python bench/throughput.py [--runs N] [--seconds S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from common import (
    CLK_TCK,
    MERMIN,
    ensure_tools,
    machine,
    median,
    netns,
    pmacctd_config,
    running,
    save,
    softflowd_argv,
)

from mermin_cli.engine import bpfsys

PROTOCOLS = ("tcp", "udp")
EMPTY_HOOKS = Path(__file__).resolve().parent / "empty_hooks.py"
NO_CAPTURE = "no capture"
LIVE_PROGRAMS = {"mermin": "mermin_l2", "empty eBPF hooks": "bench_empty"}


CPUACCT = Path("/sys/fs/cgroup/cpuacct/cpuacct.usage")
CpuLoad = dict[str, tuple[str, int]]  # protocol -> (iperf3 -b, bytes per write)
Tool = Callable[[netns.Host], AbstractContextManager[Any]]


def busy_seconds() -> float:
    """CPU seconds all tasks of the machine have run (the root cgroup's cpuacct: exact run
    times, kernel threads and the softirq work done in tasks included). /proc/stat is the
    fallback, but it samples at each tick: paced senders (iperf3 -b) that run between ticks
    read as 1 % busy in one run and 150 % in the next."""
    if CPUACCT.exists():
        return int(CPUACCT.read_text()) / 1e9
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / CLK_TCK


def tools(tmp: Path) -> dict[str, Tool]:
    """Each condition: a context manager that runs the tool on a host's veth (or nothing)."""

    def pmacctd(host: netns.Host) -> AbstractContextManager[Any]:
        conf = pmacctd_config(tmp / f"{host.ifname}.conf", host.ifname, tmp / "pmacct.csv")
        return running(host, ["pmacctd", "-f", str(conf)])

    return {
        NO_CAPTURE: lambda host: contextlib.nullcontext(),
        "empty eBPF hooks": lambda host: running(
            host, [sys.executable, str(EMPTY_HOOKS), host.ifname], ready="attached"
        ),
        "mermin": lambda host: running(
            host, [MERMIN, "capture", "-i", host.ifname, "-o", "json"], ready="capturing on"
        ),
        "softflowd": lambda host: running(host, softflowd_argv(host.ifname), cwd=tmp),
        "pmacctd": pmacctd,
    }


def busy_pct(client: netns.Host, server: netns.Host, proto: str, seconds: float,
             load: CpuLoad) -> float:  # fmt: skip
    """The machine's busy CPU during one iperf3 run at a fixed load, in % of one core."""
    before, started = busy_seconds(), time.monotonic()
    iperf(client, server, proto, seconds, *load[proto])
    return 100 * (busy_seconds() - before) / (time.monotonic() - started)


def iperf_argv(server: netns.Host, proto: str, seconds: float, rate: str = "0",
               length: int = 0) -> list[str]:  # fmt: skip
    """iperf3 client at `rate` (0: as fast as it goes) writing `length` bytes at a time:
    UDP datagrams of that size (1,400 if 0); TCP writes sent at once (Nagle off), iperf3's
    128 KiB if 0."""
    # Client on CPU 0, server on CPU 1: less run-to-run noise on a small machine.
    argv = ["iperf3", "-c", server.ip4, "-t", str(seconds), "-J", "-A", "0,1", "-b", rate]
    if proto == "udp":
        return [*argv, "-u", "-l", str(length or 1400)]
    return [*argv, "-N", "-l", str(length)] if length else argv


def received_gbps(report: str) -> float:
    """Receiver-side Gbit/s of an iperf3 -J report."""
    end = json.loads(report)["end"]
    return float((end.get("sum_received") or end["sum"])["bits_per_second"]) / 1e9


def iperf(client: netns.Host, server: netns.Host, proto: str, seconds: float,
          rate: str = "0", length: int = 0) -> float:  # fmt: skip
    """Receiver-side Gbit/s of one iperf3 run."""
    argv = iperf_argv(server, proto, seconds, rate, length)
    return received_gbps(client.run(*argv, timeout=seconds + 30).stdout)


def side_by_side(links: tuple[netns.Link, netns.Link], proto: str, seconds: float) -> list[float]:
    """Receiver-side Gbit/s of one iperf3 stream per link, all started together."""
    clients = [
        link.a.popen(*iperf_argv(link.b, proto, seconds), stdout=-1, stderr=-1) for link in links
    ]
    rates = []
    for proc in clients:
        out, err = proc.communicate(timeout=seconds + 30)
        if proc.returncode:
            raise RuntimeError(f"iperf3 failed: {err.strip()}")
        rates.append(received_gbps(out))
    return rates


@contextlib.contextmanager
def run_time_stats() -> Iterator[Callable[[], dict[str, tuple[int, int]]]]:
    """Kernel run-time statistics on for the block; yields a reader of (ns, runs) per
    program of LIVE_PROGRAMS (summed over the hooks)."""
    fd = bpfsys.enable_run_time_stats()

    def read() -> dict[str, tuple[int, int]]:
        tools = {name: tool for tool, name in LIVE_PROGRAMS.items()}
        totals = {tool: (0, 0) for tool in LIVE_PROGRAMS}
        for kernel_id in bpfsys.prog_ids():
            with contextlib.suppress(OSError):  # unloaded meanwhile
                tool = tools.get(bpfsys.prog_name(kernel_id))
                if tool is not None:
                    ns, runs = bpfsys.prog_run_time(kernel_id)
                    totals[tool] = (totals[tool][0] + ns, totals[tool][1] + runs)
        return totals

    try:
        yield read
    finally:
        os.close(fd)


def live_cost(link: netns.Link, conditions: dict[str, Tool], seconds: float) -> dict[str, Any]:
    """ns per run of mermin's program and of the empty one, side by side on one veth."""
    out: dict[str, Any] = {}
    with (
        conditions["mermin"](link.a),
        conditions["empty eBPF hooks"](link.a),
        run_time_stats() as read,
    ):
        for proto in PROTOCOLS:
            before = read()
            iperf(link.a, link.b, proto, seconds)
            after = read()
            out[proto] = {
                tool: {"runs": after[tool][1] - before[tool][1],
                       "ns": (after[tool][0] - before[tool][0])
                       / max(1, after[tool][1] - before[tool][1])}
                for tool in LIVE_PROGRAMS
            }  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=3.0, help="each throughput run")
    ap.add_argument("--cpu-seconds", type=float, default=5.0, help="each fixed-load CPU run")
    ap.add_argument("--tcp-rate", default="300M", help="iperf3 -b of the TCP CPU runs")
    ap.add_argument("--tcp-write", type=int, default=1448,
                    help="bytes per write of the TCP CPU runs (one segment each)")  # fmt: skip
    ap.add_argument("--udp-rate", default="20M", help="iperf3 -b of the UDP CPU runs (64 B)")
    args = ap.parse_args()
    ensure_tools(["iperf3", "softflowd", "pmacctd"])
    load: CpuLoad = {"tcp": (args.tcp_rate, args.tcp_write), "udp": (args.udp_rate, 64)}
    gbps: dict[tuple[str, str], list[float]] = {}
    loss: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="mermin-bench-") as d,
        netns.temp_link("bench-tput1") as one,
        netns.temp_link("bench-tput2") as two,
        running(one.b, ["iperf3", "-s"], settle=0.5),
        running(two.b, ["iperf3", "-s"], settle=0.5),
    ):
        links = (one, two)
        conditions = tools(Path(d))
        for proto in PROTOCOLS:  # warm-up, not recorded: the first runs are slow
            side_by_side(links, proto, args.seconds)
        for _ in range(args.runs):
            for name, make in conditions.items():
                # CPU: a no-capture run right before the tool's run of the same load.
                idle = {p: busy_pct(one.a, one.b, p, args.cpu_seconds, load) for p in PROTOCOLS}
                ratios: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
                for watched, link in enumerate(links):
                    with make(link.a):
                        for proto in PROTOCOLS:
                            rates = side_by_side(links, proto, args.seconds)
                            ratios[proto].append(rates[watched] / rates[1 - watched])
                            gbps.setdefault((name, proto), []).append(rates[watched])
                            if watched == 0:
                                used = busy_pct(one.a, one.b, proto, args.cpu_seconds, load)
                                cpu.setdefault((name, proto), []).append(used - idle[proto])
                for proto in PROTOCOLS:
                    kept = math.sqrt(ratios[proto][0] * ratios[proto][1])
                    loss.setdefault((name, proto), []).append(100 * (1 - kept))
        live = live_cost(one, conditions, args.seconds)
    rows = [
        {
            "protocol": proto,
            "tool": name,
            "gbit_s": median(gbps[(name, proto)]),
            "overhead_pct": median(loss[(name, proto)]),
            "cpu_added_pct": median(cpu[(name, proto)]),
            "samples": gbps[(name, proto)],
            "loss_samples": loss[(name, proto)],
            "cpu_samples": cpu[(name, proto)],
        }
        for proto in PROTOCOLS
        for name in conditions
    ]
    save("throughput", {"runs": args.runs, "seconds": args.seconds,
                        "cpu_seconds": args.cpu_seconds, "cpu_load": load,
                        "rows": rows, "live": live, "machine": machine()})  # fmt: skip
    print("| protocol | tool | Gbit/s | throughput lost (median of runs) | CPU added |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['protocol']} | {r['tool']} | {r['gbit_s']:.2f} | {r['overhead_pct']:+.1f} % "
            f"| {r['cpu_added_pct']:+.1f} % |"
        )
    for proto, tools_ in live.items():
        print(proto, ", ".join(f"{t} {v['ns']:.0f} ns/run ({v['runs']:,} runs)"
                               for t, v in tools_.items()))  # fmt: skip


if __name__ == "__main__":
    main()
