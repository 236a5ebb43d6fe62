"""`mermin capture --read FILE`: recorded packets through the same kernel code as live.

The records of a pcap or pcapng file (gzip-compressed or not, or `-` for stdin) run
through `mermin_pcap` in bpf/flow.c with BPF_PROG_TEST_RUN: a window of classic pcap
records per run (pipeline/pcapfile.py makes them), each record through the same parse()
and account() as a live packet, so parsing and counting are exactly those of live
capture. The program is compiled with OFFLINE_CLOCK: every kernel time is the record's
timestamp (unix ns), so the tracker's clock is packet time and needs no wall-clock
offset. The tracker is polled at every `flow_store_poll_interval` of packet time (a run
stops before the first record past the next poll, so polls fall where a live poller's
would) and whenever a tenth of the table's capacity in flows was created since the last
poll, so evictions keep up as they do live; at end of input it is polled once more, then
active flows are flushed as `forced_end`. Python's cost is per window of records (up to
34), not per packet.

The records run on the loopback device of the current network namespace (the kernel's
choice for test runs); records name the capture file as their interface
(`network.interface.name`, `stdin` for `-`) with `network.interface.index` 0.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import mmap
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

from mermin_cli.config.schema import Config
from mermin_cli.engine import bpfsys
from mermin_cli.engine.program import FlowProgram
from mermin_cli.errors import MerminError
from mermin_cli.export.sink import Sink
from mermin_cli.flows.direction import LocalHost
from mermin_cli.flows.filters import FlowFilter, KernelFilter
from mermin_cli.flows.record import FlowRecord
from mermin_cli.flows.tracker import FlowTracker
from mermin_cli.pipeline.pcapfile import (
    LINK_NAMES,
    CaptureFile,
    Damaged,
    LibpcapSource,
    Stager,
    Stream,
)

log = logging.getLogger("mermin.offline")

NS = 1_000_000_000
ETH_HLEN = 14  # the least data a test run takes
PROGRESS_EVERY = 4096  # packets between progress-bar updates
MAX_PROBE = 4096 - 256  # first window size tried (a page less the smallest skb overhead)
READ_CHUNK = 1 << 22  # bytes of a classic pcap file read at a time
# Records larger than this on average are staged (their first bytes, many to a window)
# rather than run as they lie (a few to a window); a Python loop runs over at most
# COMPACT_SPAN bytes of them before the choice is made again.
COMPACT_ABOVE, COMPACT_SPAN = 512, 1 << 18
# `union bpf_attr` for BPF_PROG_TEST_RUN (80 bytes): prog_fd and repeat set once; its
# data_size_in, data_size_out and data_in written at once per run.
ATTR_SIZE, ATTR_REPEAT, U32 = 80, 32, struct.Struct("=I")
ATTR_DATA, ATTR_DATA_AT = struct.Struct("=IIQ"), 8
# struct offline_state in flow.c (the `offline` map's value, mmapped): fields by index, the
# deadline written and the results read per run; why mermin_pcap stopped (enum BATCH_*).
OFF_NOW, OFF_FRAC_NS, OFF_WINDOW, OFF_FIELDS = 0, 1, 2, 8
DEADLINE, DEADLINE_AT = struct.Struct("=Q"), 24
RESULT, RESULT_AT = struct.Struct("=QQQQ"), 32  # stop_ts, consumed, records, why
BATCH_MORE, BATCH_DEADLINE, BATCH_LIMIT, BATCH_DAMAGED = 0, 1, 2, 3


@dataclass
class OfflineStats:
    """What one `--read` run went through."""

    packets: int = 0  # records run through the kernel program
    runs: int = 0  # BPF_PROG_TEST_RUN calls
    seconds: float = 0.0  # wall-clock time of reading and running

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


class _Runner:
    """BPF_PROG_TEST_RUN of `mermin_pcap` with prebuilt attributes and no context (one
    costs ~2 us a run here); the `offline` map's value in memory (mmapable: settings and
    results without a syscall)."""

    def __init__(self, program: FlowProgram) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.syscall = libc.syscall
        self.syscall.restype = ctypes.c_long
        self.syscall.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong)
        self.nr = bpfsys.syscall_number()
        self.attr = ctypes.create_string_buffer(ATTR_SIZE)
        U32.pack_into(self.attr, 0, program.pcap_fd())
        U32.pack_into(self.attr, ATTR_REPEAT, 1)
        self.attr_addr, self.attr_size = ctypes.addressof(self.attr), ATTR_SIZE
        try:
            self.state = mmap.mmap(program.bpf[b"offline"].map_fd, mmap.PAGESIZE, mmap.MAP_SHARED)
        except OSError as exc:
            raise MerminError(
                f"Mapping the offline state failed ({exc.strerror}); mermin needs Linux 5.8+."
            ) from exc
        self.slots = (ctypes.c_uint64 * OFF_FIELDS).from_buffer(self.state)
        self.window = self._probe_window()
        self.slots[OFF_WINDOW] = self.window

    def run(self, addr: int, size: int, deadline: int) -> tuple[int, int, int, int]:
        """Run the records at `addr` (at least ETH_HLEN bytes) up to packet time `deadline`.
        Returns the time of the record it stopped before (BATCH_DEADLINE), the bytes
        consumed, the records run and why it stopped (BATCH_*). Called once per window:
        three C calls, nothing allocated but the tuple."""
        # data_size_out is written back by the kernel; left non-zero it would cap the next run
        ATTR_DATA.pack_into(self.attr, ATTR_DATA_AT, size, 0, addr)
        DEADLINE.pack_into(self.state, DEADLINE_AT, deadline)
        if self.syscall(self.nr, bpfsys.BPF_PROG_TEST_RUN, self.attr_addr, self.attr_size) < 0:
            err = ctypes.get_errno()
            raise MerminError(f"The kernel refused to run the flow program ({os.strerror(err)}).")
        return RESULT.unpack_from(self.state, RESULT_AT)  # type: ignore[return-value]

    def _probe_window(self) -> int:
        """Largest window a test run accepts (a page less the skb's head and tail room).

        Probed downwards with a record of time 0 and a deadline of 0: the program stops
        before it, so the probe counts nothing."""
        buf = ctypes.create_string_buffer(MAX_PROBE)
        DEADLINE.pack_into(self.state, DEADLINE_AT, 0)
        for size in range(MAX_PROBE, 1024, -64):
            ATTR_DATA.pack_into(self.attr, ATTR_DATA_AT, size, 0, ctypes.addressof(buf))
            if self.syscall(self.nr, bpfsys.BPF_PROG_TEST_RUN, self.attr_addr, self.attr_size) >= 0:
                return size
            if ctypes.get_errno() != errno.EINVAL:
                break
        err = ctypes.get_errno()
        raise MerminError(f"The kernel refused to run the flow program ({os.strerror(err)}).")


class OfflineCapture:
    """One `--read` run: load the program, feed the file through it, emit the records."""

    def __init__(
        self,
        config: Config,
        capture: CaptureFile,
        sinks: list[Sink],
        program: Future[FlowProgram],
        progress: bool | None = None,
    ) -> None:
        """`program`: the offline program being loaded (load_in_background, offline=True).
        The capture file and the sinks are closed when `run` ends."""
        self.config = config
        self.capture = capture
        self.sinks = sinks
        self.program = program
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.stats = OfflineStats()

    def run(self) -> OfflineStats:
        """Read the whole file; raises MerminError (after emitting what was read) if the
        file is damaged. The sinks are closed (exporters drain) on every path."""
        try:
            capacity = self.config.pipeline.flow_capture.flow_stats_capacity
            program = self.program.result()
            try:
                self._run(program, capacity)
            except BrokenPipeError:
                # The reader went away (`| head`): stop quietly.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            finally:
                program.close()
        finally:
            self.capture.close()
            self._close_sinks()
        return self.stats

    def _close_sinks(self) -> None:
        for sink in self.sinks:
            sink.close()

    def _run(self, program: FlowProgram, capacity: int) -> None:
        stream, source, classic = self.capture.stream, self.capture.source, self.capture.classic
        KernelFilter.from_config(self.config.filter).load(program.bpf)
        clock = RecordingClock()
        tracker = FlowTracker(
            program.table,
            self.config.span,
            lambda _ifindex: stream.name,
            host=LocalHost(refresh_interval=math.inf),  # a recording has no local addresses
            flow_filter=FlowFilter.from_config(self.config.filter),
            clock=clock,
        )
        runner = _Runner(program)
        runner.slots[OFF_FRAC_NS] = classic.frac_ns if classic else 1  # staged records: ns
        log.info(
            "reading %s (%s, %s); program loaded in %.2fs",
            stream.label,
            LINK_NAMES[source.dlt] if source else "Ethernet",
            "staged through libpcap" if source else "records walked by the kernel",
            program.load_seconds,
        )
        with _progress_bar(self.progress, stream) as advance:
            feed = _Feed(self, program, runner, tracker, clock, capacity, advance)
            feed.position = source.position if source else stream.position
            started = time.perf_counter()
            failure = feed.staged(source) if source else feed.direct(stream)
            self.stats = OfflineStats(feed.packets, feed.runs, time.perf_counter() - started)
            clock.now = feed.last_ts
        self._emit(tracker.poll())  # timeouts that ran out by the last packet
        self._emit(tracker.flush())
        self._summary(program, tracker, stream)
        failure = failure or (source.feeder_error() if source else None)
        if failure is not None:
            raise MerminError(
                f"{stream.label} is truncated or damaged ({failure}); {self.stats.packets} "
                "packets were read before that and their flows reported."
            )

    def _emit(self, records: list[FlowRecord]) -> None:
        if not records:
            return
        for r in records:
            r.attributes["network.interface.index"] = 0  # no device: see the module doc
        for sink in self.sinks:
            sink.write(records)

    def _summary(self, program: FlowProgram, tracker: FlowTracker, stream: Stream) -> None:
        s, c = self.stats, program.counters()
        log.info(
            "done: %d packets read from %s in %.2fs (%.0f packets/s, %.1f per kernel run), "
            "%d flows, %d records; not accounted: %d non-IP, %d truncated, %d table full; "
            "filtered: %d flows in the kernel, %d after",
            s.packets,
            stream.name,
            s.seconds,
            s.rate,
            s.packets / max(s.runs, 1),
            c["new_flows"],
            tracker.records_emitted,
            c["non_ip"],
            c["truncated"],
            c["map_full"],
            c["filtered_flows"],
            tracker.filtered,
        )
        if c["map_full"]:
            log.warning(
                "flow table full: %d packets were not accounted; raise "
                "pipeline.flow_capture.flow_stats_capacity",
                c["map_full"],
            )


class _Feed:
    """Windows of records through the kernel, the tracker polled on packet time."""

    def __init__(
        self,
        capture: OfflineCapture,
        program: FlowProgram,
        runner: _Runner,
        tracker: FlowTracker,
        clock: RecordingClock,
        capacity: int,
        advance: Callable[[int, int], None],
    ) -> None:
        self.emit = capture._emit
        self.runner, self.tracker, self.clock, self.advance = runner, tracker, clock, advance
        poll = capture.config.pipeline.flow_producer.flow_store_poll_interval
        self.interval = max(1, int(poll * NS))
        # New flows between polls beyond the grid's, so evictions keep up as they do live.
        # Packets since the last check bound them: the kernel counter is read only then.
        self.burst = max(64, capacity // 10)
        self.new_flows = lambda: program.counter("new_flows")
        self.flows_at_poll = 0
        self.position: Callable[[], int] = lambda: 0
        self.next_poll = 0  # packet time of the next poll; 0: before the first packet
        self.since_check = self.packets = self.runs = 0
        self.next_progress = PROGRESS_EVERY
        self.record_bytes = 0.0  # mean size of the records read lately: picks how to run them

    def window(self, addr: int, size: int) -> int:
        """Run the records at `addr`; returns the bytes consumed: less than `size` when the
        last record goes on past the window, more when it was longer than any window."""
        run, done = self.runner.run, 0
        while size - done >= ETH_HLEN:
            stop_ts, consumed, records, why = run(addr + done, size - done, self.next_poll)
            self.runs += 1
            done += consumed
            if records:
                self.packets += records
                self.since_check += records
                if self.since_check >= self.burst or self.packets >= self.next_progress:
                    self._checkpoint()
            if why == BATCH_DEADLINE:  # poll before the record at this time
                if self.packets:
                    self.next_poll = self._poll_through(self.next_poll, stop_ts)
                else:
                    self.next_poll = stop_ts + self.interval
            elif why == BATCH_DAMAGED:
                raise Damaged("a record claims more than 256 KiB of data")
            elif why == BATCH_MORE:
                break
        return done

    @property
    def last_ts(self) -> int:
        """Time of the latest record run (0 before any)."""
        return self.runner.slots[OFF_NOW] if self.packets else 0

    def _checkpoint(self) -> None:
        """Every `burst` packets: poll if that many flows were created since the last poll
        (so evictions keep up); every PROGRESS_EVERY packets: the progress bar."""
        if self.since_check >= self.burst:
            self.since_check = 0
            flows = self.new_flows()
            if flows - self.flows_at_poll >= self.burst:
                self.flows_at_poll = flows
                self.clock.now = self.last_ts
                self.emit(self.tracker.poll())
        if self.packets >= self.next_progress:
            self.advance(self.packets, self.position())
            self.next_progress = self.packets + PROGRESS_EVERY

    def _poll_through(self, at: int, ts: int) -> int:
        """Poll at each grid point up to packet time `ts`, as a live poller would have run
        through a gap, stopping early once the table is empty; returns the next point."""
        tracker, interval = self.tracker, self.interval
        while at <= ts:
            self.clock.now = at
            self.emit(tracker.poll())
            at += interval
            if tracker.table_size == 0 and at <= ts:  # nothing to expire until the next packet
                at += ((ts - at) // interval + 1) * interval
        return at

    def direct(self, stream: Stream) -> str | None:
        """A classic pcap file's records as they lie, read in large chunks; returns why
        the file ended early, or None."""
        window = self.runner.window
        buf = ctypes.create_string_buffer(READ_CHUNK + window)
        view, base = memoryview(buf).cast("B"), ctypes.addressof(buf)
        start = end = 0
        eof = False
        stager = Stager(window, self.window)
        try:
            while True:
                if not eof and end - start < window:
                    view[: end - start] = view[start:end]
                    start, end = 0, end - start
                    while end < window and not eof:
                        count = stream.readinto(view[end:])
                        end += count
                        eof = not count
                if start == end and eof:
                    return None
                used = 0
                if self.record_bytes > COMPACT_ABOVE:
                    used = self._compact(stager, view, start, end)
                if not used:
                    used = self._direct_window(base + start, min(window, end - start))
                if not used:  # only at the end: the window's first record is not whole
                    return f"the last record is cut short: {end - start} bytes left"
                start += used
                if start > end:  # a record longer than any window: skip its unread rest
                    if not self._skip(stream, start - end):
                        return "the last record is cut short"
                    start = end = 0
        except Damaged as exc:
            return str(exc)

    def _direct_window(self, addr: int, size: int) -> int:
        """The records as they lie: no Python per record."""
        packets = self.packets
        used = self.window(addr, size)
        self.record_bytes = used / max(self.packets - packets, 1)
        return used

    def _compact(self, stager: Stager, view: memoryview, start: int, end: int) -> int:
        """Large records (full-size frames fill a window two or three at a time): their
        first bytes staged, many to a window. Returns the bytes of `view[start:end]` done,
        0 if its first record is not whole there (the kernel takes it as it lies)."""
        pos, records = stager.add_classic(view, start, end, min(end, start + COMPACT_SPAN))
        stager.finish()
        if records:
            self.record_bytes = (pos - start) / records
        return pos - start

    @staticmethod
    def _skip(stream: Stream, count: int) -> bool:
        while count:
            chunk = stream.read1(min(count, READ_CHUNK))
            if not chunk:
                return False
            count -= len(chunk)
        return True

    def staged(self, source: LibpcapSource) -> str | None:
        """Packets libpcap reads, staged into windows; returns libpcap's error if the
        file ended early, or None."""
        return source.stage_all(Stager(self.runner.window, self.window, source.dlt))


@contextmanager
def _progress_bar(enabled: bool, source: Stream) -> Iterator[Callable[[int, int], None]]:
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
