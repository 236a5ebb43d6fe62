"""One refresh of `mermin flows`: the API's flows filtered, sorted, cut to top N, totalled."""

from __future__ import annotations

import difflib
import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mermin_cli.config import values
from mermin_cli.errors import UsageError
from mermin_cli.flows import names

Flow = dict[str, Any]  # one entry of GET /api/v1/flows
Matcher = Callable[[Flow], bool]

SCHEMA = "mermin.flows/v1"
PORT_TRANSPORTS = frozenset({"tcp", "udp", "udplite", "sctp"})
COMMON_PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6", "sctp", "udplite", "gre", "esp", "ipv4", "ipv6")
PROTOCOLS = frozenset({names.transport_name(p) for p in range(256)} | {"ipv4", "ipv6"})


class SortKey(str, Enum):
    """What the flows are ordered by, biggest first (both directions together)."""

    bytes = "bytes"
    packets = "packets"
    rate = "rate"
    duration = "duration"


def duration_seconds(flow: Flow) -> float:
    """Time from the flow's first to its last packet."""
    return max(0, flow["last_seen_unix_nano"] - flow["first_seen_unix_nano"]) / 1e9


SORT_VALUE: dict[SortKey, Callable[[Flow], float]] = {
    SortKey.bytes: lambda f: sum(f["bytes"]),
    SortKey.packets: lambda f: sum(f["packets"]),
    SortKey.rate: lambda f: f["bytes_per_second"],
    SortKey.duration: duration_seconds,
}


# ------------------------------------------------------------------------------- filters


def _ip(text: str) -> Matcher:
    net = values.parse_cidr(text)
    return lambda f: any(
        ipaddress.ip_address(f[k]) in net for k in ("source.address", "destination.address")
    )


def _port(text: str) -> Matcher:
    low, high = values.parse_range(text, *values.PORT_BOUNDS)
    return lambda f: (
        f["network.transport"] in PORT_TRANSPORTS
        and any(low <= f[k] <= high for k in ("source.port", "destination.port"))
    )


def _protocol(text: str) -> Matcher:
    name = text.strip().lower()
    if name.isdigit() and int(name) < 256:
        name = names.transport_name(int(name))
    if name not in PROTOCOLS:
        close = difflib.get_close_matches(name, COMMON_PROTOCOLS, n=1) or (
            difflib.get_close_matches(name, sorted(PROTOCOLS), n=1)
        )
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f'"{text}" is not an IP protocol name or number{hint}')
    return lambda f: name in (f["network.transport"], f["network.type"])


def _interface(text: str) -> Matcher:
    # Imported here: discovery pulls in pyroute2 (0.2 s), which `mermin capture` would
    # otherwise pay before its compile starts, as this module is imported by the CLI.
    from mermin_cli.discovery.interfaces import compile_pattern

    matches = compile_pattern(text)
    return lambda f: matches(f["network.interface.name"])


FILTER_KINDS: dict[str, Callable[[str], Matcher]] = {
    "ip": _ip,
    "port": _port,
    "protocol": _protocol,
    "interface": _interface,
}


@dataclass(frozen=True)
class FilterFlag:
    """One filter flag from the command line: `--port 53`, or `--not --ip 10.0.0.0/8`."""

    kind: str  # a key of FILTER_KINDS
    value: str
    negated: bool = False


@dataclass(frozen=True)
class FlowMatch:
    """Which flows to show, as `hubble observe` filters: a flow is shown when, for every
    kind of filter given without --not, it matches at least one of them, and it matches
    none of the filters given with --not."""

    include: dict[str, list[Matcher]] = field(default_factory=dict)
    exclude: list[Matcher] = field(default_factory=list)

    @classmethod
    def from_flags(cls, flags: Iterable[FilterFlag]) -> FlowMatch:
        """Parse the flags; a bad value is a UsageError naming the flag."""
        include: dict[str, list[Matcher]] = {}
        exclude: list[Matcher] = []
        for flag in flags:
            try:
                matcher = FILTER_KINDS[flag.kind](flag.value)
            except ValueError as exc:
                raise UsageError(f"--{flag.kind} {flag.value!r} is invalid: {exc}.") from None
            if flag.negated:
                exclude.append(matcher)
            else:
                include.setdefault(flag.kind, []).append(matcher)
        return cls(include, exclude)

    def __call__(self, flow: Flow) -> bool:
        return all(any(m(flow) for m in ms) for ms in self.include.values()) and not any(
            m(flow) for m in self.exclude
        )


# ------------------------------------------------------------------------------ snapshot


def _loss(status: dict[str, Any]) -> dict[str, int]:
    """The loss counters of GET /api/v1/status, as the header and --json show them."""
    kernel, pipeline = status.get("kernel", {}), status.get("pipeline", {})
    return {
        "table_full_packets": kernel.get("map_full", 0),
        "ringbuf_dropped": kernel.get("events_dropped", 0),
        "backpressure_dropped": pipeline.get("ringbuf", {}).get("dropped_backpressure", 0),
        "export_dropped": sum(
            pipeline.get(ch, {}).get("dropped", 0)
            for ch in ("flow_span_channel", "decorated_span_channel")
        ),
        "filtered_flows": kernel.get("filtered_flows", 0)
        + status.get("flows", {}).get("filtered_userspace", 0),
    }


@dataclass(frozen=True)
class Snapshot:
    """What one refresh shows."""

    source: str  # where the data came from (API URL, or "own capture")
    interfaces: list[str]  # what the capture is attached to
    time_unix_nano: int
    sort: SortKey
    flows: list[Flow]  # matching flows, sorted, cut to top N
    matched: int  # flows matching the filters
    active: int  # all active flows of the capture
    totals: dict[str, Any]  # over the matching flows
    loss: dict[str, int]

    @classmethod
    def build(
        cls,
        source: str,
        status: dict[str, Any],
        flows: dict[str, Any],
        match: FlowMatch,
        sort: SortKey,
        top: int | None,
    ) -> Snapshot:
        """From the answers of /api/v1/status and /api/v1/flows."""
        active = flows["flows"]
        chosen = sorted(filter(match, active), key=SORT_VALUE[sort], reverse=True)
        return cls(
            source=source,
            interfaces=[i["name"] for i in status.get("interfaces", [])],
            time_unix_nano=flows["time_unix_nano"] or time.time_ns(),
            sort=sort,
            flows=chosen[:top],
            matched=len(chosen),
            active=len(active),
            totals={
                "packets": [sum(f["packets"][d] for f in chosen) for d in (0, 1)],
                "bytes": [sum(f["bytes"][d] for f in chosen) for d in (0, 1)],
                "packets_per_second": round(sum(f["packets_per_second"] for f in chosen), 1),
                "bytes_per_second": round(sum(f["bytes_per_second"] for f in chosen), 1),
            },
            loss=_loss(status),
        )

    def to_json(self) -> dict[str, Any]:
        """The NDJSON object of --json (schema mermin.flows/v1)."""
        return {
            "schema": SCHEMA,
            "time_unix_nano": self.time_unix_nano,
            "source": self.source,
            "interfaces": self.interfaces,
            "sort": self.sort.value,
            "totals": {"flows": self.matched, "active_flows": self.active, **self.totals},
            "loss": self.loss,
            "flows": self.flows,
        }
