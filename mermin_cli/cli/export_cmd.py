"""`mermin export`: NDJSON flow records to the OTLP collector, or `--check` that it takes spans."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from enum import Enum
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer

from mermin_cli.cli.options import ConfigOpt
from mermin_cli.errors import MerminError, UsageError
from mermin_cli.flows.record import DIRECTION_OF_KIND, FlowRecord
from mermin_cli.logs import setup_logging

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

PROGRESS_MIN_BYTES = 1 << 20  # a progress bar for files from 1 MiB, on a terminal
MAX_REPORTED_LINES = 10  # malformed lines reported one by one; the rest are counted
_INT64 = range(-(2**63), 2**63)
_HEX = frozenset("0123456789abcdef")


class OtlpProtocol(str, Enum):
    """OTLP transport."""

    grpc = "grpc"
    http_binary = "http_binary"


def _check_id(value: str, digits: int, name: str) -> None:
    if len(value) != digits or not set(value) <= _HEX or not value.strip("0"):
        raise ValueError(f"{name} must be {digits} lowercase hex digits, not all zero")


def _check_value(key: str, value: Any) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and item not in _INT64:
            raise ValueError(f"attribute {key} = {item} does not fit a 64-bit integer")
        if not isinstance(item, str | int | float):
            raise ValueError(f"attribute {key} has a value of type {type(item).__name__}")


def parse_record(line: bytes) -> FlowRecord:
    """A flow record from one NDJSON line; ValueError says what is wrong with it."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if not isinstance(data.get("attributes", {}), dict):
        raise ValueError("attributes is not a JSON object")
    try:
        record = FlowRecord.from_dict(data)
    except KeyError as exc:
        raise ValueError(f"missing key {exc}") from None
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    _check_id(record.trace_id, 32, "trace_id")
    _check_id(record.span_id, 16, "span_id")
    if record.kind not in DIRECTION_OF_KIND:
        raise ValueError(f"kind {record.kind!r} is not one of client, server, internal")
    if not 0 <= record.start_time_unix_nano <= record.end_time_unix_nano:
        raise ValueError("times must satisfy 0 <= start_time_unix_nano <= end_time_unix_nano")
    for key, value in record.attributes.items():
        _check_value(key, value)
    return record


def _open_input(file: str, stack: ExitStack) -> tuple[IO[bytes], int | None]:
    """The input stream and its size in bytes when it is a regular file."""
    if file == "-":
        return sys.stdin.buffer, None
    try:
        stream = stack.enter_context(open(file, "rb"))  # noqa: SIM115 (closed by the stack)
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror or exc}") from None
    status = os.fstat(stream.fileno())
    return stream, status.st_size if stat.S_ISREG(status.st_mode) else None


def _batches(
    stream: IO[bytes], size: int, strict: bool
) -> Iterator[tuple[list[FlowRecord], int, int]]:
    """Batches of parsed records, with the malformed lines skipped and the bytes read."""
    batch: list[FlowRecord] = []
    skipped = reported = read = 0
    for number, line in enumerate(stream, 1):
        read += len(line)
        if not line.strip():
            continue
        try:
            batch.append(parse_record(line))
        except ValueError as exc:
            if strict:
                raise UsageError(f"line {number} is not a flow record: {exc} (--strict)") from None
            skipped += 1
            if reported < MAX_REPORTED_LINES:
                reported += 1
                more = (
                    "; further malformed lines are only counted"
                    if reported == MAX_REPORTED_LINES
                    else ""
                )
                typer.echo(f"mermin: warning: line {number} skipped: {exc}{more}", err=True)
        if len(batch) >= size:
            yield batch, skipped, read
            batch, skipped, read = [], 0, 0
    if batch or skipped:
        yield batch, skipped, read


def _progress_bar(size: int | None, stack: ExitStack) -> tuple[Progress, TaskID] | None:
    """A progress bar on stderr for a large file when stderr is a terminal."""
    if size is None or size < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import Progress

    progress = stack.enter_context(Progress(console=Console(stderr=True), transient=True))
    return progress, progress.add_task("exporting", total=size)


def export(
    file: Annotated[
        str | None,
        typer.Argument(
            metavar="[FILE|-]",
            help="NDJSON records as written by `capture --format json`; - = stdin.",
        ),
    ] = None,
    config: ConfigOpt = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            help="Collector URL, e.g. http://localhost:4317 (overrides the config's otlp).",
            show_default=False,
        ),
    ] = None,
    protocol: Annotated[
        OtlpProtocol | None,
        typer.Option(
            "--protocol", help="OTLP transport (overrides the config).", show_default=False
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", help="Seconds per request (overrides the config).", min=0.001),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop at the first malformed line (exit 2).")
    ] = False,
    check: Annotated[
        bool,
        typer.Option("--check", help="Send one test span and say whether the collector took it."),
    ] = False,
) -> None:
    """Send NDJSON flow records (file or stdin) to the OTLP collector as spans."""
    from mermin_cli.config.loader import load_config
    from mermin_cli.export.otlp import OtlpSink, check_collector
    from mermin_cli.export.spans import build_resource

    otlp_key = "export.traces.otlp"
    cfg = load_config(
        config,
        overrides={
            f"{otlp_key}.endpoint": endpoint,
            f"{otlp_key}.protocol": protocol.value if protocol else None,
            f"{otlp_key}.timeout": timeout,
        },
    )
    setup_logging(cfg.log_level)
    otlp = cfg.export.traces.otlp
    if otlp is None:
        raise UsageError(
            'no OTLP exporter is configured; pass --endpoint URL or set export "traces"'
            " { otlp = { endpoint = ... } } in the config"
        )
    if check:
        if file is not None:
            raise UsageError("--check sends a test span and reads no FILE; drop one of them")
        typer.echo(check_collector(otlp, build_resource()))
        return
    # A queue just deep enough to keep every export busy: reading waits for room instead of
    # dropping, and at the end one round of batches is queued and one in flight at most.
    queue_size = otlp.max_batch_size * otlp.max_concurrent_exports
    total = skipped = 0
    with ExitStack() as stack:
        stream, size = _open_input(file or "-", stack)
        sink = OtlpSink(dataclasses.replace(otlp, max_queue_size=queue_size), build_resource())
        bar = _progress_bar(size, stack)
        try:
            for batch, bad, read in _batches(stream, otlp.max_batch_size, strict):
                sink.write(batch, block=True)
                total += len(batch)
                skipped += bad
                if bar is not None:
                    progress, task = bar
                    status = f"{sink.sent} sent, {sink.failed} failed"
                    progress.update(task, advance=read, description=status)
        except KeyboardInterrupt:
            sink.close(timeout=1.0)
            raise
        finally:
            sink.close(timeout=2 * otlp.max_export_timeout)
    malformed = f", {skipped} malformed line{'s' * (skipped != 1)} skipped" if skipped else ""
    typer.echo(
        f"mermin: {sink.sent} of {total} records sent to {otlp.endpoint} ({otlp.protocol}),"
        f" {sink.failed + sink.dropped} failed{malformed}",
        err=True,
    )
    if sink.failed or sink.dropped:
        reason = sink.last_error or "the export did not finish in time"
        raise MerminError(
            f"{sink.failed + sink.dropped} of {total} records could not be sent: {reason};"
            " run `mermin export --check` to test the collector"
        )
