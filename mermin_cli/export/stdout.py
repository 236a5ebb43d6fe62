"""The stdout exporter: records as text lines, indented blocks or NDJSON on a stream."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TextIO

from mermin_cli.export.sink import QueueSink
from mermin_cli.flows.record import FlowRecord
from mermin_cli.output.formats import to_json, to_text

log = logging.getLogger("mermin.export")

DEFAULT_QUEUE_SIZE = 32768


def _timestamp(unix_nano: int) -> str:
    seconds, nanos = divmod(unix_nano, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


def to_text_indent(record: FlowRecord) -> str:
    """A readable multi-line block: envelope, then one attribute per line (JSON values)."""
    duration_ms = (record.end_time_unix_nano - record.start_time_unix_nano) / 1e6
    width = max(map(len, record.attributes), default=0)
    lines = [
        f"{record.name} ({record.kind})",
        f"    trace_id    {record.trace_id}",
        f"    span_id     {record.span_id}",
        f"    start       {_timestamp(record.start_time_unix_nano)}",
        f"    end         {_timestamp(record.end_time_unix_nano)} (+{duration_ms:.3f} ms)",
        "    attributes",
    ]
    lines += [
        f"        {key:<{width}}  {json.dumps(value, ensure_ascii=False)}"
        for key, value in record.attributes.items()
    ]
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[FlowRecord], str]] = {
    "text": to_text,
    "text_indent": to_text_indent,
    "json": to_json,
}


class StdoutSink(QueueSink):
    """Writes records in ``fmt`` (text, text_indent or json) from a worker thread."""

    def __init__(
        self, fmt: str, stream: TextIO | None = None, max_queue_size: int = DEFAULT_QUEUE_SIZE
    ) -> None:
        self.render = RENDERERS[fmt]
        self.stream = stream
        super().__init__(
            f"stdout {fmt}",
            max_queue_size=max_queue_size,
            max_batch_size=max_queue_size,
            max_batch_interval=0.0,
            workers=1,
        )

    def export(self, batch: list[FlowRecord]) -> None:
        stream = self.stream or sys.stdout
        try:
            stream.write("".join(self.render(record) + "\n" for record in batch))
            stream.flush()
        except (OSError, ValueError) as exc:  # closed pipe or stream
            if not self.failed:
                log.warning("stdout exporter cannot write (%s); records are counted as failed", exc)
            self.count_failed(len(batch))
            return
        self.count_sent(len(batch))
