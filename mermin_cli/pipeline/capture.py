"""The capture run: select interfaces, load and attach the program, poll, emit, clean up."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mermin_cli.config.schema import Config
from mermin_cli.discovery.interfaces import (
    Interface,
    close_matches,
    default_route_interfaces,
    list_interfaces,
    match_interfaces,
)
from mermin_cli.engine.attach import Attacher
from mermin_cli.engine.privileges import require_capture_privileges
from mermin_cli.engine.program import FlowProgram, import_bcc
from mermin_cli.errors import MerminError, UsageError
from mermin_cli.flows.table import FlowTable
from mermin_cli.flows.tracker import FlowTracker
from mermin_cli.output.formats import StreamWriter

log = logging.getLogger("mermin.capture")


@dataclass(frozen=True)
class CaptureOptions:
    """What `mermin capture` was asked to do beyond the config file."""

    duration: float | None = None  # seconds; None = until Ctrl-C / SIGTERM
    attach_mode: str = "auto"  # auto | tcx | tc


def select_interfaces(patterns: tuple[str, ...], links: list[Interface]) -> list[Interface]:
    """Interfaces to capture on: the patterns' matches, or the default-route interfaces."""
    if not patterns:
        wanted = default_route_interfaces()
        chosen = [i for i in links if i.index in wanted]
        if not chosen:
            raise UsageError(
                "No interface holds a default route here; name one with -i "
                f"(interfaces: {', '.join(i.name for i in links)})."
            )
        return chosen
    for pattern in patterns:
        if not match_interfaces([pattern], links):
            hint = close_matches(pattern, links)
            log.warning(
                "Interface pattern %r did not match any interfaces%s",
                pattern,
                f" (did you mean {', '.join(hint)}?)" if hint else "",
            )
    chosen = match_interfaces(patterns, links)
    if not chosen:
        raise UsageError(
            f"No interfaces found to instrument: {', '.join(repr(p) for p in patterns)} "
            f"matched nothing; interfaces here: {', '.join(i.name for i in links)}."
        )
    return chosen


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM end the capture cleanly (flush, detach) instead of killing it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s, finishing", signal.Signals(signum).name)
        stop.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Capture:
    """One capture run from attach to the last record."""

    def __init__(self, config: Config, writer: StreamWriter, options: CaptureOptions) -> None:
        self.config = config
        self.writer = writer
        self.options = options
        self.stop = threading.Event()
        self.names: dict[int, str] = {}
        self.failure: str | None = None

    def run(self) -> None:
        require_capture_privileges()
        import_bcc()
        instrument = self.config.discovery.instrument
        chosen = select_interfaces(tuple(instrument.interfaces), list_interfaces())
        capacity = self.config.pipeline.flow_capture.flow_stats_capacity
        program = FlowProgram(capacity)
        attacher = Attacher(
            program,
            mode=self.options.attach_mode,
            tc_priority=instrument.tc_priority,
            first=instrument.tcx_order == "first",
        )
        try:
            with _stop_on_signals(self.stop):
                for iface in chosen:
                    attacher.remove_orphans(iface)
                    attacher.attach(iface)
                    self.names[iface.index] = iface.name
                log.info(
                    "capturing on %s (%s); program loaded in %.2fs",
                    ", ".join(i.name for i in chosen),
                    attacher.mode,
                    program.load_seconds,
                )
                table = FlowTable(program.flows_fd, capacity, program.bpf_lib)
                tracker = FlowTracker(table, self.config.span, self.names.get)
                health = KernelHealth(program, capacity)
                self._loop(tracker, attacher, health)
                self.writer.write(tracker.flush())
                health.summary(tracker)
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, still detaching below.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
        finally:
            attacher.close()
            program.close()
        if self.failure:
            raise MerminError(self.failure)

    def _loop(self, tracker: FlowTracker, attacher: Attacher, health: KernelHealth) -> None:
        interval = self.config.pipeline.flow_producer.flow_store_poll_interval
        deadline = (
            None if self.options.duration is None else time.monotonic() + self.options.duration
        )
        while not self.stop.is_set():
            wait = interval if deadline is None else min(interval, deadline - time.monotonic())
            if wait > 0 and self.stop.wait(wait):
                break
            self.writer.write(tracker.poll())
            health.check(tracker.table_size)
            self._forget_vanished(attacher)
            if deadline is not None and time.monotonic() >= deadline:
                break

    def _forget_vanished(self, attacher: Attacher) -> None:
        """Interfaces deleted under us: the kernel dropped the hooks; forget them, go on."""
        present = {i.index for i in list_interfaces()}
        for ifindex in [i for i in attacher.attached if i not in present]:
            log.warning("interface %s disappeared", self.names.get(ifindex, ifindex))
            attacher.detach(ifindex)
        if not attacher.attached:
            self.failure = "Every captured interface has disappeared; nothing left to capture."
            self.stop.set()


class KernelHealth:
    """Turns the kernel's loss counters into warnings, so loss is never silent."""

    def __init__(self, program: FlowProgram, capacity: int) -> None:
        self.program = program
        self.capacity = capacity
        self.seen = program.counters()
        self.warned_usage = False

    def check(self, table_size: int) -> None:
        now = self.program.counters()
        lost = now["map_full"] - self.seen["map_full"]
        if lost:
            log.warning(
                "flow table full (%d entries): %d packets (%d bytes) were not accounted; "
                "raise pipeline.flow_capture.flow_stats_capacity or shorten the span timeouts",
                self.capacity,
                lost,
                now["map_full_bytes"] - self.seen["map_full_bytes"],
            )
        usage = table_size / self.capacity
        if usage >= 0.8 and not self.warned_usage:
            log.warning("flow table is %.0f%% full (%d entries)", usage * 100, self.capacity)
        self.warned_usage = usage >= 0.8
        self.seen = now

    def summary(self, tracker: FlowTracker) -> None:
        c = self.program.counters()
        log.info(
            "done: %d packets seen, %d flows, %d records; not accounted: %d packets "
            "(table full), %d non-IP, %d truncated",
            c["packets"],
            c["new_flows"],
            tracker.records_emitted,
            c["map_full"],
            c["non_ip"],
            c["truncated"],
        )
