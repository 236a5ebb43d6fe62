"""Logging to stderr with the config's level names."""

from __future__ import annotations

import logging
import sys

LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


def setup_logging(level: str) -> None:
    """Log lines on stderr; stdout stays for records."""
    logging.basicConfig(
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
    )
    set_level(level)


def set_level(level: str) -> None:
    """`debug` is mermin's own detail; `trace` adds the libraries' (pyroute2's netlink
    messages, gRPC, ...), which would otherwise bury it."""
    name = level.lower()
    mine = LEVELS.get(name, logging.INFO)
    logging.getLogger("mermin").setLevel(mine)
    logging.getLogger().setLevel(mine if name == "trace" else max(mine, logging.INFO))
