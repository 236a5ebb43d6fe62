"""Flow records on a stream: NDJSON for scripts, aligned text lines for people."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from enum import Enum
from typing import TextIO

from mermin_cli.flows.record import FlowRecord


class OutputFormat(str, Enum):
    """How `capture` prints records on stdout."""

    text = "text"
    json = "json"


def to_json(record: FlowRecord) -> str:
    """The NDJSON line of a record (schema mermin.flow/v1), without newline."""
    return json.dumps(record.to_dict(), separators=(",", ":"), ensure_ascii=False)


def _endpoint(address: str, port: int, transport: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return host if transport not in ("tcp", "udp", "sctp", "udplite") else f"{host}:{port}"


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


def to_text(record: FlowRecord) -> str:
    """One aligned, human-readable line per record."""
    a = record.attributes
    ts = datetime.fromtimestamp(record.end_time_unix_nano / 1e9, tz=timezone.utc)
    transport = a["network.transport"]
    src = _endpoint(a["source.address"], a["source.port"], transport)
    dst = _endpoint(a["destination.address"], a["destination.port"], transport)
    if transport in ("icmp", "icmpv6"):
        detail = a.get("flow.icmp.type.name") or a.get("flow.reverse.icmp.type.name", "")
    elif "flow.tcp.flags.tags" in a:
        tags = sorted(set(a["flow.tcp.flags.tags"]) | set(a["flow.reverse.tcp.flags.tags"]))
        detail = a.get("flow.connection.state", "") + " [" + ",".join(tags) + "]"
    else:
        detail = ""
    iface = a.get("network.interface.name", str(a["network.interface.index"]))
    return (
        f"{ts:%H:%M:%S}.{ts.microsecond // 1000:03d} {iface:<10} {transport:<6} "
        f"{src:>28} -> {dst:<28} {record.kind:<8} "
        f"{a['flow.packets.delta']:>7}p {_size(a['flow.bytes.delta']):>8} / "
        f"{a['flow.reverse.packets.delta']:>7}p {_size(a['flow.reverse.bytes.delta']):>8}  "
        f"{a['flow.end_reason']:<20} {detail}"
    ).rstrip()


class StreamWriter:
    """The `--format` output of `capture`: records on a stream, written synchronously so a
    slow reader (a pipe) slows the export stage down rather than losing records here."""

    name = "stdout"
    failed = 0
    dropped = 0

    def __init__(self, stream: TextIO, fmt: str) -> None:
        self.stream = stream
        self.render = to_json if fmt == "json" else to_text
        self.sent = 0

    def write(self, records: Iterable[FlowRecord]) -> None:
        lines = [self.render(r) for r in records]
        if lines:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
            self.sent += len(lines)

    def close(self) -> None:
        """Nothing is buffered."""
