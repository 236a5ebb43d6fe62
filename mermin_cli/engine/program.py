"""Compile and load bpf/flow.c with BCC; expose its programs, flow table, event rings and
counters."""

from __future__ import annotations

import ctypes
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from mermin_cli.engine import layout
from mermin_cli.engine.cache import FlowCache
from mermin_cli.engine.clock import TickClock
from mermin_cli.engine.compiler import (
    EVENT_BYTES,
    Compiled,
    compile_flow_c,
    event_cpus,
    event_slots,
    load_failed,
)
from mermin_cli.engine.events import EventRings
from mermin_cli.engine.table import FlowTable
from mermin_cli.errors import MerminError

log = logging.getLogger("mermin.engine")


class FlowProgram:
    """The loaded flow program: SCHED_CLS entry points for L2 and L3 devices, one flow table."""

    def __init__(
        self,
        max_flows: int,
        event_capacity: int = 1024,
        offline: bool = False,
        compiled: Compiled | None = None,
    ) -> None:
        """Compile (unless `compiled` is that of the same arguments) and load the program."""
        self.max_flows = max_flows
        self.offline = offline
        compiled = compiled or compile_flow_c(max_flows, event_capacity, offline)
        started = time.monotonic()
        self.bpf, self.headers = compiled.bpf, compiled.headers
        try:
            names = ["mermin_table_sweep"] + (
                ["mermin_pcap"]
                if offline
                else [
                    *layout.PROGRAMS.values(),
                    "mermin_clock",
                    "mermin_cache_flush",
                    "mermin_cache_absorb",
                ]
            )
            fds = self._load(names)
        except Exception as exc:
            raise load_failed(exc) from exc
        self.fds = {k: fds[name] for k, name in layout.PROGRAMS.items() if name in fds}
        if offline:  # mermin_pcap runs the next record by a tail call to itself
            self._pcap_fd = fds["mermin_pcap"]
            self.bpf[b"pcap_next"][ctypes.c_int(0)] = ctypes.c_int(self._pcap_fd)
        self.load_seconds = compiled.seconds + (time.monotonic() - started)
        flows = self.bpf[b"flows"]
        # Live tables stamp flows in jiffies (converted by `clock`); offline ones in ns.
        self.clock: TickClock | None = None
        # Off until enabled: a poll must drain it (see engine/cache.py).
        self.cache: FlowCache | None = None
        if not offline:
            self.clock = TickClock.calibrate(fds["mermin_clock"], self.bpf[b"clock_sync"].map_fd)
            self.cache = FlowCache(
                fds["mermin_cache_flush"],
                fds["mermin_cache_absorb"],
                self.bpf[b"cache_gen"].map_fd,
                self.bpf[b"flow_cache"].map_fd,
            )
        self.table = FlowTable(
            (self.bpf[b"flow_ctl"].map_fd, flows.map_fd, self.bpf[b"flow_use"].map_fd),
            fds["mermin_table_sweep"],
            max_flows,
            self.clock,
            self.cache,
        )
        self.events = EventRings(
            self.bpf[b"event_slots"].map_fd,
            self.bpf[b"event_heads"].map_fd,
            self.bpf[b"event_tails"].map_fd,
            event_cpus(),
            event_slots(event_capacity),
            self.clock,
        )
        self.event_bytes = self.events.cpus * self.events.slots * EVENT_BYTES
        self._counters = self.bpf[b"counters"]
        slot_size = ctypes.sizeof(flows.Leaf)
        if slot_size != layout.SLOT_DTYPE.itemsize:
            raise MerminError(
                f"bpf/flow.c and engine/layout.py disagree on the flow slot's size "
                f"({slot_size} vs {layout.SLOT_DTYPE.itemsize}); this is a bug in mermin."
            )
        log.debug("flow program compiled and loaded in %.2fs", self.load_seconds)

    def _load(self, names: list[str]) -> dict[str, int]:
        """Load entry points in parallel: the kernel verifies each on its own with the GIL
        released, and verifying them one after another was a third of start-up."""
        sched_cls = self.bpf.SCHED_CLS
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            fds = pool.map(lambda name: self.bpf.load_func(name.encode(), sched_cls).fd, names)
            return dict(zip(names, fds, strict=True))

    def prog_fd(self, l3: bool) -> int:
        """The program for both TC hooks of an L2 (Ethernet) or L3 (no link header) device
        (live only: an offline program has just `pcap_fd`)."""
        return self.fds[l3]

    def pcap_fd(self) -> int:
        """The offline entry point: windows of pcap records (compiled with `offline`)."""
        return self._pcap_fd

    def counter(self, name: str) -> int:
        """One kernel counter summed over CPUs."""
        return int(sum(self._counters[ctypes.c_int(layout.COUNTERS.index(name))]))

    def counters(self) -> dict[str, int]:
        """Kernel counters summed over CPUs."""
        return {name: self.counter(name) for name in layout.COUNTERS}

    def close(self) -> None:
        self.table.close()
        self.events.close()
        self.bpf.cleanup()
