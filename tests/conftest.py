"""Shared test setup: CI strictness, root/eBPF gates and network-namespace fixtures.

* With ``CI=true`` a skipped test is reported as a failure (eBPF tests must run in CI),
  and a module skipped at collection fails the session.
* Tests marked ``@pytest.mark.bpf`` (or using the ``require_bpf`` fixture) skip outside CI
  when not root or when the bcc module is unavailable.
* ``link`` / ``l3_link`` / ``link_factory`` give isolated namespace topologies that are
  always removed; stale namespaces of dead test runs are removed at session start and end,
  and the session fails loudly if one of its own namespaces is left behind.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

try:  # tests/ as a package, or (default) as a plain directory on sys.path
    from . import netns  # type: ignore[import-not-found]
except ImportError:
    import netns  # type: ignore[no-redef]

IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")

_collect_skips: list[str] = []
_leftovers: list[str] = []


def require_root() -> None:
    """Skip the calling test unless running as root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (run `sudo make test`)")


@functools.cache
def bpf_unavailable_reason() -> str | None:
    """Why eBPF cannot be used here, or None when it can (root and ``import bcc`` works)."""
    if os.geteuid() != 0:
        return "needs root to load eBPF programs (run `sudo make test`)"
    try:
        import bcc  # noqa: F401
    except Exception as exc:
        return (
            f"the bcc module cannot be imported ({type(exc).__name__}: {exc}); "
            "run `sudo make setup` to install python3-bpfcc and link it into .venv"
        )
    return None


def require_bpf() -> None:
    """Skip the calling test unless eBPF is usable (root and the bcc module)."""
    reason = bpf_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(name="require_bpf")
def _require_bpf_fixture() -> None:
    """Fixture form of :func:`require_bpf`."""
    require_bpf()


@pytest.fixture(name="require_root")
def _require_root_fixture() -> None:
    """Fixture form of :func:`require_root`."""
    require_root()


# The Community ID spec's testdata (Corelight, BSD licence: see its COPYING), kept with the
# tests so a clone runs them wherever it lies.
COMMUNITY_ID_DATA = Path(__file__).resolve().parent / "data" / "community-id"


@pytest.fixture(name="community_id_data", scope="session")
def _community_id_data() -> Path:
    """The Community ID spec's testdata (``$MERMIN_TESTDATA`` wins); missing data fails."""
    env = os.environ.get("MERMIN_TESTDATA")
    path = Path(env) if env else COMMUNITY_ID_DATA
    if not path.is_dir():
        source = "MERMIN_TESTDATA" if env else "default location"
        pytest.fail(f"Community ID testdata not found at {path} ({source})")
    return path


def _tag(request: pytest.FixtureRequest) -> str:
    return re.sub(r"^test_?", "", request.node.name) or "t"


@pytest.fixture
def link(request: pytest.FixtureRequest) -> Iterator[netns.Link]:
    """A fresh veth link between two namespaces, destroyed whatever the test does."""
    require_root()
    with netns.temp_link(_tag(request)) as lk:
        yield lk


@pytest.fixture
def l3_link(request: pytest.FixtureRequest) -> Iterator[netns.Link]:
    """Like ``link`` but joined by L3 (TUN) devices without a link-layer header."""
    require_root()
    with netns.temp_link(_tag(request), l3=True) as lk:
        yield lk


@pytest.fixture
def link_factory(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., netns.Link]]:
    """Make any number of links (``factory(tag=None, l3=False)``); all are destroyed."""
    require_root()
    made: list[netns.Link] = []

    def factory(tag: str | None = None, *, l3: bool = False) -> netns.Link:
        lk = netns.make_link(tag or _tag(request), l3=l3)
        made.append(lk)
        return lk

    try:
        yield factory
    finally:
        errors = []
        for lk in reversed(made):
            try:
                netns.destroy(lk)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


# --- hooks -------------------------------------------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove namespaces left by test runs that died."""
    netns.cleanup_stale()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Gate ``@pytest.mark.bpf`` tests on root and bcc."""
    if item.get_closest_marker("bpf") is not None:
        require_bpf()


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI=true, report a skipped test as failed, keeping the skip reason."""
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.mermin_ci_skip = True  # type: ignore[attr-defined]
        report.longrepr = f"skipped with CI=true, which is not allowed here: {_skip_reason(report)}"
    return report


def pytest_report_teststatus(
    report: pytest.TestReport | pytest.CollectReport,
) -> tuple[str, str, str] | None:
    """Show a CI-forbidden skip as FAILED even when it happened during setup."""
    if getattr(report, "mermin_ci_skip", False):
        return "failed", "F", "FAILED"
    return None


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """Under CI=true, remember modules skipped at collection so the session fails."""
    if IN_CI and report.skipped:
        _collect_skips.append(f"{report.nodeid}: {_skip_reason(report)}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After every fixture is torn down: fail on leftover namespaces and CI skips."""
    found = netns.our_namespaces()
    _leftovers.extend(found)
    for ns in found:
        try:
            netns.remove_namespace(ns)
        except Exception as exc:
            _leftovers.append(f"(could not remove {ns}: {exc})")
    netns.cleanup_stale()
    if (_leftovers or _collect_skips) and session.exitstatus in (
        pytest.ExitCode.OK,
        pytest.ExitCode.NO_TESTS_COLLECTED,
    ):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly what made the session fail outside any single test."""
    if _leftovers:
        terminalreporter.section("LEFTOVER NETWORK NAMESPACES", sep="!", red=True, bold=True)
        terminalreporter.write_line(
            "this test run left namespaces behind (removed now; a test or fixture "
            "did not destroy its link): " + ", ".join(_leftovers),
            red=True,
        )
    if _collect_skips:
        terminalreporter.section("SKIPPED AT COLLECTION WITH CI=true", sep="!", red=True)
        for line in _collect_skips:
            terminalreporter.write_line(line, red=True)
