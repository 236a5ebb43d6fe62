"""Every check of `mermin doctor`, in the order they run, and the entry point."""

from __future__ import annotations

from collections.abc import Iterable

from mermin_cli.doctor import attachment, capture, configuration, environment, export
from mermin_cli.doctor.context import Context, Options
from mermin_cli.doctor.framework import Check, Result, plan, run_checks

CHECKS: tuple[Check, ...] = (
    *environment.CHECKS,
    *configuration.CHECKS,
    *attachment.CHECKS,
    *capture.CHECKS,
    *export.CHECKS,
)


def diagnose(options: Options, requested: Iterable[str] = ()) -> list[Result]:
    """Run the requested checks (all when none) and their prerequisites."""
    planned = plan(CHECKS, requested)
    ctx = Context(options)
    try:
        return run_checks(ctx, planned)
    finally:
        ctx.close()
