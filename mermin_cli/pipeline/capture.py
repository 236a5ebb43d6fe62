"""The capture run: select interfaces, load and attach the program, poll, emit, clean up."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mermin_cli.config.schema import Config
from mermin_cli.discovery.interfaces import (
    Interface,
    default_route_interfaces,
    list_interfaces,
    match_interfaces,
    unmatched_warning,
)
from mermin_cli.discovery.watch import LinkWatcher
from mermin_cli.engine.attach import Attacher
from mermin_cli.engine.privileges import require_capture_privileges
from mermin_cli.engine.program import FlowProgram, import_bcc
from mermin_cli.errors import MerminError, UsageError
from mermin_cli.flows.filters import FlowFilter, KernelFilter
from mermin_cli.flows.table import FlowTable
from mermin_cli.flows.tracker import FlowTracker
from mermin_cli.logs import set_level
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
        if warning := unmatched_warning(pattern, links):
            log.warning("%s", warning)
    chosen = match_interfaces(patterns, links)
    if not chosen:
        raise UsageError(
            f"No interfaces found to instrument: {', '.join(repr(p) for p in patterns)} "
            f"matched nothing; interfaces here: {', '.join(i.name for i in links)}."
        )
    return chosen


@contextmanager
def _handle_signals(stop: threading.Event, hup: threading.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM end the capture cleanly (flush, detach); SIGHUP asks for a reload."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def handler(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            hup.set()
            return
        log.info("received %s, finishing", signal.Signals(signum).name)
        stop.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Hooks:
    """The interfaces we are attached to, kept in step with the patterns and the host.

    `reconcile()` is called from the netlink watcher thread and from the poll loop, so
    everything that touches the attacher holds the lock.
    """

    def __init__(self, attacher: Attacher, patterns: tuple[str, ...], auto_discover: bool) -> None:
        self.attacher = attacher
        self.patterns = patterns
        self.auto_discover = auto_discover
        self.names: dict[int, str] = {}
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._failed: set[int] = set()  # attach failed: retried while discovery runs

    def start(self) -> list[Interface]:
        """Attach to the initial selection (an error if it is empty)."""
        chosen = select_interfaces(self.patterns, list_interfaces())
        if not self.patterns:  # default-route interfaces: keep to exactly those
            self.patterns = tuple(i.name for i in chosen)
        with self._lock:
            for iface in chosen:
                self.attacher.remove_orphans(iface)
                self._attach(iface, fatal=not self.auto_discover)
        return chosen

    def reconcile(self) -> None:
        """Forget vanished interfaces; with auto-discovery, attach new matching ones."""
        links = list_interfaces()
        with self._lock:
            present = {i.index: i for i in links}
            for ifindex in [i for i in self.attacher.attached if i not in present]:
                log.warning("interface %s disappeared", self.names.get(ifindex, ifindex))
                self.attacher.detach(ifindex)
            self._failed &= present.keys()
            if self.auto_discover:
                for iface in match_interfaces(self.patterns, links):
                    if iface.index not in self.attacher.attached:
                        self._attach(iface, fatal=False)
            if not self.attacher.attached and not self.auto_discover:
                self.failure = "Every captured interface has disappeared; nothing left to capture."

    def set_patterns(self, patterns: tuple[str, ...]) -> None:
        """New patterns (config reload): detach what no longer matches, attach the rest."""
        with self._lock:
            self.patterns = patterns or self.patterns
            keep = {i.index for i in match_interfaces(self.patterns, list_interfaces())}
            for ifindex in [i for i in self.attacher.attached if i not in keep]:
                self.attacher.detach(ifindex)
        self.reconcile()

    def _attach(self, iface: Interface, fatal: bool) -> None:
        try:
            self.attacher.attach(iface)
        except MerminError as exc:
            if fatal:
                raise
            if iface.index not in self._failed:
                log.warning("%s; will retry while the interface exists", exc)
            self._failed.add(iface.index)
            return
        self._failed.discard(iface.index)
        self.names[iface.index] = iface.name


class Capture:
    """One capture run from attach to the last record."""

    def __init__(
        self,
        config: Config,
        writer: StreamWriter,
        options: CaptureOptions,
        reload: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.writer = writer
        self.options = options
        self.reload = reload
        self.stop = threading.Event()
        self.hup = threading.Event()

    def run(self) -> None:
        require_capture_privileges()
        import_bcc()
        instrument = self.config.discovery.instrument
        capacity = self.config.pipeline.flow_capture.flow_stats_capacity
        program = FlowProgram(capacity)
        attacher = Attacher(
            program,
            mode=self.options.attach_mode,
            tc_priority=instrument.tc_priority,
            first=instrument.tcx_order == "first",
        )
        hooks = Hooks(attacher, tuple(instrument.interfaces), instrument.auto_discover_interfaces)
        watcher = LinkWatcher(hooks.reconcile) if hooks.auto_discover else None
        try:
            with _handle_signals(self.stop, self.hup):
                chosen = hooks.start()
                if watcher:
                    watcher.start()
                log.info(
                    "capturing on %s (%s); program loaded in %.2fs",
                    ", ".join(i.name for i in chosen),
                    attacher.mode,
                    program.load_seconds,
                )
                table = FlowTable(program.flows_fd, capacity, program.bpf_lib)
                tracker = FlowTracker(table, self.config.span, hooks.names.get)
                self._apply_filters(program, tracker, self.config)
                health = KernelHealth(program, capacity)
                self._loop(program, tracker, hooks, health)
                self.writer.write(tracker.flush())
                health.summary(tracker)
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, still detaching below.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
        finally:
            if watcher:
                watcher.stop()
            attacher.close()
            program.close()
        if hooks.failure:
            raise MerminError(hooks.failure)

    def _loop(
        self, program: FlowProgram, tracker: FlowTracker, hooks: Hooks, health: KernelHealth
    ) -> None:
        deadline = (
            None if self.options.duration is None else time.monotonic() + self.options.duration
        )
        while not self.stop.is_set():
            interval = self.config.pipeline.flow_producer.flow_store_poll_interval
            wait = interval if deadline is None else min(interval, deadline - time.monotonic())
            if wait > 0 and self.stop.wait(wait):
                break
            if self.hup.is_set():
                self.hup.clear()
                self._reload(program, tracker, hooks)
            self.writer.write(tracker.poll())
            health.check(tracker.table_size)
            hooks.reconcile()
            if hooks.failure:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break

    @staticmethod
    def _apply_filters(program: FlowProgram, tracker: FlowTracker, config: Config) -> None:
        KernelFilter.from_config(config.filter).load(program.bpf)
        tracker.flow_filter = FlowFilter.from_config(config.filter)

    def _reload(self, program: FlowProgram, tracker: FlowTracker, hooks: Hooks) -> None:
        """SIGHUP: apply a new config if it is valid, else keep the running one."""
        if not self.config.auto_reload or self.reload is None:
            log.warning("SIGHUP ignored: auto_reload is off")
            return
        try:
            new = self.reload()
        except MerminError as exc:
            log.warning("config reload refused, keeping the running config: %s", exc)
            return
        if _restart_only(new) != _restart_only(self.config):
            log.warning("flow_capture sizes and tc_priority take effect at the next start")
        set_level(new.log_level)
        tracker.span = new.span
        self._apply_filters(program, tracker, new)
        hooks.set_patterns(tuple(new.discovery.instrument.interfaces))
        self.config = new
        log.info("configuration reloaded")


def _restart_only(config: Config) -> tuple[object, ...]:
    """Settings fixed while running (map sizes are set at load, hooks at attach)."""
    instrument = config.discovery.instrument
    return (config.pipeline.flow_capture, instrument.tc_priority, instrument.tcx_order)


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
            "done: %d packets seen, %d flows, %d records; filtered: %d flows (%d packets) "
            "in the kernel, %d flows after; not accounted: %d packets (table full), "
            "%d non-IP, %d truncated",
            c["packets"],
            c["new_flows"],
            tracker.records_emitted,
            c["filtered_flows"],
            c["filtered_packets"],
            tracker.filtered,
            c["map_full"],
            c["non_ip"],
            c["truncated"],
        )
