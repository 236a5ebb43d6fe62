"""Configuration checks: the file, the interface patterns, link state and the filters."""

from __future__ import annotations

import dataclasses

from mermin_cli.config.loader import config_source, load_config
from mermin_cli.discovery.interfaces import Interface, match_interfaces, unmatched_warning
from mermin_cli.doctor.context import Context
from mermin_cli.doctor.framework import Check, Outcome, failed, passed, skipped, warned
from mermin_cli.errors import ConfigError, UsageError
from mermin_cli.pipeline.hooks import select_interfaces
from mermin_cli.views.source import ApiUnavailable

NOT_FORWARDING = ("DOWN", "LOWERLAYERDOWN", "NOTPRESENT")  # operational states


def _valid(ctx: Context) -> Outcome:
    options = ctx.options
    patterns = options.interfaces or None
    try:
        ctx.config = load_config(
            options.config, overrides={"discovery.instrument.interfaces": patterns}
        )
    except ConfigError as exc:
        return failed(
            str(exc),
            "correct that key (`mermin config show --default` documents every key), then"
            " check with `mermin config validate FILE`",
        )
    source = config_source(options.config)
    return passed(f"{source}: valid" if source else "no config file: the built-in defaults")


def _patterns(ctx: Context) -> Outcome:
    patterns = tuple(ctx.config.discovery.instrument.interfaces)
    links = ctx.links
    fix = (
        f"use names that exist here ({', '.join(i.name for i in links)}): -i PATTERN or"
        ' discovery "instrument" { interfaces = [...] } (globs eth*, /regex/)'
    )
    try:
        ctx.selected = select_interfaces(patterns, links)
    except UsageError as exc:
        return failed(str(exc), fix)
    chosen = ", ".join(i.name for i in ctx.selected)
    if not patterns:
        return passed(f"no pattern given: the default-route interface(s) {chosen}")
    matches = "; ".join(
        f"{p!r} -> {', '.join(i.name for i in match_interfaces([p], links)) or 'nothing'}"
        for p in patterns
    )
    unmatched = [w for p in patterns if (w := unmatched_warning(p, links))]
    if unmatched:
        return warned(f"{'; '.join(unmatched)} ({matches})", fix)
    return passed(matches)


def _not_forwarding(iface: Interface) -> str | None:
    """Why no packet passes ``iface``, or None when it is up."""
    if not iface.up:
        return "administratively down"
    if iface.state in NOT_FORWARDING:
        return f"up but operationally {iface.state} (no carrier, or its veth peer is down)"
    return None


def _interfaces_up(ctx: Context) -> Outcome:
    down = {i.name: why for i in ctx.selected if (why := _not_forwarding(i))}
    states = ", ".join(f"{i.name} {i.state}" for i in ctx.selected)
    if not down:
        return passed(states)
    evidence = "; ".join(f"{name} is {reason}" for name, reason in down.items())
    fix = (
        f"ip link set dev {next(iter(down))} up (and its peer, cable or lower device);"
        " mermin captures it as soon as it is up"
    )
    if len(down) == len(ctx.selected):
        return failed(f"{evidence}: no packet passes a selected interface", fix)
    return warned(f"{evidence}; the others carry traffic ({states})", fix)


def _configured_filters(ctx: Context) -> list[str]:
    """``block.field`` of every filter field the config sets."""
    found = []
    for block in dataclasses.fields(ctx.config.filter):
        values = getattr(ctx.config.filter, block.name)
        for item in dataclasses.fields(values):
            matcher = getattr(values, item.name)
            if matcher is not None and (matcher.match or matcher.not_match):
                found.append(f"{block.name}.{item.name}")
    return found


def _filters(ctx: Context) -> Outcome:
    mine = _configured_filters(ctx)
    try:
        status = ctx.capture()
    except ApiUnavailable:
        if not mine:
            return passed("no filters: every flow is recorded")
        return skipped(
            f"filters on {', '.join(mine)}; no running capture to compare them with traffic",
            'start `mermin capture` with internal "server" on, send traffic, run doctor again',
            blocks=False,
        )
    if not status["config"]["filters"]:
        return passed("the running capture has no filters: every flow is recorded")
    kernel, flows = status["kernel"], status["flows"]
    accepted = kernel.get("new_flows", 0)
    seen = accepted + kernel.get("filtered_flows", 0)
    kept = accepted - flows["filtered_userspace"]
    counts = (
        f"of {seen} flows the running capture saw, {kernel.get('filtered_flows', 0)}"
        f" ({kernel.get('filtered_packets', 0)} packets) were rejected in the kernel and"
        f" {flows['filtered_userspace']} in user space"
    )
    if seen == 0:
        return skipped(
            "the running capture has filters but saw no flow yet to compare them with",
            "send traffic through the selected interfaces and run doctor again",
            blocks=False,
        )
    if kept <= 0:
        return failed(
            f"the filters exclude everything: {counts}",
            'loosen the filter blocks (filter "source" / "destination" / "network" / "flow");'
            " remove them to confirm they are the cause",
        )
    return passed(f"{kept} flows not rejected: {counts}")


CHECKS = (
    Check("config.valid", "the config file parses and validates", _valid),
    Check(
        "config.patterns",
        "interface patterns match interfaces that exist",
        _patterns,
        requires=("config.valid",),
    ),
    Check(
        "config.interfaces_up",
        "the selected interfaces are up",
        _interfaces_up,
        requires=("config.patterns",),
    ),
    Check(
        "config.filters",
        "filters do not exclude all traffic (compared with a running capture's)",
        _filters,
        requires=("config.valid",),
    ),
)
