"""Compile bpf/flow.c with BCC. Kept free of numpy and the rest of the engine, so that
`mermin capture` can start the compile (most of its start-up) before those import."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from mermin_cli.engine.cpus import possible_cpus
from mermin_cli.engine.kernel_headers import HeaderTree, prepare_bcc_headers
from mermin_cli.errors import MerminError

if TYPE_CHECKING:
    from mermin_cli.engine.program import FlowProgram

log = logging.getLogger("mermin.engine")
T = TypeVar("T")

EVENT_BYTES = 64  # struct flow_event in bpf/flow.c (layout.EVENT_DTYPE checks it)
FLOW_PROBES = 64  # slots a key may be found in, from its home slot on (bpf/flow.c)


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


def event_slots(capacity: int) -> int:
    """Slots of each CPU's new-flow ring for `capacity` events (a power of two, at least
    `capacity`: the kernel indexes a ring with a mask)."""
    return 1 << max(0, capacity - 1).bit_length()


def flow_slots(max_flows: int) -> int:
    """Home slots of a table of `max_flows` entries: twice as many, so that probe
    sequences stay short when it is full (the array has FLOW_PROBES more after them)."""
    return 2 * max_flows


def event_cpus() -> int:
    """Rings to make: one per CPU number the kernel may ever hand out."""
    return max(possible_cpus()) + 1


def load_failed(exc: BaseException) -> MerminError:
    """The error for a program BCC could not compile or the kernel would not load."""
    if isinstance(exc, PermissionError):
        return MerminError(
            "The kernel refused to load the eBPF program (permission denied); "
            "run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON."
        )
    return MerminError(  # BCC raises plain Exception for compile/verifier errors
        f"Loading the eBPF program failed ({str(exc).strip().splitlines()[-1]}); "
        "run `mermin doctor` to check kernel BPF support and headers."
    )


class Compiled(NamedTuple):
    """bpf/flow.c compiled by BCC: maps created, programs not yet loaded."""

    bpf: Any  # bcc.BPF
    headers: HeaderTree  # the kernel headers it was compiled against
    seconds: float  # the compile's wall time


# BCC compiles with debug info, for BTF: pretty map dumps in bpftool, source lines in
# verifier logs. mermin needs neither, and without it the compile takes a sixth (0.2 s
# here) less, the largest part of start-up.
NO_DEBUG_INFO = "-g0"


def compile_flow_c(max_flows: int, event_capacity: int, offline: bool) -> Compiled:
    """Compile bpf/flow.c for a table of `max_flows` and rings of `event_capacity` events
    per CPU."""
    started = time.monotonic()
    headers = prepare_bcc_headers()
    bcc = import_bcc()
    src = bpf_source()
    if not src.is_file():
        raise MerminError(f"The eBPF source {src} is missing; reinstall mermin.")
    cflags = [
        NO_DEBUG_INFO,
        f"-DMAX_FLOWS={max_flows}",
        f"-DFLOW_SLOTS={flow_slots(max_flows)}",
        f"-DFLOW_PROBES={FLOW_PROBES}",
        f"-DEVENT_SLOTS={event_slots(event_capacity)}",
        f"-DEVENT_CPUS={event_cpus()}",
    ]
    if offline:
        cflags.append("-DOFFLINE_CLOCK")

    def compile_without_kallsyms() -> Any:
        hide_kallsyms()
        return bcc.BPF(src_file=str(src).encode(), cflags=cflags)

    # A thread of its own: hide_kallsyms() changes the mount namespace of the calling
    # thread, and this one ends with the compile.
    try:
        bpf = in_thread(compile_without_kallsyms, "mermin-bcc").result()
    except Exception as exc:
        raise load_failed(exc) from exc
    return Compiled(bpf, headers, time.monotonic() - started)


def in_thread(work: Callable[[], T], name: str) -> Future[T]:
    """Run `work` in a daemon thread; its result or exception arrives in the future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # handed to whoever waits for the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


# unshare(2) and mount(2) flags, from <linux/sched.h> and <linux/mount.h>
CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000


def hide_kallsyms() -> bool:
    """Give the calling thread a mount namespace of its own in which /proc/kallsyms is
    empty (/dev/null bound over it); False if that is not allowed (the file stays in view).

    Why: on every compile BCC's frontend asks whether the kernel has
    bpf_probe_read_kernel by loading all of /proc/kallsyms into a symbol cache (122,000
    symbols here: 0.25-0.3 s alone, 0.4-0.5 s of start-up, where the compile shares the
    CPUs with the imports). flow.c calls no probe-read helper, so the answer changes
    nothing: without the symbol BCC only adds defines that nothing uses. Needs
    CAP_SYS_ADMIN; without it the compile just takes longer. The namespace's mounts are
    made private before the bind, so nothing reaches the host's mount table, and the
    namespace goes away with the thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    steps = (
        ("unshare", lambda: libc.unshare(CLONE_NEWNS)),
        ("private", lambda: libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)),
        ("bind", lambda: libc.mount(b"/dev/null", b"/proc/kallsyms", None, MS_BIND, None)),
    )
    for step, call in steps:
        if call() != 0:
            reason = os.strerror(ctypes.get_errno())
            log.debug("compiling with /proc/kallsyms in view (%s: %s)", step, reason)
            return False
    return True


def load_in_background(
    max_flows: int, event_capacity: int, offline: bool = False
) -> Future[FlowProgram]:
    """Compile and load the flow program in a thread. The LLVM compile runs in libbcc
    with the GIL released, so the caller's imports and set-up proceed meanwhile."""

    def load() -> FlowProgram:
        compiled = compile_flow_c(max_flows, event_capacity, offline)
        from mermin_cli.engine.program import FlowProgram  # numpy: after the compile began

        return FlowProgram(max_flows, event_capacity, offline, compiled)

    return in_thread(load, "mermin-load")
