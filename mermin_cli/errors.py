"""Errors that end a command with one clear sentence and a defined exit status."""

from __future__ import annotations


class MerminError(Exception):
    """A runtime failure: the message says what went wrong and what to do (exit 1)."""

    exit_code = 1


class UsageError(MerminError):
    """Bad flags or bad configuration (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """The configuration is invalid; the message names the key, the value and what was expected."""
