"""`mermin flows`: the active flows of a capture, live (full screen), as plain text or NDJSON.

`--not` negates the next filter flag, as in `hubble observe`. Click collects the values of
each option but forgets how flags of different options interleave, so `negations()`
re-reads the command line (a small pre-parser) to tell which occurrences follow a `--not`.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from typing import Annotated

import typer

from mermin_cli.cli.options import ConfigOpt
from mermin_cli.errors import UsageError
from mermin_cli.views.snapshot import FilterFlag, SortKey

# Filter flag -> filter kind, and every option that takes a value (the pre-parser skips it).
FILTER_FLAGS = {
    "--ip": "ip",
    "--port": "port",
    "--protocol": "protocol",
    "--interface": "interface",
    "-i": "interface",
}
VALUE_FLAGS = frozenset(
    {*FILTER_FLAGS, "-c", "--config", "--api", "--sort", "-n", "--top", "--interval"}
)


def _option(arg: str) -> tuple[str, bool]:
    """The option an argument names, and whether it carries its value (`--ip=X`, `-iX`)."""
    if arg.startswith("--"):
        name, eq, _ = arg.partition("=")
        return name, bool(eq)
    if arg.startswith("-") and len(arg) > 2:
        return arg[:2], True
    return arg, False


def negations(args: Sequence[str]) -> dict[str, list[bool]]:
    """For each filter kind, whether each of its flags (in command-line order) follows a
    `--not`. A `--not` that no filter flag follows is a UsageError."""
    found: dict[str, list[bool]] = {kind: [] for kind in FILTER_FLAGS.values()}
    pending = False
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            break
        name, attached = _option(arg)
        if name == "--not":
            pending = True
        elif name in FILTER_FLAGS:
            found[FILTER_FLAGS[name]].append(pending)
            pending = False
        if name in VALUE_FLAGS and not attached:
            next(rest, None)
    if pending:
        raise UsageError(
            "--not must come before a filter flag (--ip, --port, --protocol, -i/--interface)."
        )
    return found


def _filter_flags(given: dict[str, list[str]], args: Sequence[str]) -> list[FilterFlag]:
    negated = negations(args)
    flags = []
    for kind, values in given.items():
        if len(values) != len(negated[kind]):  # only if the command line was not sys.argv
            raise UsageError(f"Cannot tell which --{kind} flags a --not applies to.")
        flags += [FilterFlag(kind, v, n) for v, n in zip(values, negated[kind], strict=True)]
    return flags


def _command_line() -> list[str]:
    """The arguments after the `flows` sub-command."""
    args = sys.argv[1:]
    return args[args.index("flows") + 1 :] if "flows" in args else args


def flows(
    config: ConfigOpt = None,
    interface: Annotated[
        list[str] | None,
        typer.Option(
            "--interface",
            "-i",
            metavar="PATTERN",
            help="Flows on interfaces matching this name, glob or /regex/; repeatable. Without "
            "a running capture, also what our own engine attaches to.",
            show_default=False,
        ),
    ] = None,
    ip: Annotated[
        list[str] | None,
        typer.Option(
            metavar="CIDR",
            help="Flows from or to this address or CIDR; repeatable.",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PORT",
            help="Flows from or to this port or range (8000-8099); repeatable.",
            show_default=False,
        ),
    ] = None,
    protocol: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PROTO",
            help="Flows of this transport (tcp, udp, icmp, ...) or IP version (ipv4, ipv6); "
            "repeatable.",
            show_default=False,
        ),
    ] = None,
    negate: Annotated[
        bool,
        typer.Option(
            "--not",
            help="Negate the next filter flag: --not --port 22 hides SSH.",
            show_default=False,
        ),
    ] = False,
    api: Annotated[
        str | None,
        typer.Option(
            "--api",
            metavar="URL",
            help="URL of the capture's API. Default: the config's internal \"server\", "
            "http://127.0.0.1:8080.",
            show_default=False,
        ),
    ] = None,
    sort: Annotated[
        SortKey, typer.Option("--sort", help="Order, biggest first (both directions summed).")
    ] = SortKey.bytes,
    top: Annotated[
        int | None,
        typer.Option(
            "--top",
            "-n",
            min=1,
            metavar="N",
            help="Show the first N flows only.",
            show_default=False,
        ),
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, metavar="S", help="Seconds between refreshes.")
    ] = 1.0,
    stdout: Annotated[
        bool,
        typer.Option("--stdout", help="Plain aligned text, no colors (pipes, watch)."),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON snapshot (NDJSON line) per refresh.")
    ] = False,
    once: Annotated[bool, typer.Option("--once", help="One snapshot, then exit.")] = False,
) -> None:
    """Show the active flows of a running capture, live.

    With no capture running, as root, it runs an engine of its own."""
    from mermin_cli.config.loader import load_config
    from mermin_cli.logs import setup_logging
    from mermin_cli.views import live, render, source
    from mermin_cli.views.snapshot import FlowMatch, Snapshot

    del negate  # read in order from the command line by negations()
    if stdout and as_json:
        raise UsageError("--stdout and --json exclude each other; pick one.")
    given = {"ip": ip, "port": port, "protocol": protocol, "interface": interface}
    flags = _filter_flags({k: v or [] for k, v in given.items()}, _command_line())
    match = FlowMatch.from_flags(flags)
    selection = tuple(f.value for f in flags if f.kind == "interface" and not f.negated)
    cfg = load_config(
        config,
        overrides={
            "discovery.instrument.interfaces": selection or None,
            "pipeline.flow_producer.flow_store_poll_interval": interval,
        },
    )
    setup_logging(cfg.log_level)
    full_screen = not (as_json or stdout or once) and sys.stdout.isatty()
    retry = shlex.join(["sudo", "mermin", "flows", *_command_line()])
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # ends like Ctrl-C
    try:
        with source.connect(cfg, api, retry) as client:

            def fetch(order: SortKey) -> Snapshot:
                status = client.status()
                answer = client.flows(max(1, status["table"]["capacity"]))
                return Snapshot.build(client.label, status, answer, match, order, top)

            if full_screen:
                live.run(fetch, sort, interval)
                return
            while True:
                snap = fetch(sort)
                if as_json:
                    sys.stdout.write(json.dumps(snap.to_json(), separators=(",", ":")) + "\n")
                else:  # snapshots apart by a blank line
                    sys.stdout.write(render.plain(snap) + ("" if once else "\n"))
                sys.stdout.flush()
                if once:
                    return
                time.sleep(interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C (or SIGTERM) is how a live view ends
    except BrokenPipeError:  # the reader went away (`| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
