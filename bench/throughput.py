"""Throughput overhead: iperf3 TCP and UDP over a veth pair with no capture, mermin,
softflowd and pmacctd on the same veth, and the CPU each tool used.

One run = every condition x protocol in turn (round-robin, so drift hits all alike);
`--runs` runs, medians reported. The tool watches veth0 in namespace a (the iperf3
client's side). Tool CPU is utime+stime from /proc/<pid>/stat over the iperf3 run; for
mermin the run time of its eBPF programs is added (kernel BPF statistics, enabled with
BPF_ENABLE_STATS for the duration), because that work happens in the senders' context,
not in mermin's process.

    sudo .venv/bin/python bench/throughput.py [--runs N] [--seconds S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
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
        "no capture": nullcontext,
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
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    ensure_tools(["iperf3", "softflowd", "pmacctd"])
    gbps: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="mermin-bench-") as d,
        netns.temp_link("bench-tput") as link,
    ):
        a, b = link.a, link.b
        conditions = tools(a, Path(d))
        with running(b, ["iperf3", "-s"], settle=0.5), bpf_run_time_stats():
            for proto in PROTOCOLS:  # warm-up, not recorded: the first runs are slow
                iperf(a, b, proto, args.seconds)
            for _ in range(args.runs):
                for name, make in conditions.items():
                    with make() as proc:
                        for proto in PROTOCOLS:
                            before = cpu_used(name, proc, a)
                            started = time.monotonic()
                            rate = iperf(a, b, proto, args.seconds)
                            elapsed = time.monotonic() - started
                            used = cpu_used(name, proc, a) - before
                            gbps.setdefault((name, proto), []).append(rate)
                            cpu.setdefault((name, proto), []).append(100 * used / elapsed)
    rows = []
    for proto in PROTOCOLS:
        base = median(gbps[("no capture", proto)])
        for name in conditions:
            g = median(gbps[(name, proto)])
            rows.append(
                {
                    "protocol": proto,
                    "tool": name,
                    "gbit_s": g,
                    "overhead_pct": 100 * (base - g) / base,
                    "cpu_pct": median(cpu[(name, proto)]),
                    "samples": gbps[(name, proto)],
                }
            )
    save("throughput", {"runs": args.runs, "seconds": args.seconds, "rows": rows,
                        "machine": machine()})  # fmt: skip
    print("| protocol | tool | Gbit/s | overhead | tool CPU, incl. eBPF (% of a core) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['protocol']} | {r['tool']} | {r['gbit_s']:.2f} | {r['overhead_pct']:+.1f} % "
            f"| {r['cpu_pct']:.0f} % |"
        )


if __name__ == "__main__":
    main()
