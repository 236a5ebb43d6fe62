"""Compile and load bpf/flow.c with BCC; expose its programs, flow table and counters."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from mermin_cli.engine import layout
from mermin_cli.engine.clock import TickClock
from mermin_cli.engine.kernel_headers import prepare_bcc_headers
from mermin_cli.errors import MerminError

log = logging.getLogger("mermin.engine")


def kernel_version() -> tuple[int, int]:
    """(major, minor) of the running kernel."""
    major, minor = [*(int(n) for n in re.findall(r"\d+", platform.release())[:2]), 0, 0][:2]
    return major, minor


def bpf_source() -> Path:
    """bpf/flow.c of this checkout (or $MERMIN_BPF_DIR)."""
    base = os.environ.get("MERMIN_BPF_DIR")
    path = Path(base) if base else Path(__file__).resolve().parents[2] / "bpf"
    return path / "flow.c"


def import_bcc() -> Any:
    """Import the distribution's bcc module, or explain how to get it."""
    try:
        import bcc
    except ImportError as exc:
        raise MerminError(
            "The bcc Python module is missing; install python3-bpfcc (Debian/Ubuntu) "
            "and run `make setup` to expose it to .venv."
        ) from exc
    return bcc


class FlowProgram:
    """The loaded flow program: four SCHED_CLS entry points sharing one flow table."""

    def __init__(self, max_flows: int, event_capacity: int = 1024, offline: bool = False) -> None:
        self.max_flows = max_flows
        self.event_bytes = event_pages(event_capacity) * 4096
        self.offline = offline
        self.headers = prepare_bcc_headers()
        bcc = import_bcc()
        src = bpf_source()
        if not src.is_file():
            raise MerminError(f"The eBPF source {src} is missing; reinstall mermin.")
        started = time.monotonic()
        try:
            self.bpf = bcc.BPF(
                src_file=str(src).encode(), cflags=_cflags(max_flows, event_capacity, offline)
            )
            self.fds = {
                k: self.bpf.load_func(name.encode(), bcc.BPF.SCHED_CLS).fd
                for k, name in layout.PROGRAMS.items()
            }
        except PermissionError as exc:
            raise MerminError(
                "The kernel refused to load the eBPF program (permission denied); "
                "run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON."
            ) from exc
        except Exception as exc:  # BCC raises plain Exception for compile/verifier errors
            raise MerminError(
                f"Loading the eBPF program failed ({str(exc).strip().splitlines()[-1]}); "
                "run `mermin doctor` to check kernel BPF support and headers."
            ) from exc
        self.load_seconds = time.monotonic() - started
        self.bpf_lib = bcc.libbcc.lib
        self.flows = self.bpf[b"flows"]
        self.flows_fd: int = self.flows.map_fd
        # Live tables stamp flows in jiffies (converted by `clock`); offline ones in ns.
        self.clock: TickClock | None = None
        if not offline:
            clock_fd = self.bpf.load_func(b"mermin_clock", bcc.BPF.SCHED_CLS).fd
            self.clock = TickClock.calibrate(clock_fd, self.bpf[b"clock_sync"].map_fd)
        self._counters = self.bpf[b"counters"]
        key_size = ctypes.sizeof(self.flows.Key)
        value_size = ctypes.sizeof(self.flows.Leaf)
        if (key_size, value_size) != (layout.KEY_DTYPE.itemsize, layout.STATS_DTYPE.itemsize):
            raise MerminError(
                f"bpf/flow.c and engine/layout.py disagree on struct sizes "
                f"({key_size}/{value_size} vs {layout.KEY_DTYPE.itemsize}/"
                f"{layout.STATS_DTYPE.itemsize}); this is a bug in mermin."
            )
        log.debug("flow program compiled and loaded in %.2fs", self.load_seconds)

    def prog_fd(self, l3: bool, egress: bool) -> int:
        return self.fds[(l3, egress)]

    def counters(self) -> dict[str, int]:
        """Kernel counters summed over CPUs."""
        totals = dict.fromkeys(layout.COUNTERS, 0)
        for idx, name in enumerate(layout.COUNTERS):
            totals[name] = int(sum(self._counters[ctypes.c_int(idx)]))
        return totals

    def close(self) -> None:
        self.bpf.cleanup()


def event_pages(capacity: int) -> int:
    """Ring-buffer pages for `capacity` new-flow events (a power of two, as the kernel wants)."""
    needed = -(-capacity * layout.EVENT_DTYPE.itemsize // 4096)
    return 1 << max(0, needed - 1).bit_length()


def _cflags(max_flows: int, event_capacity: int, offline: bool) -> list[str]:
    flags = [f"-DMAX_FLOWS={max_flows}", f"-DEVENT_PAGES={event_pages(event_capacity)}"]
    if offline:
        flags.append("-DOFFLINE_CLOCK")
    return flags


def load_in_background(max_flows: int, event_capacity: int) -> Future[FlowProgram]:
    """Compile and load the flow program in a thread. The LLVM compile runs in libbcc with
    the GIL released, so the caller's imports and set-up proceed meanwhile."""
    future: Future[FlowProgram] = Future()

    def load() -> None:
        try:
            future.set_result(FlowProgram(max_flows, event_capacity))
        except BaseException as exc:  # handed to whoever waits for the program
            future.set_exception(exc)

    threading.Thread(target=load, name="mermin-load", daemon=True).start()
    return future
