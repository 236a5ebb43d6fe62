"""Offline speed: packets/s reading one large generated pcap, mermin vs the peers.

Each tool reads the same file (bench/pcapgen.py: 5M packets over 1000 TCP/UDP flows) and a
fifth of it, in turn, round-robin, `--runs` times. The big file's median wall time gives
packets/s with start-up included (mermin compiles its eBPF program first, about 1.5 s);
the extra packets of the big file over its extra time give packets/s once started, for
every tool alike, and the intercept its start-up. mermin's own loop rate (its summary
line) is reported beside them.

    sudo .venv/bin/python bench/offline.py [--packets N] [--runs N]
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import pcapgen
from common import MERMIN, ROOT, ensure_tools, machine, median, save, version


def commands(pcap: Path, tmp: Path) -> dict[str, list[str]]:
    """The exact command of each tool (output discarded or written under `tmp`)."""
    return {
        "mermin capture --read": [MERMIN, "capture", "--read", str(pcap), "-o", "json"],
        # softflowd keeps only 15 characters of its file arguments (an interface-name
        # buffer): every tool runs in the file's directory, softflowd with bare names.
        "softflowd -r": ["softflowd", "-r", pcap.name, "-n", "127.0.0.1:2055",
                         "-c", "sf.ctl", "-p", "sf.pid"],
        "argus -r": ["argus", "-r", str(pcap), "-w", str(tmp / "out.argus")],
        "tshark -z conv,ip": ["tshark", "-q", "-n", "-z", "conv,ip", "-r", str(pcap)],
    }  # fmt: skip


def softflowd_version() -> str:
    out = subprocess.run(["softflowd", "-h"], capture_output=True, text=True, check=False)
    m = re.search(r"softflowd version ([\w.]+)", out.stdout + out.stderr)
    return f"softflowd {m.group(1)}" if m else "softflowd"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=5_000_000)
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ensure_tools(["softflowd", "pmacctd", "argus", "tshark"])
    small_packets = args.packets // 5
    with tempfile.TemporaryDirectory(prefix="mermin-bench-") as d:
        tmp = Path(d)
        pcap, small = tmp / "bench.pcap", tmp / "small.pcap"
        size = pcapgen.write(pcap, args.packets, args.flows)
        pcapgen.write(small, small_packets, args.flows)
        files = {"big": pcap, "small": small}
        cmds = {which: commands(path, tmp) for which, path in files.items()}
        names = list(cmds["big"])
        times = {which: {name: [] for name in names} for which in files}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        loop_rates: list[float] = []
        for _ in range(args.runs):
            for name in names:
                for which in files:
                    (tmp / "out.argus").unlink(missing_ok=True)
                    before = _children_cpu()
                    started = time.perf_counter()
                    res = subprocess.run(
                        cmds[which][name], capture_output=True, text=True, check=False, cwd=tmp
                    )
                    times[which][name].append(time.perf_counter() - started)
                    if which == "big":
                        cpu[name].append(_children_cpu() - before)
                    if res.returncode != 0:
                        raise RuntimeError(f"{name} failed ({res.returncode}): {res.stderr[-500:]}")
                    if name.startswith("mermin"):
                        flows = len(res.stdout.splitlines())
                        if flows != args.flows:
                            raise RuntimeError(f"mermin reported {flows} records, not {args.flows}")
                        if which == "big":
                            m = re.search(r"\(([\d.]+) packets/s", res.stderr)
                            loop_rates.append(float(m.group(1)) if m else float("nan"))
    rows = []
    for name in names:
        big_s, small_s = median(times["big"][name]), median(times["small"][name])
        # Packets/s once started: the extra packets of the big file over its extra time.
        steady = (args.packets - small_packets) / max(big_s - small_s, 1e-9)
        rows.append(
            {
                "tool": name,
                "command": " ".join(cmds["big"][name])
                .replace(str(pcap), "bench.pcap")
                .replace(str(tmp), "$TMP")
                .replace(f"{ROOT}/", ""),
                "seconds": big_s,
                "small_seconds": small_s,
                "packets_per_s": args.packets / big_s,
                "steady_packets_per_s": steady,
                "startup_s": big_s - args.packets / steady,
                "cpu_seconds": median(cpu[name]),
            }
        )
    result = {
        "packets": args.packets,
        "small_packets": small_packets,
        "flows": args.flows,
        "pcap_bytes": size,
        "runs": args.runs,
        "mermin_loop_packets_per_s": median(loop_rates),
        "rows": rows,
        "versions": {
            "softflowd": softflowd_version(),
            "pmacctd": version(["pmacctd", "-V"]),
            "argus": version(["argus", "-h"]),
            "tshark": version(["tshark", "-v"]),
        },
        "machine": machine(),
    }
    save("offline", result)
    print("| tool | median s | packets/s | once started | start-up s | CPU s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tool']} | {r['seconds']:.2f} | {r['packets_per_s']:,.0f} "
            f"| {r['steady_packets_per_s']:,.0f} | {r['startup_s']:.2f} | {r['cpu_seconds']:.2f} |"
        )
    print(f"\nmermin packet loop alone: {result['mermin_loop_packets_per_s']:,.0f} packets/s")


if __name__ == "__main__":
    main()
