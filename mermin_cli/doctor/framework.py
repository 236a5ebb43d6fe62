"""The check framework: checks with stable ids and prerequisites, run in order.

A check whose prerequisite failed (or was skipped for want of what it needs) is not run:
it is reported as SKIP naming that prerequisite. A check that raises is reported as FAIL,
so one broken check never hides the others.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mermin_cli.errors import UsageError

if TYPE_CHECKING:
    from mermin_cli.discovery.interfaces import Interface
    from mermin_cli.doctor.context import Context

log = logging.getLogger("mermin.doctor")

IFNAME = "<ifname>"  # placeholder in the id of a per-interface check


class Status(str, enum.Enum):
    """Outcome of a check, worst last."""

    PASS = "PASS"
    SKIP = "SKIP"
    WARN = "WARN"
    FAIL = "FAIL"

    @property
    def rank(self) -> int:
        return list(Status).index(self)


@dataclass(frozen=True)
class Outcome:
    """What a check found: the evidence seen and, unless it passed, the fix."""

    status: Status
    evidence: str
    fix: str = ""
    blocks: bool = True  # a SKIP that skips the checks needing this one too


def passed(evidence: str) -> Outcome:
    return Outcome(Status.PASS, evidence)


def warned(evidence: str, fix: str) -> Outcome:
    return Outcome(Status.WARN, evidence, fix)


def failed(evidence: str, fix: str) -> Outcome:
    return Outcome(Status.FAIL, evidence, fix)


def skipped(evidence: str, fix: str = "", *, blocks: bool = True) -> Outcome:
    return Outcome(Status.SKIP, evidence, fix, blocks)


def blocking(outcome: Outcome) -> bool:
    """Whether checks that need this outcome's check must be skipped."""
    return outcome.status is Status.FAIL or (outcome.status is Status.SKIP and outcome.blocks)


@dataclass(frozen=True)
class Result:
    """One line of the report."""

    id: str
    status: Status
    evidence: str
    fix: str

    def to_json(self) -> dict[str, str]:
        return {**dataclasses.asdict(self), "status": self.status.value}


@dataclass(frozen=True)
class Check:
    """A check with a stable id; ``run`` once, or ``each`` selected interface.

    A per-interface check has an id ending in ``.<ifname>`` and reports one result per
    interface, with the interface's name in place of ``<ifname>``.
    """

    id: str
    doc: str  # what it checks, one line
    run: Callable[[Context], Outcome] | None = None
    each: Callable[[Context, Interface], Outcome] | None = None
    requires: tuple[str, ...] = ()

    @property
    def group(self) -> str:
        return self.id.split(".", 1)[0]

    @property
    def prefix(self) -> str:
        """``attach`` for ``attach.<ifname>``."""
        return self.id.removesuffix("." + IFNAME)


Plan = list[tuple[Check, frozenset[str] | None]]  # checks with the interfaces asked for


def plan(checks: Sequence[Check], requested: Iterable[str]) -> Plan:
    """The checks that answer ``requested`` ids (all when none), with their prerequisites.

    An id selects its check, a group name (``env``) every check of the group, and
    ``attach.eth0`` the per-interface check for that interface only.
    """
    by_id = {c.id: c for c in checks}
    wanted: dict[str, frozenset[str] | None] = {}
    for request in requested:
        found = [c for c in checks if request in (c.id, c.group)]
        for check in found:
            wanted[check.id] = None
        if found:
            continue
        family = next((c for c in checks if c.each and request.startswith(c.prefix + ".")), None)
        if family is None:
            raise UsageError(
                f"Unknown check {request!r}; choose from {', '.join(by_id)} or a group"
                f" ({', '.join(dict.fromkeys(c.group for c in checks))})."
            )
        names = wanted.get(family.id, frozenset())
        if names is not None:
            wanted[family.id] = names | {request.removeprefix(family.prefix + ".")}
    if not wanted:
        wanted = dict.fromkeys(by_id)
    pending = list(wanted)
    while pending:
        for dep in by_id[pending.pop()].requires:
            if dep not in wanted or wanted[dep] is not None:
                wanted[dep] = None
                pending.append(dep)
    return [(c, wanted[c.id]) for c in checks if c.id in wanted]


def run_checks(ctx: Context, planned: Plan) -> list[Result]:
    """Run the planned checks in order; dependents of a blocking outcome are skipped."""
    outcomes: dict[str, Outcome] = {}
    causes: dict[str, str] = {}  # check not run -> the check that stopped it in the first place
    results: list[Result] = []
    for check, names in planned:
        blocker = next((d for d in check.requires if blocking(outcomes[d])), None)
        reason = None
        if blocker is not None:
            cause = causes[check.id] = causes.get(blocker, blocker)
            verb = "failed" if outcomes[cause].status is Status.FAIL else "was skipped"
            reason = skipped(f"not run: {cause} {verb}")
        if check.each is None:
            assert check.run is not None
            outcome = reason or _guarded(check.run, ctx)
            results.append(Result(check.id, outcome.status, outcome.evidence, outcome.fix))
            outcomes[check.id] = outcome
            continue
        mine = _per_interface(ctx, check, names, reason)
        results += mine
        worst = max((r.status for r in mine), key=lambda s: s.rank, default=Status.PASS)
        outcomes[check.id] = Outcome(worst, "")
    return results


def _per_interface(
    ctx: Context, check: Check, names: frozenset[str] | None, reason: Outcome | None
) -> list[Result]:
    each = check.each
    assert each is not None
    chosen = [i for i in ctx.selected if names is None or i.name in names]
    if not chosen and reason is not None:
        return [Result(check.id, reason.status, reason.evidence, reason.fix)]
    results = []
    for iface in chosen:
        outcome = reason or _guarded(lambda c, i=iface: each(c, i), ctx)
        results.append(
            Result(f"{check.prefix}.{iface.name}", outcome.status, outcome.evidence, outcome.fix)
        )
    selected = ", ".join(i.name for i in ctx.selected) or "none"
    for name in sorted((names or set()) - {i.name for i in chosen}):
        evidence = f"{name} is not among the selected interfaces ({selected})"
        results.append(
            Result(f"{check.prefix}.{name}", Status.SKIP, evidence, "select it with -i " + name)
        )
    return results


def _guarded(run: Callable[[Context], Outcome], ctx: Context) -> Outcome:
    try:
        return run(ctx)
    except Exception as exc:
        log.debug("check crashed", exc_info=True)
        return failed(
            f"the check itself failed: {type(exc).__name__}: {exc}",
            "this is a bug in mermin doctor; please report it with the output of --json",
        )
