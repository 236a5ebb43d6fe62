"""The `mermin` command line."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mermin_cli import __version__
from mermin_cli.cli.options import ConfigOpt, InterfaceOpt
from mermin_cli.engine.hooks import AttachMode
from mermin_cli.errors import MerminError
from mermin_cli.logs import setup_logging
from mermin_cli.output.formats import OutputFormat

if TYPE_CHECKING:
    from mermin_cli.config.schema import Config
    from mermin_cli.export.sink import Sink

app = typer.Typer(
    name="mermin",
    help="Network flow inspector: eBPF flow records from TC hooks, as OpenTelemetry spans.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

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
        OutputFormat | None,
        typer.Option(
            "--format",
            "-o",
            help="Records on stdout: text (aligned lines) or json (NDJSON). "
            "Default: the config's stdout exporter if it has one, else text.",
            show_default=False,
        ),
    ] = None,
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
    read: Annotated[
        str | None,
        typer.Option(
            "--read",
            "-r",
            help="Read packets from a pcap/pcapng file (gzip too; - for stdin) instead of "
            "interfaces; times are the recording's.",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Capture flows and print a record per flow window (Ctrl-C flushes and stops)."""
    from mermin_cli.config.loader import load_config
    from mermin_cli.errors import UsageError
    from mermin_cli.output.formats import StreamWriter

    if read is not None and (interface or duration is not None):
        raise UsageError(
            "--read takes its packets from the file; leave out -i/--interface and --duration."
        )
    overrides = _overrides(
        log_level=log_level,
        **{"discovery.instrument.interfaces": tuple(interface) if interface else None},
    )
    cfg = load_config(config, overrides=overrides)
    setup_logging(cfg.log_level)
    if output_format is None and cfg.export.traces.stdout is None:
        output_format = OutputFormat.text
    writer = StreamWriter(sys.stdout, output_format.value) if output_format else None
    if read is not None:
        _read(cfg, read, writer)
        return
    from mermin_cli.engine.compiler import import_bcc, load_in_background
    from mermin_cli.engine.privileges import require_capture_privileges

    require_capture_privileges()
    import_bcc()
    flow_capture = cfg.pipeline.flow_capture
    # Compile while the pipeline's modules import (about 0.5 s of start-up saved).
    program = load_in_background(
        flow_capture.flow_stats_capacity, flow_capture.flow_events_capacity
    )
    from mermin_cli.pipeline.capture import Capture, CaptureOptions

    options = CaptureOptions(duration=duration, attach_mode=attach.value)
    reload = lambda: load_config(config, overrides=overrides)  # noqa: E731
    Capture(cfg, writer, options, reload=reload, program=program).run()


def _read(cfg: Config, path: str, writer: Sink | None) -> None:
    """`capture --read`: file errors first, then the compile, overlapped with the imports."""
    from mermin_cli.engine.compiler import import_bcc, load_in_background
    from mermin_cli.engine.privileges import require_read_privileges
    from mermin_cli.pipeline.pcapfile import CaptureFile

    capture_file = CaptureFile(path)
    try:
        require_read_privileges()
        import_bcc()
        flow_capture = cfg.pipeline.flow_capture
        program = load_in_background(
            flow_capture.flow_stats_capacity, flow_capture.flow_events_capacity, offline=True
        )
        from mermin_cli.export.otlp import output_sinks
        from mermin_cli.pipeline.offline import OfflineCapture

        # The same outputs as live capture: the --format writer and the config's exporters.
        sinks = output_sinks(cfg, writer)
    except BaseException:
        capture_file.close()
        raise
    OfflineCapture(cfg, capture_file, sinks, program).run()


@app.command()
def interfaces(
    interface: InterfaceOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False,
) -> None:
    """List interfaces that can be captured, which patterns select them and their TC programs."""
    from dataclasses import asdict

    from pyroute2 import IPRoute
    from rich.console import Console
    from rich.table import Table

    from mermin_cli.config.loader import load_config
    from mermin_cli.discovery.interfaces import (
        TcProgram,
        compile_pattern,
        hooks_summary,
        list_interfaces,
        tc_programs,
        unmatched_warning,
    )

    cfg = load_config(
        config,
        overrides=_overrides(
            **{"discovery.instrument.interfaces": tuple(interface) if interface else None}
        ),
    )
    patterns = tuple(cfg.discovery.instrument.interfaces)
    matchers = [(p, compile_pattern(p)) for p in patterns]
    with IPRoute() as ipr:
        links = list_interfaces(ipr)
        try:
            hooks: dict[int, list[TcProgram]] | None = {
                i.index: tc_programs(i.index, ipr) for i in links
            }
        except PermissionError:
            hooks = None
            typer.echo(
                "mermin: warning: listing the programs on TC hooks needs root "
                "(CAP_SYS_ADMIN, CAP_NET_ADMIN); run it as root to see them.",
                err=True,
            )
    for pattern in patterns:
        warning = unmatched_warning(pattern, links)
        if warning:
            typer.echo(f"mermin: warning: {warning}.", err=True)
    matched = {i.index: [p for p, m in matchers if m(i.name)] for i in links}
    if as_json:
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
                "peer": None
                if i.peer_index is None
                else {"ifindex": i.peer_index, "netns_id": i.peer_netnsid},
                "master": i.master,
                "matched_by": matched[i.index],
                "tc_programs": None if hooks is None else [asdict(t) for t in hooks[i.index]],
            }
            for i in links
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None, header_style="bold")
    columns = ("INDEX", "NAME", "KIND", "STATE", "MTU", "MAC", "ADDRESSES", "PEER", "MATCHED BY")
    for col in (*columns, "TC HOOKS"):
        table.add_column(col)
    for i in links:
        table.add_row(
            str(i.index),
            i.name,
            i.kind + (f"\nmaster {i.master}" if i.master else ""),
            i.state,
            str(i.mtu),
            i.mac,
            "\n".join(i.addresses),
            i.peer_label,
            ", ".join(matched[i.index]),
            "(needs root)" if hooks is None else hooks_summary(hooks[i.index]),
        )
    Console(width=None if sys.stdout.isatty() else 1000).print(table)  # pipes: whole lines


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"mermin {__version__}")


def _register_subapps() -> None:
    from mermin_cli.cli import config_cmd, doctor_cmd, export_cmd, flows_cmd

    app.add_typer(config_cmd.app, name="config")
    app.command()(export_cmd.export)
    app.command("flows")(flows_cmd.flows)
    app.command("doctor")(doctor_cmd.doctor)


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
