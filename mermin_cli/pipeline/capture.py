"""The capture run: select interfaces, load and attach the program, poll, emit, clean up."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from mermin_cli.api.server import ApiServer, start_metrics_server
from mermin_cli.config.schema import Config
from mermin_cli.discovery.watch import LinkWatcher
from mermin_cli.engine.attach import Attacher
from mermin_cli.engine.compiler import import_bcc
from mermin_cli.engine.privileges import require_capture_privileges
from mermin_cli.engine.program import FlowProgram
from mermin_cli.errors import MerminError
from mermin_cli.export.hostnames import HostnameResolver
from mermin_cli.export.otlp import output_sinks
from mermin_cli.export.sink import Sink
from mermin_cli.flows.filters import FlowFilter, KernelFilter
from mermin_cli.flows.tracker import FlowTracker
from mermin_cli.logs import set_level
from mermin_cli.metrics.registry import Metrics
from mermin_cli.pipeline.hooks import Hooks
from mermin_cli.pipeline.stages import Pipeline
from mermin_cli.pipeline.status import RunState

log = logging.getLogger("mermin.capture")


@dataclass(frozen=True)
class CaptureOptions:
    """What `mermin capture` was asked to do beyond the config file."""

    duration: float | None = None  # seconds; None = until Ctrl-C / SIGTERM
    attach_mode: str = "auto"  # auto | tcx | tc


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


class Capture:
    """One capture run from attach to the last record."""

    def __init__(
        self,
        config: Config,
        writer: Sink | None,
        options: CaptureOptions,
        reload: Callable[[], Config] | None = None,
        program: Future[FlowProgram] | None = None,
    ) -> None:
        """`program`: one already being loaded for this config (see load_in_background)."""
        self.config = config
        self.program = program
        self.writer = writer  # the --format output; None: the config's stdout exporter if any
        self.options = options
        self.reload = reload
        self.stop = threading.Event()
        self.hup = threading.Event()
        self.started_ns = time.time_ns()
        self.ready = threading.Event()  # set once attached and serving (embedders wait on it)
        self.api_port: int | None = None  # the API server's port (also when configured as 0)
        self.sinks: list[Sink] = []

    def run(self) -> None:
        require_capture_privileges()
        import_bcc()
        cfg = self.config
        pipeline: Pipeline | None = None
        # Cleanup runs in reverse: servers, hooks (detach), program, exporters (flush).
        with ExitStack() as cleanup:
            # Exporters first: a bad export config fails before anything is attached.
            for sink in output_sinks(cfg, self.writer):
                self.sinks.append(sink)
                cleanup.callback(sink.close)
            resolver = None
            if cfg.span.enable_hostname_resolution:
                resolver = HostnameResolver(cfg.span.hostname_resolve_timeout)
                cleanup.callback(resolver.close)
            instrument = cfg.discovery.instrument
            capacity = cfg.pipeline.flow_capture.flow_stats_capacity
            if self.program is not None:
                program = self.program.result()
            else:
                program = FlowProgram(capacity, cfg.pipeline.flow_capture.flow_events_capacity)
            cleanup.callback(program.close)
            attacher = Attacher(
                program,
                mode=self.options.attach_mode,
                tc_priority=instrument.tc_priority,
                first=instrument.tcx_order == "first",
            )
            cleanup.callback(attacher.close)
            hooks = Hooks(
                attacher, tuple(instrument.interfaces), instrument.auto_discover_interfaces
            )
            cleanup.enter_context(_handle_signals(self.stop, self.hup))
            chosen = hooks.start()
            if hooks.auto_discover:
                watcher = LinkWatcher(hooks.reconcile)
                watcher.start()
                cleanup.callback(watcher.stop)
            if program.cache:
                program.cache.enable()
            tracker = FlowTracker(program.table, cfg.span, hooks.names.get)
            self._apply_filters(program, tracker, cfg)
            metrics = Metrics()
            metrics.method.labels(attachment=attacher.mode).set(1)
            producer = cfg.pipeline.flow_producer
            pipeline = Pipeline(
                program.events,
                tracker,
                metrics,
                workers=producer.workers,
                worker_queue=producer.worker_queue_capacity,
                span_queue=producer.flow_span_queue_capacity,
                decorated_queue=cfg.pipeline.k8s_decorator.decorated_span_queue_capacity,
                interface_name=hooks.names.get,
                decorators=[resolver.decorate] if resolver else [],
                sinks=self.sinks,
            )
            state = RunState(self, program, attacher, hooks, tracker, pipeline, metrics)
            for close in self._serve(state):
                cleanup.callback(close)
            pipeline.start()
            self.ready.set()
            log.info(
                "capturing on %s (%s); program loaded in %.2fs",
                ", ".join(i.name for i in chosen),
                attacher.mode,
                program.load_seconds,
            )
            try:
                self._loop(state)
                pipeline.finish(tracker.flush())
                state.refresh()
                state.summary()
            except BrokenPipeError:
                # The reader went away (`| head`): stop quietly, still cleaning up.
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        if hooks.failure:
            raise MerminError(hooks.failure)
        if pipeline and (stage := pipeline.failed()):
            raise MerminError(f"The pipeline stage {stage.name} failed: {stage.error}.")

    def _serve(self, state: RunState) -> list[Callable[[], None]]:
        """Start the metrics and API servers the config enables; returns their stoppers."""
        closers = []
        internal = self.config.internal
        if internal.metrics.enabled:
            closers.append(
                start_metrics_server(
                    state.metrics.registry, internal.metrics.listen_address, internal.metrics.port
                )
            )
        if internal.server.enabled:
            api = ApiServer(
                internal.server.listen_address,
                internal.server.port,
                live=state.live,
                ready=state.ready,
                status=state.status,
                flows=state.flows,
            )
            api.start()
            self.api_port = api.port
            closers.append(api.close)
        return closers

    def _loop(self, state: RunState) -> None:
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
                self._reload(state)
            state.pipeline.emit(state.tracker.poll())
            state.metrics.latency.labels(stage="flow_poll").observe(state.tracker.last_poll_seconds)
            state.refresh()
            state.hooks.reconcile()
            if state.hooks.failure or state.pipeline.failed():
                break
            if deadline is not None and time.monotonic() >= deadline:
                break

    @staticmethod
    def _apply_filters(program: FlowProgram, tracker: FlowTracker, config: Config) -> None:
        KernelFilter.from_config(config.filter).load(program.bpf)
        tracker.flow_filter = FlowFilter.from_config(config.filter)

    def _reload(self, state: RunState) -> None:
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
            log.warning("pipeline sizes, servers and tc hooks take effect at the next start")
        set_level(new.log_level)
        state.tracker.span = new.span
        self._apply_filters(state.program, state.tracker, new)
        state.hooks.set_patterns(tuple(new.discovery.instrument.interfaces))
        self.config = new
        log.info("configuration reloaded")


def _restart_only(config: Config) -> tuple[object, ...]:
    """Settings fixed while running (maps sized at load, queues at start, hooks at attach)."""
    instrument = config.discovery.instrument
    return (config.pipeline, config.internal, instrument.tc_priority, instrument.tcx_order)
