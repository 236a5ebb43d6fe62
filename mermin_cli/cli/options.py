"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
