"""A flow record: one observation window of one bidirectional flow, shaped as a span."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEMA = "mermin.flow/v1"

END_ACTIVE = "active_timeout"
END_IDLE = "idle_timeout"
END_OF_FLOW = "end_of_flow_detected"
END_FORCED = "forced_end"
END_RESOURCES = "lack_of_resources"
END_REASONS = (END_ACTIVE, END_IDLE, END_OF_FLOW, END_FORCED, END_RESOURCES)

KIND_CLIENT = "client"
KIND_SERVER = "server"
KIND_INTERNAL = "internal"
DIRECTION_OF_KIND = {KIND_CLIENT: "forward", KIND_SERVER: "reverse", KIND_INTERNAL: "unknown"}


@dataclass(slots=True)
class FlowRecord:
    """The NDJSON record of PRODUCT.md; exporters build spans from exactly these fields."""

    name: str
    kind: str
    trace_id: str
    span_id: str
    start_time_unix_nano: int
    end_time_unix_nano: int
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "kind": self.kind,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "start_time_unix_nano": self.start_time_unix_nano,
            "end_time_unix_nano": self.end_time_unix_nano,
            "attributes": self.attributes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowRecord:
        """Inverse of `to_dict` (raises KeyError/TypeError/ValueError on malformed input)."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"unsupported schema {data.get('schema')!r}, expected {SCHEMA!r}")
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            trace_id=str(data["trace_id"]),
            span_id=str(data["span_id"]),
            start_time_unix_nano=int(data["start_time_unix_nano"]),
            end_time_unix_nano=int(data["end_time_unix_nano"]),
            attributes=dict(data["attributes"]),
        )
