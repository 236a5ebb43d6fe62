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
        level=LEVELS.get(level.lower(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
    )


def set_level(level: str) -> None:
    logging.getLogger().setLevel(LEVELS.get(level.lower(), logging.INFO))
