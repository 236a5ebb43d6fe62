"""Throughput overhead: iperf3 TCP and UDP over a veth pair with an empty eBPF program
on the hooks, mermin, softflowd and pmacctd on the same veth, and the CPU each tool used.

One run = every condition x protocol in turn (round-robin), each tool's iperf3 run right
after a no-capture run of the same protocol; the throughput lost is that pair's, and
`--runs` runs give medians (pairs cancel the drift of a shared VM's speed). The tool
watches veth0 in namespace a (the iperf3 client's side). "empty eBPF hooks" is a
two-instruction pass-through program at TCX ingress and egress (bench/empty_hooks.py):
what any TC-hook tool pays before doing anything.

CPU is the whole machine's: the run time of all its tasks (see busy_seconds) during an
iperf3 run at a fixed load well below saturation (TCP at `--tcp-rate`; UDP in 64-byte
datagrams at `--udp-rate`, so per-packet work dominates), minus that of the
no-capture run right before it. Counting the tool's
process alone would leave out what each tool makes the kernel do in the senders'
context: mermin's eBPF programs, and the AF_PACKET copies of every packet that feed
softflowd's and pmacctd's libpcap. At a fixed rate that work shows as busy time, where at
full speed it only shows as lost throughput.

    sudo .venv/bin/python bench/throughput.py [--runs N] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
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

PROTOCOLS = ("tcp", "udp")
EMPTY_HOOKS = Path(__file__).resolve().parent / "empty_hooks.py"


CPUACCT = Path("/sys/fs/cgroup/cpuacct/cpuacct.usage")
CpuLoad = dict[str, tuple[str, int]]  # protocol -> (iperf3 -b, UDP datagram bytes)


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


def tools(host: netns.Host, tmp: Path) -> dict[str, Callable[[], AbstractContextManager[Any]]]:
    """Each condition: a context manager that runs the tool on host's veth (or nothing)."""
    conf = pmacctd_config(tmp / "pmacct.conf", host.ifname, tmp / "pmacct.csv")
    return {
        "empty eBPF hooks": lambda: running(
            host, [sys.executable, str(EMPTY_HOOKS), host.ifname], ready="attached"
        ),
        "mermin": lambda: running(
            host, [MERMIN, "capture", "-i", host.ifname, "-o", "json"], ready="capturing on"
        ),
        "softflowd": lambda: running(host, softflowd_argv(host.ifname), cwd=tmp),
        "pmacctd": lambda: running(host, ["pmacctd", "-f", str(conf)]),
    }


def busy_pct(client: netns.Host, server: netns.Host, proto: str, seconds: float,
             load: CpuLoad) -> float:  # fmt: skip
    """The machine's busy CPU during one iperf3 run at a fixed load, in % of one core."""
    before, started = busy_seconds(), time.monotonic()
    iperf(client, server, proto, seconds, *load[proto])
    return 100 * (busy_seconds() - before) / (time.monotonic() - started)


def iperf(client: netns.Host, server: netns.Host, proto: str, seconds: float,
          rate: str = "0", length: int = 1400) -> float:  # fmt: skip
    """Receiver-side Gbit/s of one iperf3 run (`rate` 0: as fast as it goes; `length`:
    UDP datagram size)."""
    # Client on CPU 0, server on CPU 1: less run-to-run noise on a small machine.
    argv = ["iperf3", "-c", server.ip4, "-t", str(seconds), "-J", "-A", "0,1", "-b", rate]
    if proto == "udp":
        argv += ["-u", "-l", str(length)]
    out = json.loads(client.run(*argv, timeout=seconds + 30).stdout)
    end = out["end"]
    summary = end.get("sum_received") or end["sum"]
    return float(summary["bits_per_second"]) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=2.0, help="each throughput run")
    ap.add_argument("--cpu-seconds", type=float, default=5.0, help="each fixed-load CPU run")
    ap.add_argument("--tcp-rate", default="300M", help="iperf3 -b of the TCP CPU runs")
    ap.add_argument("--udp-rate", default="20M", help="iperf3 -b of the UDP CPU runs (64 B)")
    args = ap.parse_args()
    ensure_tools(["iperf3", "softflowd", "pmacctd"])
    load: CpuLoad = {"tcp": (args.tcp_rate, 1400), "udp": (args.udp_rate, 64)}
    gbps: dict[tuple[str, str], list[float]] = {}
    loss: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="mermin-bench-") as d,
        netns.temp_link("bench-tput") as link,
    ):
        a, b = link.a, link.b
        conditions = tools(a, Path(d))
        with running(b, ["iperf3", "-s"], settle=0.5):
            for proto in PROTOCOLS:  # warm-up, not recorded: the first runs are slow
                iperf(a, b, proto, args.seconds)
            for _ in range(args.runs):
                for name, make in conditions.items():
                    # A no-capture run right before each tool's run: the VM's speed drifts,
                    # and the loss of each pair cancels most of the drift.
                    base = {proto: iperf(a, b, proto, args.seconds) for proto in PROTOCOLS}
                    idle = {p: busy_pct(a, b, p, args.cpu_seconds, load) for p in PROTOCOLS}
                    with make():
                        for proto in PROTOCOLS:
                            rate = iperf(a, b, proto, args.seconds)
                            used = busy_pct(a, b, proto, args.cpu_seconds, load) - idle[proto]
                            gbps.setdefault((name, proto), []).append(rate)
                            loss.setdefault((name, proto), []).append(
                                100 * (base[proto] - rate) / base[proto]
                            )
                            cpu.setdefault((name, proto), []).append(used)
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
                        "rows": rows, "machine": machine()})  # fmt: skip
    print("| protocol | tool | Gbit/s | throughput lost (median of pairs) | CPU added |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['protocol']} | {r['tool']} | {r['gbit_s']:.2f} | {r['overhead_pct']:+.1f} % "
            f"| {r['cpu_added_pct']:+.1f} % |"
        )


if __name__ == "__main__":
    main()
