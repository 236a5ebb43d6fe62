"""Per-packet kernel cost of bpf/flow.c, measured inside the kernel with BPF_PROG_TEST_RUN.

Every frame kind runs through the ingress L2 program of flow.c and, round-robin in the same
session, through an empty TC program (`return TC_ACT_UNSPEC`); the kernel reports the mean
time per run of each test-run call, and the median of `--runs` calls is kept.

* Hit path (a packet of a flow already in the table): `--repeat` runs per call.
* First packet of a new flow (lookup miss + insert + new-flow event): repeating one frame
  would insert only once, so flow.c is compiled again with a bench-only entry point that
  runs the same `handle()` and then bumps the frame's IPv4 source address: every run of a
  call inserts a new flow. A sample fills the table to half its capacity in `--chunks`
  calls, each from its own /16, after emptying it as a poll does (read, delete, sweep:
  runs of DELETED slots longer than a sweep's reach stay, as in a capture); the new-flow
  event rings are drained between calls as the capture does, and every event must arrive
  (a full ring would make events cheap failures). The bump itself is timed alone and
  subtracted. The same wrapper bumping the IP ID instead (every run a hit) must reproduce
  the hit row: that row checks the method.
* The cost of a new flow is mostly cache misses in the flow table (the slots a lookup and
  a claim touch), so it grows with the table: it is measured at the default capacity
  (pipeline.flow_capture.flow_stats_capacity, judged against the target) and at 4x it.
* Hit spread over the table: the same calls run again on the half-full table, so every run
  is a hit on another flow (cold lines, as with many busy flows). No target: for reading
  the hit row, which always hits one warm flow.
* Compile + load time of `FlowProgram` (median of `--loads`).
* The per-CPU flow cache is on, as in a capture: the hit rows measure a packet counted in
  its CPU's slot. Each time a table is emptied, the cache starts a new generation, as a
  poll does after deleting entries (engine/cache.py).

Prints a markdown table and writes JSON to bench/results/kernel_cost.json. Set
MERMIN_BPF_DIR to a directory holding a modified flow.c to measure that copy.

    sudo .venv/bin/python bench/kernel_cost.py
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import itertools
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dpkt
import numpy as np

from mermin_cli.config.schema import FlowCaptureConfig
from mermin_cli.engine import bpfsys
from mermin_cli.engine.compiler import (
    FLOW_PROBES,
    NO_DEBUG_INFO,
    bpf_source,
    event_cpus,
    event_slots,
    flow_slots,
    import_bcc,
)
from mermin_cli.engine.events import EventRings
from mermin_cli.engine.program import FlowProgram
from mermin_cli.engine.table import FlowTable

RESULTS = Path(__file__).resolve().parent / "results" / "kernel_cost.json"
EMPTY_PROGRAM = b"int empty(struct __sk_buff *skb) { return -1; }"
# Appended to flow.c for the new-flow measurement; offsets are those of an untagged IPv4 frame.
BENCH_ENTRY_POINTS = b"""
static __always_inline void bench_bump(struct __sk_buff *skb, __u32 off)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    __u16 *field = data + off;
    if ((void *)(field + 1) <= data_end)
        *field += 1;
}
int bench_new_flow(struct __sk_buff *skb) { handle(skb, 1); bench_bump(skb, 28); return -1; }
int bench_hit_write(struct __sk_buff *skb) { handle(skb, 1); bench_bump(skb, 18); return -1; }
int bench_write_only(struct __sk_buff *skb) { bench_bump(skb, 28); return -1; }
"""
HIT_TARGET, NEW_FLOW_TARGET = 3.0, 15.0
DEFAULT_CAPACITY = FlowCaptureConfig().flow_stats_capacity
NEW_FLOW_CHUNK_BYTE = 27  # second byte of the IPv4 source address of an untagged frame

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q = 0x0800, 0x86DD, 0x8100


def eth(payload: bytes, ethertype: int = ETH_P_IP, vlan: int = 0) -> bytes:
    """Ethernet frame, with one 802.1Q tag when `vlan` is set."""
    head = bytes.fromhex("020000000002020000000001")
    if vlan:
        head += ETH_P_8021Q.to_bytes(2, "big") + vlan.to_bytes(2, "big")
    return head + ethertype.to_bytes(2, "big") + payload


def ipv4(src: str, dst: str, l4: dpkt.Packet) -> bytes:
    """IPv4 packet carrying `l4` (TCP, UDP or ICMP)."""
    proto = {dpkt.tcp.TCP: 6, dpkt.udp.UDP: 17, dpkt.icmp.ICMP: 1}[type(l4)]
    pkt = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, data=l4)
    pkt.len = len(pkt)
    return bytes(pkt)


def ipv6(src: str, dst: str, l4: dpkt.Packet) -> bytes:
    """IPv6 packet carrying a TCP segment."""
    pkt = dpkt.ip6.IP6(
        src=socket.inet_pton(socket.AF_INET6, src),
        dst=socket.inet_pton(socket.AF_INET6, dst),
        nxt=6,
        hlim=64,
        data=l4,
    )
    pkt.plen = len(l4)
    return bytes(pkt)


def tcp_data(sport: int = 40000) -> dpkt.tcp.TCP:
    """A data segment of an established connection."""
    flags = dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH
    return dpkt.tcp.TCP(sport=sport, dport=443, flags=flags, data=b"x" * 100)


def hit_frames() -> dict[str, bytes]:
    """One frame per hit-path kind (its flow is created before timing)."""
    udp = dpkt.udp.UDP(sport=5353, dport=53, data=b"q" * 40)
    udp.ulen = len(udp)
    echo = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=7, seq=1, data=b"p" * 56))
    return {
        "ipv4_tcp": eth(ipv4("10.0.0.1", "10.0.0.2", tcp_data())),
        "ipv4_udp": eth(ipv4("10.0.0.1", "10.0.0.2", udp)),
        "ipv4_icmp_echo": eth(ipv4("10.0.0.1", "10.0.0.2", echo)),
        "ipv6_tcp": eth(ipv6("2001:db8::1", "2001:db8::2", tcp_data()), ETH_P_IPV6),
        "vlan_ipv4_tcp": eth(ipv4("10.0.0.1", "10.0.0.2", tcp_data(40001)), vlan=100),
    }


GENERATIONS = itertools.count(1, 2)  # odd: cache on, each one new


def new_cache_generation(bpf: Any) -> None:
    """Turn a bench module's flow cache on with every slot free (after emptying `flows`,
    slots of the old generation would outlive their entries)."""
    bpf["cache_gen"][ctypes.c_int(0)] = ctypes.c_uint64(next(GENERATIONS))


def run_ns(prog_fd: int, frame: bytes, repeat: int) -> int:
    """Kernel-measured ns per run; the program must pass the frame on (TC_ACT_UNSPEC)."""
    result = bpfsys.prog_test_run(prog_fd, frame, repeat)
    if result.retval != -1:
        raise RuntimeError(f"program returned {result.retval}, expected -1 (TC_ACT_UNSPEC)")
    return result.duration_ns


class BenchModule:
    """flow.c (or a variant of it) compiled with the bench entry points, for one table
    capacity: fills half its table with new flows, `chunks` test-run calls per fill."""

    def __init__(self, source: bytes, capacity: int, chunks: int) -> None:
        bcc = import_bcc()
        self.chunks = chunks
        self.per_call = capacity // 2 // chunks
        self.tcp = hit_frames()["ipv4_tcp"]
        slots = event_slots(self.per_call)
        cflags = [
            NO_DEBUG_INFO,
            f"-DMAX_FLOWS={capacity}",
            f"-DFLOW_SLOTS={flow_slots(capacity)}",
            f"-DFLOW_PROBES={FLOW_PROBES}",
            f"-DEVENT_SLOTS={slots}",
            f"-DEVENT_CPUS={event_cpus()}",
            "-DEVENT_PAGES=64",  # variants from before the per-CPU rings (a BPF ring buffer)
        ]
        self.bpf = bcc.BPF(text=source + BENCH_ENTRY_POINTS, cflags=cflags)
        self.rings: EventRings | None = None
        if b"event_slots" in source:
            maps = ("event_slots", "event_heads", "event_tails")
            fds = (self.bpf[name].map_fd for name in maps)
            self.rings = EventRings(*fds, event_cpus(), slots)
        else:
            self._events = 0
            self.bpf["flow_events"].open_ring_buffer(self._count_event)
        new_cache_generation(self.bpf)
        self.fds = {
            name: self.bpf.load_func(name.encode(), bcc.BPF.SCHED_CLS).fd
            for name in ("bench_new_flow", "bench_hit_write", "bench_write_only")
        }
        self.table: FlowTable | None = None
        if b"mermin_table_sweep" in source:  # else a hash map: a variant from before 2026-12
            sweep = self.bpf.load_func(b"mermin_table_sweep", bcc.BPF.SCHED_CLS).fd
            maps = (self.bpf[name].map_fd for name in ("flow_ctl", "flows", "flow_use"))
            self.table = FlowTable(tuple(maps), sweep, capacity, None)

    def _count_event(self, _ctx: Any, _data: Any, _size: int) -> int:
        self._events += 1
        return 0

    def read_events(self) -> int:
        """Take the new-flow events out, as a capture does; how many there were."""
        if self.rings is not None:
            return len(self.rings.read())
        before = self._events
        self.bpf.ring_buffer_consume()
        return self._events - before

    def new_flows(self) -> float:
        """Empty the table (as a capture's poll does: read, delete, sweep), then the median
        ns of the calls that fill half of it."""
        if self.table is None:
            self.bpf["flows"].clear()
        else:
            with self.table.settled():
                keys, _ = self.table.read()
                self.table.take(np.arange(len(keys)))
        new_cache_generation(self.bpf)
        return self._fill(new=True)

    def entries(self) -> int:
        """Flows in the table."""
        return len(self.table.read()[0]) if self.table else len(self.bpf["flows"])

    def spread_hits(self) -> float:
        """The same calls again: each run a hit on another flow of the last fill."""
        return self._fill(new=False)

    def _fill(self, new: bool) -> float:
        self.read_events()
        calls = []
        for i in range(self.chunks):
            frame = bytearray(self.tcp)
            frame[NEW_FLOW_CHUNK_BYTE] = i  # a /16 of its own: every run a new flow
            calls.append(run_ns(self.fds["bench_new_flow"], bytes(frame), self.per_call))
            events = self.read_events()
            if new and events != self.per_call:
                raise RuntimeError(f"{events} new-flow events arrived for one call")
        return statistics.median(calls)

    def write_only(self, repeat: int) -> float:
        """ns of the bench wrapper's address bump alone (subtracted from its runs)."""
        return run_ns(self.fds["bench_write_only"], self.tcp, repeat)

    def close(self) -> None:
        if self.rings is not None:
            self.rings.close()
        if self.table is not None:
            self.table.close()
        self.bpf.cleanup()


def load_times(count: int, max_flows: int) -> list[float]:
    """Wall-clock seconds of `count` FlowProgram compile + load cycles."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        prog = FlowProgram(max_flows)
        times.append(time.perf_counter() - started)
        prog.close()
    return times


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement; returns the JSON document."""
    loads = load_times(args.loads, args.capacity)
    bcc = import_bcc()
    source = bpf_source()
    frames = hit_frames()
    tcp = frames["ipv4_tcp"]
    capacities = (args.capacity, 4 * args.capacity)
    with contextlib.ExitStack() as cleanup:
        prog = FlowProgram(args.capacity)
        cleanup.callback(prog.close)
        new_cache_generation(prog.bpf)  # not cache.enable(): that wants every CPU, see main()
        empty_bpf = bcc.BPF(text=EMPTY_PROGRAM)
        cleanup.callback(empty_bpf.cleanup)
        empty_fd = empty_bpf.load_func(b"empty", bcc.BPF.SCHED_CLS).fd
        flow_fd = prog.prog_fd(l3=False)
        benches: dict[int, BenchModule] = {}
        for capacity in capacities:
            benches[capacity] = BenchModule(source.read_bytes(), capacity, args.chunks)
            cleanup.callback(benches[capacity].close)
        for frame in frames.values():
            run_ns(flow_fd, frame, 2)  # create the flows and take a cache slot: then hits
        fds = benches[args.capacity].fds
        run_ns(fds["bench_hit_write"], tcp, 1)

        empty = lambda: run_ns(empty_fd, tcp, args.repeat)  # noqa: E731

        def session(timed: dict[str, Callable[[], float]]) -> dict[str, list[tuple[float, float]]]:
            """`--runs` rounds of every kind, each sample paired with an empty-program run
            just before it: the VM's speed drifts, and a ratio of neighbours cancels most
            of the drift."""
            pairs: dict[str, list[tuple[float, float]]] = {kind: [] for kind in timed}
            for _ in range(args.runs):
                for kind, run in timed.items():
                    pairs[kind].append((empty(), run()))
            return pairs

        timed: dict[str, Callable[[], float]] = {}
        for kind, frame in frames.items():
            timed[kind] = lambda frame=frame: run_ns(flow_fd, frame, args.repeat)
        timed["hit_write"] = lambda: run_ns(fds["bench_hit_write"], tcp, args.repeat)
        samples: dict[str, list[tuple[float, float]]] = {}
        # One table at a time, as in a capture: filling the other table between samples
        # would evict this one's lines from the caches.
        for capacity in capacities:
            timed[f"write_only {capacity}"] = lambda c=capacity: benches[c].write_only(args.repeat)
            # each fill right before the spread hits that use it
            timed[f"new {capacity}"] = benches[capacity].new_flows
            timed[f"spread {capacity}"] = benches[capacity].spread_hits
            samples |= session(timed)
            timed = {}
        for module in benches.values():
            inserted, expected = module.entries(), module.per_call * args.chunks
            if inserted != expected:
                raise RuntimeError(f"{inserted} of {expected} bench runs inserted a flow")

    def unbumped(kind: str, capacity: int) -> list[tuple[float, float]]:
        """(empty, ns) pairs of a bench wrapper, its address bump (timed alone in the same
        session) subtracted."""
        write = [ns for _, ns in samples[f"write_only {capacity}"]]
        return [(e, ns - w + e) for (e, ns), w in zip(samples[kind], write, strict=True)]

    per_run: dict[str, list[tuple[float, float]]] = {kind: samples[kind] for kind in frames}
    per_run["ipv4_tcp (method check)"] = unbumped("hit_write", args.capacity)
    targets: dict[str, float | None] = {kind: HIT_TARGET for kind in frames}
    for capacity in capacities:
        flows = capacity // 2 // args.chunks * args.chunks
        new = f"new_flow (table of {capacity:,})"
        per_run[new] = unbumped(f"new {capacity}", capacity)
        targets[new] = NEW_FLOW_TARGET if capacity == args.capacity else None
        per_run[f"hit spread over {flows:,} flows (table of {capacity:,})"] = unbumped(
            f"spread {capacity}", capacity
        )
    empties = [e for pairs in samples.values() for e, _ in pairs]
    rows = [{"kind": "empty", "ns": statistics.median(empties), "ratio": 1.0, "target": None}]
    for kind, pairs in per_run.items():
        rows.append(
            {
                "kind": kind,
                "ns": statistics.median(ns for _, ns in pairs),
                "ratio": statistics.median(ns / e for e, ns in pairs),
                "target": targets.get(kind),
            }
        )
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": str(source),
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "repeat": args.repeat,
        "runs": args.runs,
        "capacity": args.capacity,
        "new_flows": {"chunks": args.chunks, "fill": 0.5},
        "rows": rows,
        "samples": samples,
        "load_seconds": {"median": statistics.median(loads), "samples": loads},
    }


def table(doc: dict[str, Any]) -> str:
    """The results as a markdown table."""
    lines = [
        "| packet kind | ns/packet (median) | ratio vs empty (median of pairs) | target |",
        "|---|---:|---:|---|",
    ]
    for row in doc["rows"]:
        target = row["target"]
        verdict = ""
        if target:
            verdict = f"<= {target:g}x " + ("ok" if row["ratio"] <= target else "MISSED")
        lines.append(f"| {row['kind']} | {row['ns']:.1f} | {row['ratio']:.2f}x | {verdict} |")
    load = doc["load_seconds"]
    lines.append("")
    lines.append(
        f"FlowProgram compile + load: {load['median']:.2f} s median of {len(load['samples'])}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=200_000, help="runs per test-run call")
    parser.add_argument("--runs", type=int, default=15, help="calls per hit-path kind")
    parser.add_argument("--chunks", type=int, default=30, help="test-run calls per table fill")
    parser.add_argument("--loads", type=int, default=5, help="compile + load cycles")
    parser.add_argument(
        "--capacity", type=int, default=DEFAULT_CAPACITY,
        help="flow table capacity (default: the product's); new flows are also measured at 4x",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    if not 0 < args.chunks <= 255:
        parser.error("--chunks must be in 1..255 (each call takes a /16 of its own)")
    if not 0 < args.capacity // 2 // args.chunks <= 4096 // 4:
        parser.error("--capacity / 2 / --chunks must be in 1..1024 flows per call")
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU: stable caches
    doc = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
