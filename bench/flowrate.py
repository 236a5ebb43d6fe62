"""New flows per second, memory per active flow and the cost of a table poll, for mermin.

For each rate, a fresh `mermin capture` watches veth b while a raw-socket sender in
namespace a emits one packet per new UDP flow (distinct source/destination ports) for
`--seconds` at that rate. Two verdicts per rate:

* every flow reported: each flow sent has a record and nothing was lost (no packet left
  unaccounted, no record dropped). A new-flow event lost to a full ring buffer or to busy
  workers costs only latency: the flow's counts are in the kernel table all along, and
  user space adopts it at its first record instead of as it starts.
* every event delivered: moreover no new-flow event was dropped (kernel ring buffer or
  worker queues), so every flow was adopted as it started.

Read through the capture's local API two polls after the last packet: flows the kernel
created, flows adopted from events, events dropped, flows in the table and the last poll's
duration. Also the capture's CPU (cores) over that time, its RSS growth per active flow
(flows in the table; anonymous memory only, as the flow table's pages the capture maps
count as the kernel's), and the kernel table's memory per entry of its capacity (bpftool's
bytes_memlock of the slots and control words / flow_stats_capacity: two slots per entry,
allocated at load).

    sudo .venv/bin/python bench/flowrate.py [--rates 5000,20000,...] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from common import CLK_TCK, MERMIN, descendants, machine, netns, rss_mib, running, save, stop

from mermin_cli.engine.compiler import FLOW_PROBES, flow_slots

CAPACITY = 524288
ANON = "RssAnon"  # the process's own memory: not the mapped flow table
API_PORT = 18090
CONFIG = f"""
span {{
  udp_timeout = "60s"
  max_record_interval = "10m"
  enable_hostname_resolution = false
}}
pipeline {{
  flow_capture  {{ flow_stats_capacity = {CAPACITY} }}
  flow_producer {{ flow_store_poll_interval = "1s" }}
}}
internal "server" {{ port = {API_PORT} }}
internal "metrics" {{ enabled = false }}
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


def table_bytes_per_entry(host: netns.Host) -> float:
    maps = json.loads(host.run("bpftool", "-j", "map", "show").stdout)
    slots = flow_slots(CAPACITY) + FLOW_PROBES
    table = {m["name"]: m["bytes_memlock"] for m in maps if m.get("max_entries") == slots}
    if set(table) != {"flows", "flow_ctl"}:
        return float("nan")
    return sum(table.values()) / CAPACITY  # slots and control words


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process tree."""
    total = 0
    for p in [pid, *descendants(pid)]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def api_status(host: netns.Host) -> dict[str, Any]:
    """The capture's /api/v1/status, fetched inside its namespace."""
    url = f"http://127.0.0.1:{API_PORT}/api/v1/status"
    code = (
        f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    )
    return json.loads(host.run("python3", "-c", code).stdout)


def one_rate(link: netns.Link, rate: int, seconds: float, tmp: Path) -> dict[str, Any]:
    a, b = link.a, link.b
    cfg = tmp / "flows.hcl"
    cfg.write_text(CONFIG)
    out = tmp / "records.ndjson"
    flows = int(rate * seconds)
    with out.open("w") as fh, running(
        b, [MERMIN, "capture", "-i", b.ifname, "-o", "json", "-c", str(cfg)],
        ready="capturing on", stdout=fh,
    ) as proc:  # fmt: skip
        rss0, cpu0, started = rss_mib(proc.pid, ANON), cpu_seconds(proc.pid), time.monotonic()
        per_entry = table_bytes_per_entry(b)
        sent = a.run("python3", "-c", SENDER, a.ifname, b.mac, a.mac, a.ip4, b.ip4,
                     str(flows), str(rate), timeout=120).stdout  # fmt: skip
        time.sleep(2.5)  # two polls: every flow is in the tracker
        rss1, cpu1, ended = rss_mib(proc.pid, ANON), cpu_seconds(proc.pid), time.monotonic()
        status = api_status(b)
        stop(proc, timeout=300)  # the exit flush writes every flow's record: give it time
        err = proc.stderr.read() if proc.stderr else ""
    records = sum(1 for _ in out.open())
    m = re.search(r"not accounted: (\d+) packets.*dropped: \d+ events, (\d+) records", err)
    lost_packets, lost_records = (int(x) for x in m.groups()) if m else (-1, -1)
    kernel, pipeline, active = status["kernel"], status["pipeline"], status["table"]["entries"]
    events_dropped = kernel["events_dropped"] + pipeline["ringbuf"]["dropped_backpressure"]
    reported = records == flows and lost_packets == 0 and lost_records == 0
    return {
        "rate": rate,
        "achieved_flows_per_s": float(sent),
        "flows": flows,
        "records": records,
        "kernel_new_flows": kernel["new_flows"],
        "adopted_from_events": pipeline["workers"]["created"],
        "events_dropped": events_dropped,
        "every_flow_reported": reported,
        "every_event_delivered": reported and events_dropped == 0,
        "capture_cpu_cores": (cpu1 - cpu0) / (ended - started),
        "active": active,
        "tracked": status["flows"]["tracked"],
        "poll_ms": status["flows"]["last_poll_ms"],
        "rss_per_flow_bytes": (rss1 - rss0) * 1024 * 1024 / max(1, active),
        "kernel_bytes_per_entry": per_entry,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="5000,10000,20000,50000,100000,200000")
    ap.add_argument("--seconds", type=float, default=2.0, help="of new flows at each rate")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    if max(rates) * args.seconds > CAPACITY:
        ap.error(f"--rates x --seconds must fit the flow table ({CAPACITY:,} flows)")
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="mermin-bench-") as d,
        netns.temp_link("bench-flows") as link,
    ):
        for rate in rates:
            rows.append(one_rate(link, rate, args.seconds, Path(d)))
            print(rows[-1], flush=True)
    save("flowrate", {"capacity": CAPACITY, "seconds": args.seconds, "rows": rows,
                      "machine": machine()})  # fmt: skip
    print("| flows/s offered | reached | every flow reported | every event delivered "
          "| CPU cores | RSS/flow | poll |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['rate']:,} | {r['achieved_flows_per_s']:,.0f} "
            f"| {'yes' if r['every_flow_reported'] else 'no'} "
            f"| {'yes' if r['every_event_delivered'] else 'no'} | {r['capture_cpu_cores']:.2f} "
            f"| {r['rss_per_flow_bytes']:.0f} B | {r['poll_ms']:.0f} ms |"
        )


if __name__ == "__main__":
    main()
