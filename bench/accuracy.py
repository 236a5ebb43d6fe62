"""Accounting accuracy under load: a fixed number of small UDP packets at the highest rate
trafgen reaches, packets accounted / packets delivered, for mermin and the peers.

trafgen (netsniff-ng) in namespace a sends `--packets` 64-byte frames of one UDP flow
out of veth0 as fast as it can; the tool watches veth1 in namespace b. The denominator
is veth1's rx_packets delta (every frame the receive path, and so the TC hook and
libpcap, was given). Accounted: mermin's record packets, softflowd's per-protocol packet
count (softflowctl expire-all, statistics), pmacctd's print-plugin packets. Median of `--runs`.

    sudo .venv/bin/python bench/accuracy.py [--packets N] [--runs N]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import tempfile
import time
from pathlib import Path

from common import (
    MERMIN,
    ensure_tools,
    machine,
    median,
    netns,
    pmacctd_config,
    running,
    save,
    softflowd_argv,
    stop,
)

SPORT, DPORT = 40000, 5001


def trafgen_conf(path: Path, a: netns.Host, b: netns.Host) -> Path:
    """One 64-byte IPv4/UDP frame from a to b (trafgen's packet description language)."""

    def hexes(data: bytes) -> str:
        return ", ".join(f"0x{x:02x}" for x in data)

    mac = lambda m: bytes.fromhex(m.replace(":", ""))  # noqa: E731
    ip = lambda s: bytes(int(x) for x in s.split("."))  # noqa: E731
    path.write_text(
        "{\n"
        f"  {hexes(mac(b.mac))}, {hexes(mac(a.mac))}, 0x08, 0x00,\n"
        "  0x45, 0x00, 0x00, 0x32, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, csumip(14, 33),\n"
        f"  {hexes(ip(a.ip4))}, {hexes(ip(b.ip4))},\n"
        f"  {hexes(SPORT.to_bytes(2, 'big'))}, {hexes(DPORT.to_bytes(2, 'big'))},"
        " 0x00, 0x1e, 0x00, 0x00,\n"
        "  fill(0x41, 22),\n"
        "}\n"
    )
    return path


def rx_packets(host: netns.Host) -> int:
    info = json.loads(host.run("ip", "-s", "-j", "link", "show", host.ifname).stdout)[0]
    return int(info["stats64"]["rx"]["packets"])


def send(a: netns.Host, conf: Path, packets: int) -> float:
    started = time.monotonic()
    a.run("trafgen", "--dev", a.ifname, "--conf", str(conf), "--num", str(packets),
          "--cpus", "1", "--no-sock-mem", timeout=300)  # fmt: skip
    return packets / (time.monotonic() - started)


def mermin(a: netns.Host, b: netns.Host, conf: Path, packets: int, tmp: Path) -> tuple[int, int]:
    out = tmp / "mermin.ndjson"
    with (
        out.open("w") as fh,
        running(
            b, [MERMIN, "capture", "-i", b.ifname, "-o", "json"], ready="capturing on", stdout=fh
        ) as proc,
    ):
        before = rx_packets(b)
        send(a, conf, packets)
        time.sleep(1.0)
        delivered = rx_packets(b) - before
        stop(proc)
    counted = 0
    for line in out.read_text().splitlines():
        x = json.loads(line)["attributes"]
        if x.get("source.port") == SPORT and x.get("destination.port") == DPORT:
            counted += x["flow.packets.delta"]
    return delivered, counted


def softflowd(a: netns.Host, b: netns.Host, conf: Path, packets: int, tmp: Path) -> tuple[int, int]:
    with running(b, softflowd_argv(b.ifname), cwd=tmp):
        before = rx_packets(b)
        send(a, conf, packets)
        time.sleep(1.0)
        delivered = rx_packets(b) - before
        # Its statistics cover expired flows: expire everything first.
        b.run("softflowctl", "-c", "sf.ctl", "expire-all", cwd=tmp)
        time.sleep(0.5)
        stats = b.run("softflowctl", "-c", "sf.ctl", "statistics", cwd=tmp).stdout
    m = re.search(r"udp \(17\):\s+\d+\s+(\d+)", stats)
    return delivered, int(m.group(1)) if m else 0


def pmacctd(a: netns.Host, b: netns.Host, conf: Path, packets: int, tmp: Path) -> tuple[int, int]:
    out = tmp / "pmacct.csv"
    out.unlink(missing_ok=True)
    cfg = pmacctd_config(tmp / "pmacct.conf", b.ifname, out)
    with running(b, ["pmacctd", "-f", str(cfg)]):
        before = rx_packets(b)
        send(a, conf, packets)
        time.sleep(1.0)
        delivered = rx_packets(b) - before
    time.sleep(1.0)  # the print plugin writes its cache at exit
    counted = 0
    if out.exists():
        for row in csv.DictReader(out.open()):
            if row["SRC_PORT"] == str(SPORT) and row["DST_PORT"] == str(DPORT):
                counted += int(row["PACKETS"])
    return delivered, counted


TOOLS = {"mermin": mermin, "softflowd": softflowd, "pmacctd": pmacctd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ensure_tools(["trafgen", "softflowd", "pmacctd"])
    ratios: dict[str, list[float]] = {t: [] for t in TOOLS}
    rates: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="mermin-bench-") as d,
        netns.temp_link("bench-acc") as link,
    ):
        tmp = Path(d)
        conf = trafgen_conf(tmp / "udp.cfg", link.a, link.b)
        rates.append(send(link.a, conf, args.packets))  # warm-up, and the generator's rate
        for _ in range(args.runs):
            for name, measure in TOOLS.items():
                delivered, counted = measure(link.a, link.b, conf, args.packets, tmp)
                ratios[name].append(100 * counted / delivered if delivered else 0.0)
                print(f"{name}: {counted}/{delivered}", flush=True)
    rows = [{"tool": t, "accounted_pct": median(v), "samples": v} for t, v in ratios.items()]
    save("accuracy", {"packets": args.packets, "runs": args.runs,
                      "generator_pps": median(rates), "rows": rows,
                      "machine": machine()})  # fmt: skip
    print(f"\ngenerator: trafgen, {median(rates):,.0f} packets/s offered")
    print("| tool | packets accounted / delivered |\n|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['accounted_pct']:.3f} % |")


if __name__ == "__main__":
    main()
