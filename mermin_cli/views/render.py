"""How a snapshot looks: the header lines and the flow table, styled for the full screen
or plain (aligned text without colors or control codes) for pipes and `watch`."""

from __future__ import annotations

import io
from datetime import datetime

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mermin_cli.output.formats import _endpoint, _size
from mermin_cli.views.snapshot import Flow, Snapshot, SortKey, duration_seconds

# (title, sort key it shows, right-aligned)
COLUMNS: tuple[tuple[str, SortKey | None, bool], ...] = (
    ("SOURCE", None, False),
    ("DESTINATION", None, False),
    ("PROTO", None, False),
    ("STATE", None, False),
    ("IFACE", None, False),
    ("PKTS->", SortKey.packets, True),
    ("PKTS<-", SortKey.packets, True),
    ("BYTES->", SortKey.bytes, True),
    ("BYTES<-", SortKey.bytes, True),
    ("BYTES/S", SortKey.rate, True),
    ("PKTS/S", None, True),
    ("DURATION", SortKey.duration, True),
)
HEADER_LINES = 3  # lines above the table
LOSS_LABELS = (
    ("table_full_packets", "table full {} packets"),
    ("ringbuf_dropped", "ring buffer {} events"),
    ("backpressure_dropped", "backpressure {} events"),
    ("export_dropped", "export {} records"),
)


def duration(seconds: float) -> str:
    """`4.2s`, `3m04s`, `2h05m`."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(seconds) // 60
    if minutes < 60:
        return f"{minutes}m{int(seconds) % 60:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def row(flow: Flow) -> list[str]:
    """The cells of one flow, in COLUMNS order."""
    transport = flow["network.transport"]
    return [
        _endpoint(flow["source.address"], flow["source.port"], transport),
        _endpoint(flow["destination.address"], flow["destination.port"], transport),
        transport,
        flow["state"],
        flow["network.interface.name"],
        str(flow["packets"][0]),
        str(flow["packets"][1]),
        _size(flow["bytes"][0]),
        _size(flow["bytes"][1]),
        _size(round(flow["bytes_per_second"])),
        f"{flow['packets_per_second']:.1f}",
        duration(duration_seconds(flow)),
    ]


def header(snap: Snapshot) -> list[str]:
    """HEADER_LINES lines: source and sort; flow totals and rates; loss counters."""
    when = datetime.fromtimestamp(snap.time_unix_nano / 1e9)
    t = snap.totals
    shown = f" (top {len(snap.flows)})" if len(snap.flows) < snap.matched else ""
    loss = snap.loss
    return [
        f"mermin flows  {snap.source}  on {', '.join(snap.interfaces) or '-'}  "
        f"{when:%H:%M:%S}  sort: {snap.sort.value}",
        f"flows: {snap.matched} of {snap.active} active{shown}  "
        f"packets/s: {t['packets_per_second']:.1f}  bytes/s: {_size(round(t['bytes_per_second']))}"
        f"  packets: {sum(t['packets'])}  bytes: {_size(sum(t['bytes']))}",
        "loss: "
        + ", ".join(label.format(loss[key]) for key, label in LOSS_LABELS)
        + f"  filtered: {loss['filtered_flows']} flows",
    ]


def table(snap: Snapshot, rows: int | None = None, styled: bool = False) -> Table:
    """The flow table (at most `rows` rows); `styled` marks the sort column and adds color."""
    tab = Table(box=None, pad_edge=False, header_style="bold reverse" if styled else "")
    for title, key, right in COLUMNS:
        marked = styled and key is snap.sort
        tab.add_column(
            title + (" ▼" if marked else ""),
            justify="right" if right else "left",
            no_wrap=True,
            style="bold" if marked else None,
        )
    for flow in snap.flows[:rows]:
        tab.add_row(*map(Text, row(flow)))  # Text: "[fd00::1]:53" is not markup
    return tab


def plain(snap: Snapshot) -> str:
    """The header and the whole table as aligned text, without trailing blanks."""
    out = io.StringIO()
    console = Console(file=out, width=100_000, color_system=None, highlight=False, emoji=False)
    for line in header(snap):
        console.print(Text(line))
    console.print()
    console.print(table(snap))
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"
