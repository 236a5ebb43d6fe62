"""Throughput overhead: iperf3 TCP and UDP over a veth pair with an empty eBPF program
on the hooks, mermin, softflowd and pmacctd on the same veth, and the CPU each tool used.

One run = every condition x protocol in turn (round-robin), each tool's iperf3 run right
after a no-capture run of the same protocol; the throughput lost is that pair's, and
`--runs` runs give medians (pairs cancel the drift of a shared VM's speed). The tool
watches veth0 in namespace a (the iperf3 client's side). "empty eBPF hooks" is a
two-instruction pass-through program at TCX ingress and egress (bench/empty_hooks.py):
what any TC-hook tool pays before doing anything.

Tool CPU is utime+stime from /proc/<pid>/stat over the iperf3 run; for mermin the run
time of its eBPF programs is added, because that work happens in the senders' context,
not in mermin's process. Measuring that needs the kernel's BPF statistics, which cost
two clock reads per program run themselves, so mermin's CPU comes from a second iperf3
run with them on, and its throughput from the run with them off.

    sudo .venv/bin/python bench/throughput.py [--runs N] [--seconds S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from common import (
    MERMIN,
    bpfsys,
    ensure_tools,
    machine,
    median,
    netns,
    pmacctd_config,
    running,
    save,
    softflowd_argv,
    tree_cpu_seconds,
)

PROTOCOLS = ("tcp", "udp")
EMPTY_HOOKS = Path(__file__).resolve().parent / "empty_hooks.py"
BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 32, 0


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[None]:
    """Kernel BPF run-time statistics on while the block runs (off again when the fd closes)."""
    fd = bpfsys._bpf(BPF_ENABLE_STATS, bpfsys._attr(8, (0, "I", BPF_STATS_RUN_TIME)))
    try:
        yield
    finally:
        os.close(fd)


def mermin_kernel_seconds(host: netns.Host) -> float:
    """Run time of the mermin programs on the host's hooks (bpftool prog show)."""
    links = json.loads(host.run(MERMIN, "interfaces", "--json", "-i", host.ifname).stdout)
    ids = [t["prog_id"] for i in links if i["name"] == host.ifname
           for t in i["tc_programs"] or [] if t["ours"]]  # fmt: skip
    total = 0
    for prog_id in ids:
        info = json.loads(host.run("bpftool", "-j", "prog", "show", "id", str(prog_id)).stdout)
        total += int(info.get("run_time_ns", 0))
    return total / 1e9


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


def cpu_used(tool: str, proc: subprocess.Popen[str] | None, host: netns.Host) -> float:
    """CPU seconds the tool has used so far (mermin: its process and its eBPF programs)."""
    used = tree_cpu_seconds(proc.pid) if proc else 0.0
    return used + (mermin_kernel_seconds(host) if tool == "mermin" else 0.0)


def measured_iperf(
    tool: str,
    proc: subprocess.Popen[str] | None,
    client: netns.Host,
    server: netns.Host,
    proto: str,
    seconds: float,
) -> tuple[float, float]:
    """Gbit/s of one iperf3 run and the tool's CPU over it (% of one core)."""
    before = cpu_used(tool, proc, client)
    started = time.monotonic()
    rate = iperf(client, server, proto, seconds)
    elapsed = time.monotonic() - started
    return rate, 100 * (cpu_used(tool, proc, client) - before) / elapsed


def iperf(client: netns.Host, server: netns.Host, proto: str, seconds: float) -> float:
    """Receiver-side Gbit/s of one iperf3 run."""
    # Client on CPU 0, server on CPU 1: less run-to-run noise on a small machine.
    argv = ["iperf3", "-c", server.ip4, "-t", str(seconds), "-J", "-A", "0,1"]
    if proto == "udp":
        argv += ["-u", "-b", "0", "-l", "1400"]
    out = json.loads(client.run(*argv, timeout=seconds + 30).stdout)
    end = out["end"]
    summary = end.get("sum_received") or end["sum"]
    return float(summary["bits_per_second"]) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    ensure_tools(["iperf3", "softflowd", "pmacctd"])
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
                    with make() as proc:
                        for proto in PROTOCOLS:
                            rate, used = measured_iperf(name, proc, a, b, proto, args.seconds)
                            if name == "mermin":  # its CPU, eBPF included: see the module doc
                                with bpf_run_time_stats():
                                    _, used = measured_iperf(name, proc, a, b, proto, args.seconds)
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
            "cpu_pct": median(cpu[(name, proto)]),
            "samples": gbps[(name, proto)],
            "loss_samples": loss[(name, proto)],
        }
        for proto in PROTOCOLS
        for name in conditions
    ]
    save("throughput", {"runs": args.runs, "seconds": args.seconds, "rows": rows,
                        "machine": machine()})  # fmt: skip
    print("| protocol | tool | Gbit/s | throughput lost (median of pairs) | tool CPU |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['protocol']} | {r['tool']} | {r['gbit_s']:.2f} | {r['overhead_pct']:+.1f} % "
            f"| {r['cpu_pct']:.1f} % |"
        )


if __name__ == "__main__":
    main()
