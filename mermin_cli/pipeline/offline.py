"""`mermin capture --read FILE`: recorded packets through the same kernel program as live.

Every packet of a pcap or pcapng file (gzip-compressed or not, or `-` for stdin) runs
once through the L2 entry point of bpf/flow.c with BPF_PROG_TEST_RUN, so parsing
and counting are exactly those of live capture. The program is compiled with
OFFLINE_CLOCK: before each packet its timestamp (unix ns) is written to `offline_clock`,
so every kernel time is the recording's; the tracker's clock is the packet time and
needs no wall-clock offset. The tracker is polled every `flow_store_poll_interval` of
packet time (and after every tenth of the table's capacity in packets, so evictions keep
up as they do live); at end of input it is polled once more, then active flows are
flushed as `forced_end`.

Reading is libpcap's (through ctypes): pcap and pcapng with nanosecond timestamps and
its exact error messages for damaged files. A frame is handed to the kernel straight
from libpcap's buffer for Ethernet captures; other link types (raw IP, Linux cooked
SLL/SLL2, BSD loopback) are rewritten into a reused buffer behind a fake Ethernet header
(zero MACs) whose EtherType the kernel turns into `skb->protocol`. The per-packet loop
allocates nothing: the bpf(2) attributes are prebuilt and only their size, data pointer
and the clock value change.

The packets run on the loopback device of the current network namespace (the kernel's
choice for test runs); records name the capture file as their interface
(`network.interface.name`, `stdin` for `-`) with `network.interface.index` 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gzip
import io
import logging
import math
import mmap
import os
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mermin_cli.config.schema import Config
from mermin_cli.engine import bpfsys
from mermin_cli.engine.compiler import import_bcc
from mermin_cli.engine.privileges import missing_capabilities
from mermin_cli.engine.program import FlowProgram
from mermin_cli.errors import MerminError, UsageError
from mermin_cli.export.sink import Sink
from mermin_cli.flows.direction import LocalHost
from mermin_cli.flows.filters import FlowFilter, KernelFilter
from mermin_cli.flows.record import FlowRecord
from mermin_cli.flows.table import FlowTable
from mermin_cli.flows.tracker import FlowTracker

log = logging.getLogger("mermin.offline")

NS = 1_000_000_000
ETH_HLEN = 14
# What flow.c reads of a frame: Ethernet with a VLAN tag (22), an IPv4 header with options
# (60) and the first 14 bytes of TCP. A frame captured short of its length (snaplen) but at
# least this far is zero-filled to its length, so its IP bytes count as on the wire.
HEADER_BYTES = 96
PROGRESS_EVERY = 4096  # packets between progress-bar updates (a power of two)
MAX_PROBE = 4096 - 256  # first frame size tried (a page less the smallest skb overhead)
# struct __sk_buff as a test run's context: only wire_len set, the longest length it takes.
SKB_CTX_SIZE, SKB_WIRE_LEN, WIRE_LEN_MAX = 192, 160, 65536

PCAP_TSTAMP_PRECISION_NANO = 1
PCAP_ERRBUF_SIZE = 256
PCAP_ERROR_BREAK = -2  # pcap_next_ex: end of the savefile
GZIP_MAGIC = b"\x1f\x8b"

# libpcap DLT_* values (pcap_datalink() maps file LINKTYPE_* values to these).
DLT_NULL, DLT_EN10MB, DLT_RAW, DLT_LOOP = 0, 1, 12, 108
DLT_LINUX_SLL, DLT_IPV4, DLT_IPV6, DLT_LINUX_SLL2 = 113, 228, 229, 276
LINK_NAMES = {
    DLT_NULL: "BSD loopback",
    DLT_EN10MB: "Ethernet",
    DLT_RAW: "raw IP",
    DLT_LOOP: "OpenBSD loopback",
    DLT_LINUX_SLL: "Linux cooked (SLL)",
    DLT_IPV4: "raw IPv4",
    DLT_IPV6: "raw IPv6",
    DLT_LINUX_SLL2: "Linux cooked v2 (SLL2)",
}
# Link-layer header length of the link types carried behind a fake Ethernet header.
LINK_HEADER = {
    DLT_RAW: 0,
    DLT_IPV4: 0,
    DLT_IPV6: 0,
    DLT_NULL: 4,
    DLT_LOOP: 4,
    DLT_LINUX_SLL: 16,
    DLT_LINUX_SLL2: 20,
}
ETHERTYPE_OF_IP_VERSION = {4: b"\x08\x00", 6: b"\x86\xdd"}


class _Timeval(ctypes.Structure):
    _fields_ = (("sec", ctypes.c_long), ("frac", ctypes.c_long))  # ns with NANO precision


class _PktHdr(ctypes.Structure):
    _fields_ = (("ts", _Timeval), ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32))


class _TestRunAttr(ctypes.Structure):
    """`union bpf_attr` as BPF_PROG_TEST_RUN reads it (80 bytes, unused fields zero)."""

    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.syscall.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong)
    libc.fdopen.restype = ctypes.c_void_p
    libc.fdopen.argtypes = (ctypes.c_int, ctypes.c_char_p)
    libc.ftell.restype = ctypes.c_long
    libc.ftell.argtypes = (ctypes.c_void_p,)
    return libc


def _libpcap() -> ctypes.CDLL:
    """libpcap with the prototypes we call (ctypes' defaults would truncate pointers)."""
    name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise MerminError(
            "Reading capture files needs libpcap; install it (Debian/Ubuntu: "
            "apt-get install libpcap0.8) and retry."
        ) from exc
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    for fn, res, args in (
        ("pcap_open_offline_with_tstamp_precision", vp, (cp, ctypes.c_uint, cp)),
        ("pcap_fopen_offline_with_tstamp_precision", vp, (vp, ctypes.c_uint, cp)),
        ("pcap_next_ex", ctypes.c_int, (vp, ctypes.POINTER(vp), ctypes.POINTER(vp))),
        ("pcap_datalink", ctypes.c_int, (vp,)),
        ("pcap_datalink_val_to_name", cp, (ctypes.c_int,)),
        ("pcap_geterr", cp, (vp,)),
        ("pcap_file", vp, (vp,)),
        ("pcap_close", None, (vp,)),
    ):
        func = getattr(lib, fn)
        func.restype, func.argtypes = res, args
    return lib


@dataclass
class OfflineStats:
    """What one `--read` run went through."""

    packets: int = 0  # packets read from the file
    skipped: int = 0  # refused by BPF_PROG_TEST_RUN (shorter than an Ethernet/IP header)
    cut: int = 0  # longer than WIRE_LEN_MAX: counted as that long
    padded: int = 0  # captured short of their length (snaplen): zero-filled to it
    seconds: float = 0.0  # wall-clock time of the packet loop

    @property
    def rate(self) -> float:
        """Packets per second through the loop."""
        return self.packets / self.seconds if self.seconds > 0 else 0.0


class RecordingClock:
    """The tracker's clock: the time of the recording, already unix ns (no offset)."""

    def __init__(self) -> None:
        self.now = 0

    def now_ns(self) -> int:
        return self.now

    def wall_offset_ns(self) -> int:
        return 0


class _Source:
    """An open capture file: libpcap handle, link type and how far reading has come."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = "stdin" if path == "-" else Path(path).name
        self.label = "standard input" if path == "-" else path
        self.lib = _libpcap()
        self._libc = _libc()
        self.total: int | None = None  # bytes to read, for the progress bar
        self._feeder: _Feeder | None = None
        errbuf = ctypes.create_string_buffer(PCAP_ERRBUF_SIZE)
        if path == "-":
            self._feeder = _Feeder(sys.stdin.buffer, sys.stdin.buffer.peek(2)[:2] == GZIP_MAGIC)
            self.handle = self._fopen(self._feeder.read_fd, errbuf)
        else:
            try:
                with open(path, "rb") as fh:
                    compressed = fh.read(2) == GZIP_MAGIC
                self.total = os.path.getsize(path)
            except OSError as exc:
                raise UsageError(
                    f"Cannot read {path}: {exc.strerror or exc}; give an existing pcap or "
                    "pcapng file (or - for standard input)."
                ) from exc
            if compressed:
                self._feeder = _Feeder(open(path, "rb"), True)  # noqa: SIM115 (the feeder closes it)
                self.handle = self._fopen(self._feeder.read_fd, errbuf)
            else:
                self.handle = self.lib.pcap_open_offline_with_tstamp_precision(
                    os.fsencode(path), PCAP_TSTAMP_PRECISION_NANO, errbuf
                )
        if not self.handle:
            self._fail_open(errbuf.value.decode(errors="replace"))
        self.dlt = int(self.lib.pcap_datalink(self.handle))
        if self.dlt != DLT_EN10MB and self.dlt not in LINK_HEADER:
            name = self.lib.pcap_datalink_val_to_name(self.dlt) or b"unknown"
            self.close()
            raise MerminError(
                f"{self.label} has link type {name.decode()} ({self.dlt}), which mermin cannot "
                "read; it reads Ethernet, raw IP, Linux cooked (SLL, SLL2) and loopback captures."
            )

    def _fopen(self, fd: int, errbuf: ctypes.Array[ctypes.c_char]) -> int | None:
        stream = self._libc.fdopen(fd, b"rb")
        if not stream:
            raise MerminError(f"Cannot read {self.label}: fdopen failed.")
        return self.lib.pcap_fopen_offline_with_tstamp_precision(
            stream, PCAP_TSTAMP_PRECISION_NANO, errbuf
        )

    def _fail_open(self, reason: str) -> None:
        what = "is not a pcap or pcapng file"
        if self._feeder is not None:
            self._feeder.close()
            if self._feeder.error:
                what, reason = "is truncated or damaged", self._feeder.error
        raise MerminError(f"{self.label} {what} ({reason}); 0 packets were read.")

    def position(self) -> int:
        """Bytes of the file consumed so far (compressed bytes for gzip input)."""
        if self._feeder is not None:
            return self._feeder.consumed
        return max(0, int(self._libc.ftell(self.lib.pcap_file(self.handle))))

    def error(self) -> str:
        """Why reading stopped early (libpcap's message, or the decompressor's)."""
        if self._feeder is not None:
            self._feeder.join(timeout=0.2)  # it may still be blocked on a full pipe
            if self._feeder.error:
                return self._feeder.error
        return (self.lib.pcap_geterr(self.handle) or b"read error").decode(errors="replace")

    def feeder_error(self) -> str | None:
        """A decompression error that libpcap saw only as a clean end of input."""
        if self._feeder is None:
            return None
        self._feeder.join()
        return self._feeder.error

    def close(self) -> None:
        if self.handle:
            self.lib.pcap_close(self.handle)  # closes the FILE and the pipe's read end
            self.handle = None
        if self._feeder is not None:
            self._feeder.close()


class _Feeder(threading.Thread):
    """Copies (and gunzips) a Python stream into a pipe that libpcap reads."""

    CHUNK = 1 << 20

    def __init__(self, stream: io.BufferedIOBase, compressed: bool) -> None:
        super().__init__(name="mermin-read", daemon=True)
        self.stream = stream
        self.compressed = compressed
        self.read_fd, self._write_fd = os.pipe()
        self.consumed = 0
        self.error: str | None = None
        self.start()

    def run(self) -> None:
        raw = self.stream
        try:
            source = gzip.GzipFile(fileobj=raw, mode="rb") if self.compressed else raw
            # read1: what was decompressed before damage still reaches libpcap.
            while chunk := source.read1(self.CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._write_fd, view) :]
                self.consumed = raw.tell() if raw.seekable() else self.consumed + len(chunk)
        except BrokenPipeError:
            pass  # the reader stopped early
        except (OSError, EOFError, zlib.error) as exc:
            self.error = f"gzip: {exc}" if self.compressed else str(exc)
        finally:
            os.close(self._write_fd)
            if raw is not sys.stdin.buffer:
                raw.close()

    def close(self) -> None:
        self.join(timeout=5)


class _Runner:
    """BPF_PROG_TEST_RUN of the L2 entry point with prebuilt attributes, the
    `offline_clock` map update, and the reused frame buffer for rewritten frames."""

    HEADROOM = 32  # room before the frame for a link header longer than Ethernet's

    def __init__(self, program: FlowProgram) -> None:
        self.nr = bpfsys.syscall_number()
        self.syscall = _libc().syscall
        self.attr = _TestRunAttr(prog_fd=program.prog_fd(l3=False), repeat=1)
        self.attr_addr = ctypes.addressof(self.attr)
        self.attr_size = ctypes.sizeof(self.attr)
        self.set_clock = self._clock_setter(program.bpf[b"offline_clock"].map_fd)
        self.buf = ctypes.create_string_buffer(self.HEADROOM + MAX_PROBE)
        self.view = memoryview(self.buf).cast("B")
        self.frame = ctypes.addressof(self.buf) + self.HEADROOM
        self.max_frame = self._probe_max_frame()
        self.ctx = ctypes.create_string_buffer(SKB_CTX_SIZE)

    def pass_wire_len(self, wire: int) -> None:
        """For the next run only: the frame's recorded length, longer than its data."""
        struct.pack_into("I", self.ctx, SKB_WIRE_LEN, wire)
        self.attr.ctx_in = ctypes.addressof(self.ctx)
        self.attr.ctx_size_in = SKB_CTX_SIZE

    def _clock_setter(self, map_fd: int) -> Callable[[int], None]:
        """Set `offline_clock` by a store into the (mmapable) map's memory: no syscall."""
        try:
            self._clock_mem = mmap.mmap(map_fd, mmap.PAGESIZE, mmap.MAP_SHARED)
        except OSError as exc:
            raise MerminError(
                f"Mapping the offline clock failed ({exc.strerror}); mermin needs Linux 5.8+."
            ) from exc
        cell = ctypes.c_uint64.from_buffer(self._clock_mem)

        def store(ns: int) -> None:
            cell.value = ns

        return store

    def _probe_max_frame(self) -> int:
        """Largest frame a test run accepts (a page less the skb's head and tail room).

        Probed downwards with a frame whose EtherType is not IP: refused sizes never reach
        the program, and the one accepted run counts as one non-IP packet.
        """
        h = self.HEADROOM
        self.view[h + 12 : h + 14] = b"\x88\xb5"  # IEEE local experimental EtherType
        self.attr.data_in = self.frame
        for size in range(MAX_PROBE, 1024, -64):
            self.attr.data_size_in = size
            if self.syscall(self.nr, bpfsys.BPF_PROG_TEST_RUN, self.attr_addr, self.attr_size) >= 0:
                return size
            if ctypes.get_errno() != errno.EINVAL:
                break
        err = ctypes.get_errno()
        raise MerminError(f"The kernel refused to run the flow program ({os.strerror(err)}).")

    def rewriter(self, dlt: int) -> Callable[[int, int], int]:
        """For a non-Ethernet link type: copy a packet behind a fake Ethernet header
        (zero MACs, the right EtherType) into the frame buffer; returns the frame size."""
        strip = LINK_HEADER[dlt]
        view, h, frame, memmove = self.view, self.HEADROOM, self.frame, ctypes.memmove
        dst, room = frame + ETH_HLEN - strip, self.max_frame - ETH_HLEN + strip
        zero_macs = bytes(12)

        def by_ip_version(src: int, caplen: int) -> int:
            n = min(caplen, room)
            memmove(dst, src, n)
            view[h : h + 12] = zero_macs
            view[h + 12 : h + 14] = ETHERTYPE_OF_IP_VERSION.get(view[h + 14] >> 4, b"\0\0")
            return n + ETH_HLEN - strip

        def sll(src: int, caplen: int) -> int:  # protocol field lands on the EtherType
            n = min(caplen, room)
            memmove(dst, src, n)
            view[h : h + 12] = zero_macs
            return n + ETH_HLEN - strip

        def sll2(src: int, caplen: int) -> int:  # protocol field is the first one
            n = min(caplen, room)
            memmove(dst, src, n)
            view[h + 12 : h + 14] = view[h - 6 : h - 4]
            view[h : h + 12] = zero_macs
            return n + ETH_HLEN - strip

        return {DLT_LINUX_SLL: sll, DLT_LINUX_SLL2: sll2}.get(dlt, by_ip_version)


class OfflineCapture:
    """One `--read` run: load the program, feed the file through it, emit the records."""

    def __init__(
        self, config: Config, path: str, sinks: list[Sink], progress: bool | None = None
    ) -> None:
        self.config = config
        self.path = path
        self.sinks = sinks
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.stats = OfflineStats()

    def run(self) -> OfflineStats:
        """Read the whole file; raises MerminError (after emitting what was read) if the
        file is damaged. The sinks are closed (exporters drain) on every path."""
        try:
            source = _Source(self.path)
        except BaseException:
            self._close_sinks()
            raise
        try:
            _require_privileges()
            import_bcc()
            capacity = self.config.pipeline.flow_capture.flow_stats_capacity
            program = FlowProgram(capacity, offline=True)
            try:
                self._run(source, program, capacity)
            except BrokenPipeError:
                # The reader went away (`| head`): stop quietly.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            finally:
                program.close()
        finally:
            source.close()
            self._close_sinks()
        return self.stats

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            sink.close()

    def _run(self, source: _Source, program: FlowProgram, capacity: int) -> None:
        KernelFilter.from_config(self.config.filter).load(program.bpf)
        clock = RecordingClock()
        tracker = FlowTracker(
            FlowTable.of(program, capacity),
            self.config.span,
            lambda _ifindex: source.name,
            host=LocalHost(refresh_interval=math.inf),  # a recording has no local addresses
            flow_filter=FlowFilter.from_config(self.config.filter),
            clock=clock,
        )
        runner = _Runner(program)
        log.info(
            "reading %s (%s); program loaded in %.2fs",
            source.label,
            LINK_NAMES[source.dlt],
            program.load_seconds,
        )
        with _progress_bar(self.progress, source) as advance:
            failure = self._loop(source, runner, tracker, clock, capacity, advance)
        self._emit(tracker.poll())  # timeouts that ran out by the last packet
        self._emit(tracker.flush())
        self._summary(program, tracker, source)
        failure = failure or source.feeder_error()
        if failure is not None:
            raise MerminError(
                f"{source.label} is truncated or damaged ({failure}); {self.stats.packets} "
                "packets were read before that and their flows reported."
            )

    def _loop(
        self,
        source: _Source,
        runner: _Runner,
        tracker: FlowTracker,
        clock: RecordingClock,
        capacity: int,
        advance: Callable[[int, int], None],
    ) -> str | None:
        """Run every packet; returns libpcap's error if the file ends early, else None."""
        stats = self.stats
        next_ex, handle = source.lib.pcap_next_ex, source.handle
        hdr_ptr, data_ptr = ctypes.c_void_p(), ctypes.c_void_p()
        hdr_ref, data_ref = ctypes.byref(hdr_ptr), ctypes.byref(data_ptr)
        hdr = _PktHdr()
        hdr_at: int | None = None
        rewrite = runner.rewriter(source.dlt) if source.dlt in LINK_HEADER else None
        grow = ETH_HLEN - LINK_HEADER.get(source.dlt, ETH_HLEN)  # frame length - packet length
        attr, max_frame, set_clock = runner.attr, runner.max_frame, runner.set_clock
        syscall, nr, test_run = runner.syscall, runner.nr, bpfsys.BPF_PROG_TEST_RUN
        attr_addr, attr_size = runner.attr_addr, runner.attr_size
        interval = max(1, int(self.config.pipeline.flow_producer.flow_store_poll_interval * NS))
        burst = max(64, capacity // 10)  # packets between polls, so evictions keep up
        next_poll = since_poll = skipped = packets = 0
        last_ts = -1
        failure: str | None = None
        started = time.perf_counter()
        while True:
            ret = next_ex(handle, hdr_ref, data_ref)
            if ret != 1:
                if ret != PCAP_ERROR_BREAK:
                    failure = source.error()
                break
            if hdr_ptr.value != hdr_at:  # libpcap reuses one header struct for a savefile
                hdr_at = hdr_ptr.value
                hdr = _PktHdr.from_address(hdr_at or 0)
            ts = hdr.ts.sec * NS + hdr.ts.frac
            packets += 1
            if ts >= next_poll:
                if last_ts >= 0:
                    next_poll = self._poll_through(tracker, clock, next_poll, interval, ts)
                else:
                    next_poll = ts + interval
                since_poll = 0
            elif since_poll >= burst:
                clock.now = last_ts
                self._emit(tracker.poll())
                since_poll = 0
            if ts != last_ts:
                set_clock(ts)
                last_ts = ts
            if rewrite is None:
                addr, size = data_ptr.value, hdr.caplen
            else:
                addr, size = runner.frame, rewrite(data_ptr.value, hdr.caplen)
            wire = hdr.len + grow
            fitted = wire > size or size > max_frame
            if fitted:
                addr, size = self._fit(runner, addr, size, wire)
            attr.data_in = addr
            attr.data_size_in = size
            attr.data_size_out = 0  # the kernel writes it back; non-zero would cap the next run
            if syscall(nr, test_run, attr_addr, attr_size) < 0:
                skipped += 1
            if fitted:  # a wire length may have been passed, for this frame only
                attr.ctx_size_in = 0
            since_poll += 1
            if not packets & (PROGRESS_EVERY - 1):
                advance(packets, source.position())
        stats.seconds = time.perf_counter() - started
        stats.packets, stats.skipped = packets, skipped
        clock.now = max(last_ts, 0)
        return failure

    def _fit(self, runner: _Runner, addr: int, size: int, wire: int) -> tuple[int, int]:
        """Rare frames: longer than a test run takes (GSO super-packets of a capture on
        veth or lo, jumbo frames: the first bytes go in, the recorded length rides along
        as wire_len, so the IP length field counts), or captured short of their length
        (snaplen) but with every header the program reads (zero-filled to their length, so
        IP bytes count as on the wire)."""
        if wire > runner.max_frame:
            runner.pass_wire_len(min(wire, WIRE_LEN_MAX))
            self.stats.cut += wire > WIRE_LEN_MAX
        size = min(size, runner.max_frame)
        target = min(wire, runner.max_frame)
        if size < target and size >= HEADER_BYTES:
            if addr != runner.frame:
                ctypes.memmove(runner.frame, addr, size)
                addr = runner.frame
            ctypes.memset(runner.frame + size, 0, target - size)
            size = target
            self.stats.padded += 1
        return addr, size

    def _poll_through(
        self, tracker: FlowTracker, clock: RecordingClock, at: int, interval: int, ts: int
    ) -> int:
        """Poll at each grid point up to packet time `ts`, as a live poller would have run
        through a gap, stopping early once the table is empty; returns the next point."""
        while at <= ts:
            clock.now = at
            self._emit(tracker.poll())
            at += interval
            if tracker.table_size == 0 and at <= ts:  # nothing to expire until the next packet
                at += ((ts - at) // interval + 1) * interval
        return at

    def _emit(self, records: list[FlowRecord]) -> None:
        if not records:
            return
        for r in records:
            r.attributes["network.interface.index"] = 0  # no device: see the module doc
        for sink in self.sinks:
            sink.write(records)

    def _summary(self, program: FlowProgram, tracker: FlowTracker, source: _Source) -> None:
        s, c = self.stats, program.counters()
        log.info(
            "done: %d packets read from %s in %.2fs (%.0f packets/s), %d flows, %d records; "
            "not accounted: %d refused by the kernel (shorter than their headers), %d non-IP, "
            "%d truncated, %d table full; filtered: %d flows in the kernel, %d after",
            s.packets,
            source.name,
            s.seconds,
            s.rate,
            c["new_flows"],
            tracker.records_emitted,
            s.skipped,
            c["non_ip"] - 1,  # less the frame-size probe
            c["truncated"],
            c["map_full"],
            c["filtered_flows"],
            tracker.filtered,
        )
        if s.padded:
            log.info(
                "%d packets captured short of their length (snaplen) were zero-filled to it, "
                "so their IP bytes count in full",
                s.padded,
            )
        if s.cut:
            log.warning(
                "%d packets were longer than the %d bytes a kernel test run can stand for "
                "(BIG TCP super-packets): each counted as %d bytes",
                s.cut,
                WIRE_LEN_MAX,
                WIRE_LEN_MAX,
            )
        if c["map_full"]:
            log.warning(
                "flow table full: %d packets were not accounted; raise "
                "pipeline.flow_capture.flow_stats_capacity",
                c["map_full"],
            )


def _require_privileges() -> None:
    """Fail before compiling when the kernel would refuse to load the program."""
    missing = missing_capabilities()
    if missing:
        raise MerminError(
            f"Reading a capture file runs it through the eBPF flow program, and loading that "
            f"needs {', '.join(missing)} (no interface is touched); run it as root "
            "(sudo mermin capture --read ...)."
        )


@contextmanager
def _progress_bar(enabled: bool, source: _Source) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr (bytes of the file, packets, rate); a no-op if off."""
    if not enabled:
        yield lambda _packets, _position: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[packets]:,} packets"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task(source.name, total=source.total, packets=0)

    def advance(packets: int, position: int) -> None:
        progress.update(task, completed=position, packets=packets)

    with progress:
        yield advance
