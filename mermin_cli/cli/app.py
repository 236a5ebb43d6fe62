"""The `mermin` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mermin_cli import __version__
from mermin_cli.engine.attach import AttachMode
from mermin_cli.errors import MerminError
from mermin_cli.logs import setup_logging
from mermin_cli.output.formats import OutputFormat

app = typer.Typer(
    name="mermin",
    help="Network flow inspector: eBPF flow records from TC hooks, as OpenTelemetry spans.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="HCL config file (env MERMIN_CONFIG_PATH).", show_default=False
    ),
]
InterfaceOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--interface",
        "-i",
        help="Interface name, glob (eth*, veth?) or /regex/; repeatable. "
        "Default: the config's list, else the default-route interface(s).",
        show_default=False,
    ),
]
LogLevelOpt = Annotated[
    str | None,
    typer.Option(
        "--log-level", "-l", help="trace, debug, info, warn or error (env MERMIN_LOG_LEVEL)."
    ),
]


def _overrides(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@app.command()
def capture(
    interface: InterfaceOpt = None,
    config: ConfigOpt = None,
    output_format: Annotated[
        OutputFormat,
        typer.Option(
            "--format", "-o", help="Records on stdout: text (aligned lines) or json (NDJSON)."
        ),
    ] = OutputFormat.text,
    duration: Annotated[
        float | None,
        typer.Option("--duration", help="Stop after this many seconds.", min=0.0),
    ] = None,
    attach: Annotated[
        AttachMode,
        typer.Option(
            "--attach",
            help="Hook mechanism: TCX links (kernel >= 6.6), tc clsact filters, or auto.",
        ),
    ] = AttachMode.auto,
    log_level: LogLevelOpt = None,
) -> None:
    """Capture flows and print a record per flow window (Ctrl-C flushes and stops)."""
    from mermin_cli.config.loader import load_config
    from mermin_cli.output.formats import StreamWriter
    from mermin_cli.pipeline.capture import Capture, CaptureOptions

    overrides = _overrides(
        log_level=log_level,
        **{"discovery.instrument.interfaces": tuple(interface) if interface else None},
    )
    cfg = load_config(config, overrides=overrides)
    setup_logging(cfg.log_level)
    writer = StreamWriter(sys.stdout, output_format.value)
    options = CaptureOptions(duration=duration, attach_mode=attach.value)
    Capture(cfg, writer, options, reload=lambda: load_config(config, overrides=overrides)).run()


@app.command()
def interfaces(
    interface: InterfaceOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False,
) -> None:
    """List interfaces that can be captured and which patterns select them."""
    from rich.console import Console
    from rich.table import Table

    from mermin_cli.config.loader import load_config
    from mermin_cli.discovery.interfaces import compile_pattern, list_interfaces

    cfg = load_config(
        config,
        overrides=_overrides(
            **{"discovery.instrument.interfaces": tuple(interface) if interface else None}
        ),
    )
    patterns = tuple(cfg.discovery.instrument.interfaces)
    matchers = [(p, compile_pattern(p)) for p in patterns]
    rows = [
        {
            "index": i.index,
            "name": i.name,
            "kind": i.kind,
            "state": i.state,
            "mtu": i.mtu,
            "mac": i.mac,
            "l3": i.l3,
            "addresses": list(i.addresses),
            "matched_by": [p for p, m in matchers if m(i.name)],
        }
        for i in list_interfaces()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for col in ("INDEX", "NAME", "KIND", "STATE", "MTU", "MAC", "ADDRESSES", "MATCHED BY"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["index"]),
            r["name"],
            r["kind"],
            r["state"],
            str(r["mtu"]),
            r["mac"],
            "\n".join(r["addresses"]),
            ", ".join(r["matched_by"]),
        )
    Console().print(table)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"mermin {__version__}")


def _register_subapps() -> None:
    from mermin_cli.cli import config_cmd

    app.add_typer(config_cmd.app, name="config")


_register_subapps()


def main() -> None:
    """Console entry point: errors become one sentence on stderr and an exit status."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        app()
    except MerminError as exc:
        if debug:
            raise
        typer.echo(f"mermin: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
