"""`mermin doctor`: why flows are missing, check by check, with the evidence and the fix."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from mermin_cli.cli.options import ConfigOpt
from mermin_cli.engine.hooks import AttachMode

STYLES = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim"}


def _check_ids(incomplete: str) -> list[str]:
    """Shell completion of --check: groups and check ids."""
    from mermin_cli.doctor.registry import CHECKS

    names = [*dict.fromkeys(c.group for c in CHECKS), *(c.id for c in CHECKS)]
    return [n for n in names if n.startswith(incomplete)]


def doctor(
    interface: Annotated[
        list[str] | None,
        typer.Option(
            "--interface",
            "-i",
            help="Interface name, glob or /regex/, as for capture; repeatable.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    check: Annotated[
        list[str] | None,
        typer.Option(
            "--check",
            help="Run only this check id or group (env, config, attach, capture, export), with"
            " its prerequisites; repeatable.",
            autocompletion=_check_ids,
            show_default=False,
        ),
    ] = None,
    api: Annotated[
        str | None,
        typer.Option(
            "--api",
            help="A running capture's API URL. Default: the config's internal \"server\".",
            show_default=False,
        ),
    ] = None,
    attach: Annotated[
        AttachMode,
        typer.Option("--attach", help="Hook mechanism to test, as for capture."),
    ] = AttachMode.auto,
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False,
    list_checks: Annotated[
        bool, typer.Option("--list", help="List the checks and what each looks at.")
    ] = False,
) -> None:
    """Check environment, config, attachment, a running capture and export; exit 1 on FAIL."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from mermin_cli.doctor.context import Options
    from mermin_cli.doctor.framework import Status
    from mermin_cli.doctor.registry import CHECKS, diagnose
    from mermin_cli.logs import setup_logging

    console = Console(width=None if sys.stdout.isatty() else 1000)  # pipes: whole lines
    if list_checks:
        listing = Table(box=None, header_style="bold")
        listing.add_column("ID")
        listing.add_column("CHECKS")
        for c in CHECKS:
            listing.add_row(c.id, c.doc)
        console.print(listing)
        return
    setup_logging("error")  # the report says everything; engine logs would interleave
    options = Options(
        config=config,
        interfaces=tuple(interface or ()),
        attach_mode=attach.value,
        api_url=api,
    )
    results = diagnose(options, check or ())
    order = (Status.PASS, Status.WARN, Status.FAIL, Status.SKIP)
    counts = {s.value.lower(): sum(r.status is s for r in results) for s in order}
    if as_json:
        report = {"checks": [r.to_json() for r in results], "counts": counts}
        typer.echo(json.dumps(report, indent=2))
    else:
        table = Table(header_style="bold", show_lines=True)
        for column in ("ID", "STATUS", "EVIDENCE", "FIX"):
            table.add_column(column)
        for r in results:
            status = Text(r.status.value, style=STYLES[r.status.value])
            table.add_row(r.id, status, Text(r.evidence), Text(r.fix))
        console.print(table)
        console.print(", ".join(f"{n} {name}" for name, n in counts.items()), highlight=False)
    if counts["fail"]:
        raise typer.Exit(1)
