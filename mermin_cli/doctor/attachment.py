"""Attachment checks: the flow program loads, attaches to and detaches from each selected
interface for real, and nothing on the TC hooks runs ahead of it where it could hide traffic."""

from __future__ import annotations

import errno
import time

from pyroute2 import IPRoute

from mermin_cli.discovery.interfaces import Interface, TcProgram, hooks_summary, tc_programs
from mermin_cli.doctor.context import Context
from mermin_cli.doctor.framework import IFNAME, Check, Outcome, failed, passed, skipped, warned
from mermin_cli.engine.attach import Attacher, resolve_mode
from mermin_cli.errors import MerminError
from mermin_cli.views.source import ApiUnavailable

HOOKS = ("ingress", "egress")


def _program(ctx: Context) -> Outcome:
    from mermin_cli.engine.program import FlowProgram

    sizes = ctx.config.pipeline.flow_capture
    try:
        ctx.program = FlowProgram(sizes.flow_stats_capacity, sizes.flow_events_capacity)
    except MerminError as exc:
        cause = str(exc.__cause__ or "").strip()
        detail = cause.splitlines()[-1] if cause else str(exc)
        return failed(
            f"bpf/flow.c did not compile or load: {detail}",
            "the compiler's or verifier's message names the problem (dmesg may say more); see"
            " env.kernel_headers and env.bcc",
        )
    program = ctx.program
    return passed(
        f"bpf/flow.c compiled against {program.headers.path} and loaded in"
        f" {program.load_seconds:.2f}s (flow table of {sizes.flow_stats_capacity} entries)"
    )


def _holder(ctx: Context, iface: Interface) -> tuple[int, str] | None:
    """(pid, attach mode) of the running capture when it is attached to ``iface``."""
    try:
        status = ctx.capture()
    except ApiUnavailable:
        return None
    if any(i["index"] == iface.index for i in status["interfaces"]):
        return status["pid"], status["attach_mode"]
    return None


def _ours(programs: list[TcProgram]) -> set[int | None]:
    return {p.prog_id for p in programs if p.ours}


def _summary(programs: list[TcProgram]) -> str:
    return hooks_summary(programs).replace("\n", "; ") or "no programs"


def _attach_fix(exc: MerminError, priority: int) -> str:
    code = getattr(exc.__cause__, "code", None) or getattr(exc.__cause__, "errno", None)
    return {
        errno.EEXIST: "something holds the hook (a legacy `ingress` qdisc, or a filter of ours"
        " left by a crashed run): see attach.conflicts; use --attach tcx (Linux 6.6+), replace"
        " that qdisc by clsact, or start `mermin capture` once to remove our leftovers",
        errno.EBUSY: "another program holds the hook: see attach.conflicts and remove it, or"
        ' choose another discovery "instrument" { tc_priority }',
        errno.EINVAL: f"a filter of another protocol or kind sits at tc priority {priority}:"
        ' set discovery "instrument" { tc_priority } to a free priority, or use --attach tcx',
        errno.EPERM: "run as root (CAP_NET_ADMIN, CAP_BPF)",
        errno.ENODEV: "the interface disappeared; run doctor again",
    }.get(code or 0, "see the error; `mermin interfaces` lists the programs on the hooks")


def _attach(ctx: Context, iface: Interface) -> Outcome:
    assert ctx.program is not None
    instrument = ctx.config.discovery.instrument
    priority = instrument.tc_priority
    mode = resolve_mode(ctx.options.attach_mode)
    programs = tc_programs(iface.index)
    if mode == "tc" and any(p.ours and p.priority == priority for p in programs):
        holder = _holder(ctx, iface)
        if holder is not None and holder[1] == "tc":
            return passed(
                f"the running capture (pid {holder[0]}) holds {iface.name} with tc filters at"
                f" priority {priority}; not probed a second time"
            )
        return skipped(
            f"not probed: filters of ours already sit at tc priority {priority} on {iface.name}"
            " with no capture behind them that doctor can reach",
            "`mermin capture` removes a crashed run's filters when it starts; see attach.conflicts",
            blocks=False,
        )
    where = (
        f"tc priority {priority}" if mode == "tc" else f"TCX, {instrument.tcx_order} in the chain"
    )
    before = _ours(programs)
    attacher = Attacher(ctx.program, mode, priority, first=instrument.tcx_order == "first")
    started = time.monotonic()
    try:
        attacher.attach(iface)
        attacher.detach(iface.index)
    except MerminError as exc:
        return failed(
            f"{exc} Hooks now: {_summary(tc_programs(iface.index))}", _attach_fix(exc, priority)
        )
    finally:
        attacher.close()
    elapsed_ms = (time.monotonic() - started) * 1000
    left = _ours(tc_programs(iface.index)) - before
    if left:
        return failed(
            f"detaching left our programs {sorted(left, key=str)} on {iface.name}",
            "this is a bug in mermin; remove them with `tc filter del` and report it",
        )
    return passed(f"attached to ingress and egress ({where}) and detached in {elapsed_ms:.0f} ms")


def _ahead(
    programs: list[TcProgram], mode: str, priority: int, first: bool
) -> list[tuple[TcProgram, str]]:
    """Foreign programs that run before ours on a hook, with why; they could hide traffic."""
    found = []
    for hook in HOOKS:
        on_hook = [p for p in programs if p.hook == hook]
        foreign = [p for p in on_hook if not p.ours]
        if mode == "tc":
            for p in foreign:
                if p.mechanism == "tcx":
                    found.append((p, "TCX programs run before every tc filter"))
                elif p.priority is not None and p.priority <= priority:
                    how = "shares" if p.priority == priority else "runs before"
                    found.append((p, f"{how} mermin's tc priority {priority}"))
            continue
        ours = [p.order for p in on_hook if p.ours and p.mechanism == "tcx" and p.order]
        for p in foreign:
            if p.mechanism != "tcx" or p.order is None:
                continue
            if (ours and p.order < min(ours)) or (not ours and not first):
                found.append((p, "runs before mermin in the TCX chain"))
    return found


def _conflicts(ctx: Context) -> Outcome:
    instrument = ctx.config.discovery.instrument
    mode = resolve_mode(ctx.options.attach_mode)
    first = instrument.tcx_order == "first"
    risks: list[str] = []
    summaries: list[str] = []
    with IPRoute() as ipr:
        for iface in ctx.selected:
            programs = tc_programs(iface.index, ipr)
            summaries.append(f"{iface.name}: {_summary(programs)}")
            risks += [
                f"{iface.name} {p.hook}: {p.label} (id {p.prog_id}) {why}"
                for p, why in _ahead(programs, mode, instrument.tc_priority, first)
            ]
            holder = _holder(ctx, iface)
            risks += [
                f"{iface.name} {p.hook}: {p.label} has no capture behind it that doctor can"
                " reach: left by a crashed run? (the next `mermin capture` removes it)"
                for p in programs
                if p.ours and p.mechanism == "tc" and (holder is None or holder[1] != "tc")
            ]
            qdiscs = {q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=iface.index)}
            if mode == "tc" and "ingress" in qdiscs:
                risks.append(
                    f"{iface.name}: a legacy `ingress` qdisc holds the ingress hook, so the"
                    " clsact qdisc of --attach tc cannot be added (File exists)"
                )
    if risks:
        return warned(
            "; ".join(risks),
            "make sure those programs pass packets on (TC_ACT_UNSPEC / TCX_NEXT), or let"
            " mermin run first: move the other tc filters to a higher priority number than"
            f" mermin's ({instrument.tc_priority}), or use --attach tcx with"
            ' tcx_order = "first"; `mermin interfaces` lists every hook',
        )
    return passed("nothing runs ahead of mermin: " + " | ".join(summaries))


CHECKS = (
    Check(
        "attach.program",
        "bpf/flow.c compiles with BCC and the verifier loads it, with the config's sizes",
        _program,
        requires=(
            "env.privileges",
            "env.bpf_syscall",
            "env.kernel_headers",
            "env.bcc",
            "config.valid",
        ),
    ),
    Check(
        f"attach.{IFNAME}",
        "the program attaches to and detaches from the interface's TC hooks, for real",
        each=_attach,
        requires=("attach.program", "config.patterns"),
    ),
    Check(
        "attach.conflicts",
        "other programs on the TC hooks that run before mermin's (could hide traffic)",
        _conflicts,
        requires=("env.privileges", "config.patterns"),
    ),
)
