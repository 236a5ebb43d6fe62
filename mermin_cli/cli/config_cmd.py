"""`mermin config show|validate`; errors are raised as ConfigError for the main app to print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mermin_cli.config import Config, load_config
from mermin_cli.config.loader import config_source, default_config_text
from mermin_cli.config.render import render_hcl, to_dict
from mermin_cli.errors import UsageError

app = typer.Typer(help="Show and validate configuration.", no_args_is_help=True)


@app.command()
def show(
    config: Annotated[
        Path | None,
        typer.Option(
            "-c",
            "--config",
            help="Config file (.hcl, .yaml); default: $MERMIN_CONFIG_PATH, else built-in defaults.",
        ),
    ] = None,
    default: Annotated[
        bool, typer.Option("--default", help="Print the embedded default config file.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of HCL.")] = False,
) -> None:
    """Print the effective configuration (file + environment), secrets redacted."""
    if default and config is not None:
        raise UsageError("--default and --config cannot be combined; pick one")
    if default and not as_json:
        typer.echo(default_config_text(), nl=False)
        return
    effective = Config() if default else load_config(config)
    if as_json:
        typer.echo(json.dumps(to_dict(effective, redact=True), indent=2))
        return
    source = config_source(config)
    typer.echo(f"# effective configuration from {source or 'the built-in defaults'}")
    typer.echo(render_hcl(effective, redact=True), nl=False)


@app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="Config file to check (.hcl, .yaml).")],
) -> None:
    """Check a config file: print "FILE: valid", or the error with exit status 2."""
    load_config(file)
    typer.echo(f"{file}: valid")
