"""New flows per second without loss, and memory per active flow, for mermin.

For each rate, a fresh `mermin capture` watches veth1 (namespace b) while a raw-socket
sender in namespace a emits one packet per new UDP flow (distinct source/destination
ports) for one second at that rate. Lossless means every flow sent gets a record and no
kernel or pipeline counter reports a loss. Memory: RSS growth of mermin with the flows
active (after two polls) per flow, and the kernel flow table's memory per slot
(bpftool's bytes_memlock / max_entries; the hash map is preallocated).

    sudo .venv/bin/python bench/flowrate.py [--rates 20000,50000,...]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from common import MERMIN, machine, netns, rss_mib, running, save, stop

CAPACITY = 262144
CONFIG = f"""
span {{ udp_timeout = "60s" }}
pipeline {{
  flow_capture  {{ flow_stats_capacity = {CAPACITY} }}
  flow_producer {{ flow_store_poll_interval = "1s" }}
}}
"""

SENDER = r"""
import socket, struct, sys, time
ifname, dmac, smac, sip, dip, flows, rate = sys.argv[1:8]
flows, rate = int(flows), float(rate)
eth = bytes.fromhex(dmac.replace(":", "")) + bytes.fromhex(smac.replace(":", "")) + b"\x08\x00"
src, dst = socket.inet_aton(sip), socket.inet_aton(dip)
frames = []
for i in range(flows):
    sport, dport = 1024 + i % 60000, 10000 + i // 60000
    udp = struct.pack("!HHHH", sport, dport, 18, 0) + b"f" * 10
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst)
    frames.append(eth + ip + udp)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
send = s.send
start = time.perf_counter()
batch = max(1, int(rate / 1000))
for i in range(0, flows, batch):
    for f in frames[i:i + batch]:
        send(f)
    ahead = (i + batch) / rate - (time.perf_counter() - start)
    if ahead > 0:
        time.sleep(ahead)
print(flows / (time.perf_counter() - start))
"""


def table_bytes_per_slot(host: netns.Host) -> float:
    maps = json.loads(host.run("bpftool", "-j", "map", "show").stdout)
    flows = [m for m in maps if m.get("name") == "flows" and m.get("max_entries") == CAPACITY]
    return flows[-1]["bytes_memlock"] / CAPACITY if flows else float("nan")


def one_rate(link: netns.Link, rate: int, tmp: Path) -> dict[str, float]:
    a, b = link.a, link.b
    cfg = tmp / "flows.hcl"
    cfg.write_text(CONFIG)
    out = tmp / "records.ndjson"
    with out.open("w") as fh, running(
        b, [MERMIN, "capture", "-i", b.ifname, "-o", "json", "-c", str(cfg)],
        ready="capturing on", stdout=fh,
    ) as proc:  # fmt: skip
        rss0 = rss_mib(proc.pid)
        slot = table_bytes_per_slot(b)
        sent = a.run("python3", "-c", SENDER, a.ifname, b.mac, a.mac, a.ip4, b.ip4,
                     str(rate), str(rate), timeout=120).stdout  # fmt: skip
        time.sleep(2.5)  # two polls: every flow is in the tracker
        rss1 = rss_mib(proc.pid)
        stop(proc, timeout=300)  # the exit flush writes every flow's record: give it time
        err = proc.stderr.read() if proc.stderr else ""
    records = sum(1 for _ in out.open())
    m = re.search(r"not accounted: (\d+) packets.*dropped: (\d+) events, (\d+) records", err)
    lost_pkts, lost_events, lost_records = (int(x) for x in m.groups()) if m else (-1, -1, -1)
    return {
        "rate": rate,
        "achieved_flows_per_s": float(sent),
        "flows": rate,
        "records": records,
        "lossless": records == rate and lost_pkts == 0 and lost_records == 0,
        "events_dropped": lost_events,
        "rss_per_flow_bytes": (rss1 - rss0) * 1024 * 1024 / rate,
        "kernel_bytes_per_slot": slot,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="20000,50000,100000,200000")
    args = ap.parse_args()
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="mermin-bench-") as d,
        netns.temp_link("bench-flows") as link,
    ):
        for rate in (int(r) for r in args.rates.split(",")):
            rows.append(one_rate(link, rate, Path(d)))
            print(rows[-1], flush=True)
    save("flowrate", {"capacity": CAPACITY, "rows": rows, "machine": machine()})
    print("| flows/s offered | achieved | records | lossless | RSS/flow | kernel/slot |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['rate']:,} | {r['achieved_flows_per_s']:,.0f} | {r['records']:,} "
            f"| {'yes' if r['lossless'] else 'no'} | {r['rss_per_flow_bytes']:.0f} B "
            f"| {r['kernel_bytes_per_slot']:.0f} B |"
        )


if __name__ == "__main__":
    main()
