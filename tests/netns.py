"""Isolated test topologies in network namespaces, safe by construction.

Every namespace this module creates is named ``mtest-<pid>-<n>-<tag>-{a,b}`` (``<pid>`` is
the creating process). Both ends of a link live inside those namespaces from the moment
they exist: the veth pair is created inside namespace *a* with its peer placed directly in
namespace *b*, so no interface ever appears in the host namespace. Addresses come from
10.203.0.0/16 and fd00:203::/48 and are configured inside the namespaces only.

``l3=True`` joins the namespaces with two TUN devices (no link-layer header) relayed by a
small helper process instead of a veth pair; it needs ``/dev/net/tun``.

Netlink work uses pyroute2; ``ip netns exec`` is used only to run programs inside a
namespace and ``sysctl`` to quiet IPv6 (things pyroute2 does not do).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

NETNS_DIR = "/run/netns"
PREFIX = "mtest-"
_STALE_RE = re.compile(r"^mtest-(\d+)-")
_IFF_UP = 0x1
_IFF_RUNNING = 0x40
_IFA_F_NODAD = 0x02
_IFA_F_TENTATIVE = 0x40
_IFA_F_DADFAILED = 0x08
_READY_TIMEOUT = 10.0

_counter = itertools.count(1)
_live: set[str] = set()  # namespaces created by this process and not yet removed
_owner_pid = os.getpid()

# IPv6 sysctls applied in each new namespace before its interfaces exist: no DAD (addresses
# usable at once) and no router solicitations (no stray packets on the link).
_NS_SYSCTLS = (
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.router_solicitations=0",
    "net.ipv6.conf.default.router_solicitations=0",
)


def venv_python() -> str:
    """The project's ``.venv`` interpreter if present, else the running interpreter."""
    candidate = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


@dataclass
class Host:
    """One end of a link: an interface inside its own network namespace."""

    ns: str
    ifname: str
    ifindex: int
    ip4: str
    ip6: str
    mac: str  # "" for an L3 (TUN) device
    prefix4: int = 24
    prefix6: int = 64

    def _argv(self, argv: tuple[str, ...]) -> list[str]:
        if not argv:
            raise ValueError("no command given")
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (``check``, captured text output by default)."""
        kw.setdefault("check", True)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self._argv(argv), **kw)

    def popen(self, *argv: str, **kw: Any) -> subprocess.Popen[str]:
        """Start a command inside the namespace; the caller owns and must stop it."""
        kw.setdefault("text", True)
        return subprocess.Popen(self._argv(argv), **kw)

    def exec_python(self, code: str, timeout: float = 30) -> str:
        """Run ``code`` with the project's Python inside the namespace; return its stdout."""
        return self.run(venv_python(), "-c", code, timeout=timeout).stdout


@dataclass
class Link:
    """Two namespaces joined by a veth pair (or, with ``l3``, by relayed TUN devices)."""

    a: Host
    b: Host
    l3: bool = False
    _relay: subprocess.Popen[str] | None = field(default=None, repr=False, compare=False)

    @property
    def namespaces(self) -> tuple[str, str]:
        """The names of both namespaces."""
        return (self.a.ns, self.b.ns)


def is_root() -> bool:
    """Whether this process may create namespaces."""
    return os.geteuid() == 0


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    return sorted(pr_netns.listnetns(NETNS_DIR))


def our_namespaces(pid: int | None = None) -> list[str]:
    """Namespaces named after ``pid`` (default: this process)."""
    prefix = f"{PREFIX}{os.getpid() if pid is None else pid}-"
    return [n for n in list_namespaces() if n.startswith(prefix)]


def _sanitize(tag: str) -> str:
    return (re.sub(r"[^A-Za-z0-9_.]+", "_", tag).strip("_.") or "link")[:24]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids_in(ns: str) -> list[int]:
    """PIDs of processes whose network namespace is ``ns``."""
    try:
        st = os.stat(f"{NETNS_DIR}/{ns}")
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            pst = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return pids


def remove_namespace(ns: str) -> None:
    """Kill what still runs inside ``ns`` (only processes in that namespace) and remove it."""
    if not ns.startswith(PREFIX):  # never touch anything that is not ours
        raise ValueError(f"refusing to remove namespace {ns!r}: not a test namespace")
    pids = _pids_in(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while pids and time.monotonic() < deadline:
        pids = _pids_in(ns)
        if pids:
            time.sleep(0.02)
    try:
        pr_netns.remove(ns)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
    _live.discard(ns)


def _create_ns(ns: str) -> None:
    if not ns.startswith(f"{PREFIX}{os.getpid()}-"):
        raise ValueError(f"refusing to create namespace {ns!r}: wrong prefix")
    _live.add(ns)  # register first so a half-made namespace is still cleaned up
    pr_netns.create(ns)
    subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *_NS_SYSCTLS],
        check=True,
        capture_output=True,
        text=True,
    )


def _configure(ipr: IPRoute, host: Host) -> None:
    """Bring lo and the interface up and add the host's addresses."""
    lo = ipr.link_lookup(ifname="lo")[0]
    ipr.link("set", index=lo, state="up")
    idx = ipr.link_lookup(ifname=host.ifname)[0]
    ipr.addr("add", index=idx, address=host.ip4, prefixlen=host.prefix4)
    ipr.addr("add", index=idx, address=host.ip6, prefixlen=host.prefix6, flags=_IFA_F_NODAD)
    ipr.link("set", index=idx, state="up")


def _is_ready(ipr: IPRoute, host: Host) -> bool:
    """Interface up with carrier, and no IPv6 address still tentative."""
    links = ipr.get_links(host.ifindex)
    if not links:
        return False
    flags = links[0]["flags"]
    if not (flags & _IFF_UP and flags & _IFF_RUNNING):
        return False
    have6 = False
    for addr in ipr.get_addr(index=host.ifindex, family=10):
        aflags = addr.get("IFA_FLAGS") or addr["flags"]
        if aflags & _IFA_F_DADFAILED:
            raise RuntimeError(f"IPv6 DAD failed on {host.ns}/{host.ifname}")
        if aflags & _IFA_F_TENTATIVE:
            return False
        have6 = have6 or addr.get("IFA_ADDRESS") == host.ip6
    return have6


def _wait_ready(hosts: list[Host]) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    pending = list(hosts)
    while pending:
        still = []
        for host in pending:
            with IPRoute(netns=host.ns, flags=0) as ipr:
                if not _is_ready(ipr, host):
                    still.append(host)
        pending = still
        if pending:
            if time.monotonic() > deadline:
                names = ", ".join(f"{h.ns}/{h.ifname}" for h in pending)
                raise TimeoutError(f"link not ready after {_READY_TIMEOUT:.0f}s: {names}")
            time.sleep(0.02)


def _hosts(n: int, ns_a: str, ns_b: str, ifa: str, ifb: str, l3: bool) -> tuple[Host, Host]:
    sub = (n - 1) % 254 + 1
    macs = ("", "") if l3 else (f"02:cb:00:{sub:02x}:00:01", f"02:cb:00:{sub:02x}:00:02")
    a = Host(ns_a, ifa, 0, f"10.203.{sub}.1", f"fd00:203:0:{sub:x}::1", macs[0])
    b = Host(ns_b, ifb, 0, f"10.203.{sub}.2", f"fd00:203:0:{sub:x}::2", macs[1])
    return a, b


def _make_veth(a: Host, b: Host) -> None:
    fd_b = os.open(f"{NETNS_DIR}/{b.ns}", os.O_RDONLY)
    try:
        with IPRoute(netns=a.ns, flags=0) as ipr:
            # The peer is born in namespace b: no end ever exists in the host namespace.
            ipr.link(
                "add",
                ifname=a.ifname,
                kind="veth",
                address=a.mac,
                peer={"ifname": b.ifname, "address": b.mac, "net_ns_fd": fd_b},
            )
    finally:
        os.close(fd_b)


# Relay between two TUN devices, one per namespace. It setns()es itself into namespace a,
# opens the TUN there, then into b; it never creates anything in the host namespace and
# exits when its parent process goes away.
_RELAY = r"""
import ctypes, fcntl, os, select, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
ns_a, ns_b, ifname, parent = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def tun_in(ns):
    fd = os.open("/run/netns/" + ns, os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns failed", ns)
    os.close(fd)
    t = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(t, 0x400454CA, struct.pack("16sH", ifname.encode(), 0x0001 | 0x1000))
    return t
ta = tun_in(ns_a)
tb = tun_in(ns_b)
print("ready", flush=True)
peer = {ta: tb, tb: ta}
while os.getppid() == parent:
    for fd in select.select([ta, tb], [], [], 1.0)[0]:
        try:
            os.write(peer[fd], os.read(fd, 65536))
        except OSError:
            pass
"""


def _make_tun(a: Host, b: Host) -> subprocess.Popen[str]:
    relay = subprocess.Popen(
        [sys.executable, "-c", _RELAY, a.ns, b.ns, a.ifname, str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert relay.stdout is not None
    ready, _, _ = select.select([relay.stdout], [], [], _READY_TIMEOUT)
    line = relay.stdout.readline() if ready else ""
    if line.strip() != "ready":
        relay.kill()
        _, err = relay.communicate()
        raise RuntimeError(f"TUN relay failed to start: {err.strip() or 'timeout'}")
    return relay


def make_link(tag: str, *, l3: bool = False) -> Link:
    """Create two namespaces joined by a veth pair (or relayed TUN devices when ``l3``).

    Both ends get an IPv4 /24 and an IPv6 /64 (nodad) address from a subnet unique to
    this link, both ends and ``lo`` are up, and the call returns only once the addresses
    are usable. Raises PermissionError when not root.
    """
    if not is_root():
        raise PermissionError("creating network namespaces needs root (run with sudo)")
    n = next(_counter)
    base = f"{PREFIX}{os.getpid()}-{n}-{_sanitize(tag)}"
    ifnames = ("tun0", "tun0") if l3 else ("veth0", "veth1")
    a, b = _hosts(n, f"{base}-a", f"{base}-b", *ifnames, l3=l3)
    link = Link(a, b, l3=l3)
    try:
        _create_ns(a.ns)
        _create_ns(b.ns)
        if l3:
            link._relay = _make_tun(a, b)
        else:
            _make_veth(a, b)
        for host in (a, b):
            with IPRoute(netns=host.ns, flags=0) as ipr:
                _configure(ipr, host)
                host.ifindex = ipr.link_lookup(ifname=host.ifname)[0]
                if not l3:
                    host.mac = ipr.get_links(host.ifindex)[0].get("IFLA_ADDRESS")
        _wait_ready([a, b])
    except BaseException:
        destroy(link)
        raise
    return link


def destroy(link: Link) -> None:
    """Stop the link's processes and remove both namespaces (idempotent)."""
    errors: list[BaseException] = []
    relay = link._relay
    if relay is not None:
        if relay.poll() is None:
            relay.kill()
        with contextlib.suppress(Exception):
            relay.communicate(timeout=5)
        link._relay = None
    for ns in dict.fromkeys(link.namespaces):
        try:
            remove_namespace(ns)
        except Exception as exc:
            errors.append(exc)
    left = [ns for ns in link.namespaces if ns in list_namespaces()]
    if left:
        raise RuntimeError(f"could not remove namespaces {left}: {errors}")


@contextlib.contextmanager
def temp_link(tag: str, *, l3: bool = False) -> Iterator[Link]:
    """``make_link`` as a context manager: the link is destroyed on every exit path."""
    link = make_link(tag, l3=l3)
    try:
        yield link
    finally:
        destroy(link)


def cleanup_stale() -> None:
    """Remove ``mtest-<pid>-*`` namespaces whose creating process no longer exists."""
    if not is_root():
        return
    for ns in list_namespaces():
        m = _STALE_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                remove_namespace(ns)


@atexit.register
def _cleanup_at_exit() -> None:
    """Last resort: remove this process's namespaces if a caller forgot to."""
    if os.getpid() != _owner_pid:
        return
    for ns in sorted(_live):
        with contextlib.suppress(Exception):
            remove_namespace(ns)
