"""Tests of the namespace topology helper (tests/netns.py) and its fixtures."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

try:
    from . import netns  # type: ignore[import-not-found]
except ImportError:
    import netns  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("require_root")


def _received(ping_output: str) -> int:
    m = re.search(r"(\d+) (?:packets )?received", ping_output)
    assert m, ping_output
    return int(m.group(1))


def _ping(src: netns.Host, dst: str, count: int = 3) -> int:
    out = src.run("ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", dst, check=False)
    return _received(out.stdout)


def test_ping_ipv4_and_ipv6(link: netns.Link) -> None:
    assert _ping(link.a, link.b.ip4) == 3
    assert _ping(link.a, link.b.ip6) == 3
    assert _ping(link.b, link.a.ip6) == 3


def test_link_shape_and_host_isolation(link: netns.Link) -> None:
    pid = os.getpid()
    for host in (link.a, link.b):
        assert host.ns.startswith(f"mtest-{pid}-")
        assert ipaddress.ip_address(host.ip4) in ipaddress.ip_network("10.203.0.0/16")
        assert ipaddress.ip_address(host.ip6) in ipaddress.ip_network("fd00:203::/48")
        assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", host.mac)
        assert host.ifindex > 0
        seen = host.exec_python("import os; print(' '.join(sorted(os.listdir('/sys/class/net'))))")
        assert seen.split() == sorted(["lo", host.ifname])
    # Nothing of the link is visible in the host namespace.
    with IPRoute() as ipr:
        host_macs = {lk.get("IFLA_ADDRESS") for lk in ipr.get_links()}
    assert link.a.mac not in host_macs
    assert link.b.mac not in host_macs


def test_popen_tcp_between_ends(link: netns.Link) -> None:
    server = link.b.popen(
        netns.venv_python(),
        "-c",
        "import socket\n"
        f"s = socket.create_server(('{link.b.ip4}', 5201))\n"
        "print('listening', flush=True)\n"
        "c, _ = s.accept()\n"
        "print(c.recv(100).decode(), flush=True)\n",
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        link.a.exec_python(
            f"import socket; socket.create_connection(('{link.b.ip4}', 5201)).sendall(b'hi')"
        )
        assert server.stdout.readline().strip() == "hi"
        assert server.wait(timeout=10) == 0
    finally:
        server.kill()
        server.wait()


def test_several_links_are_distinct_and_isolated(
    link_factory: Callable[..., netns.Link],
) -> None:
    one, two = link_factory("one"), link_factory("two")
    assert len({*one.namespaces, *two.namespaces}) == 4
    assert one.a.ip4.rsplit(".", 1)[0] != two.a.ip4.rsplit(".", 1)[0]
    assert _ping(one.a, one.b.ip4, count=1) == 1
    assert _ping(two.b, two.a.ip6, count=1) == 1
    # No path from one link to the other.
    unreachable = one.a.run("ping", "-n", "-c", "1", "-W", "1", two.b.ip4, check=False)
    assert unreachable.returncode != 0


def test_l3_link_pings_without_link_layer(l3_link: netns.Link) -> None:
    assert l3_link.a.mac == "" and l3_link.b.mac == ""
    assert _ping(l3_link.a, l3_link.b.ip4) == 3
    assert _ping(l3_link.b, l3_link.a.ip6) == 3


def test_destroy_removes_namespaces() -> None:
    lk = netns.make_link("destroy")
    try:
        assert set(lk.namespaces) <= set(netns.list_namespaces())
    finally:
        netns.destroy(lk)
    assert not set(lk.namespaces) & set(netns.list_namespaces())
    netns.destroy(lk)  # idempotent


def test_exception_in_body_still_cleans_up() -> None:
    seen: list[str] = []
    procs: list[subprocess.Popen[str]] = []

    def body() -> None:
        with netns.temp_link("boom") as lk:
            seen.extend(lk.namespaces)
            # forgotten; must not pin the netns
            proc = lk.b.popen("sh", "-c", "echo up; exec sleep 600", stdout=subprocess.PIPE)
            procs.append(proc)
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "up"  # inside the namespace now
            raise RuntimeError("boom")

    try:
        with pytest.raises(RuntimeError, match="boom"):
            body()
    finally:
        assert len(seen) == 2
        assert not set(seen) & set(netns.list_namespaces())
        for proc in procs:
            assert proc.wait(timeout=5) != 0  # killed by destroy


@pytest.mark.parametrize(
    ("raise_stmt", "status"),
    [("raise RuntimeError('boom')", 1), ("raise KeyboardInterrupt", 2)],
    ids=["exception", "keyboard-interrupt"],
)
def test_fixture_cleans_up_failing_and_interrupted_tests(
    tmp_path: Path, raise_stmt: str, status: int
) -> None:
    """Run a failing test in a child pytest that uses the real ``link`` fixture."""
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(HERE / "netns.py", tmp_path / "netns.py")
    out = tmp_path / "namespaces.txt"
    (tmp_path / "test_inner.py").write_text(
        "from pathlib import Path\n"
        "def test_inner(link):\n"
        f"    Path({str(out)!r}).write_text(' '.join(link.namespaces))\n"
        f"    {raise_stmt}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CI": ""},
    )
    assert proc.returncode == status, proc.stdout + proc.stderr
    names = out.read_text().split()
    assert len(names) == 2
    assert not set(names) & set(netns.list_namespaces())
    assert "LEFTOVER" not in proc.stdout


def test_cleanup_stale_removes_dead_runs_only(link: netns.Link) -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    stale = f"mtest-{child.pid}-stale"
    assert not netns._pid_alive(child.pid)
    pr_netns.create(stale)
    try:
        netns.cleanup_stale()
        names = netns.list_namespaces()
        assert stale not in names
        assert set(link.namespaces) <= set(names)  # live runs are left alone
    finally:
        if stale in netns.list_namespaces():
            pr_netns.remove(stale)
