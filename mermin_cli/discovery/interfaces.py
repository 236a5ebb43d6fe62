"""Network interfaces of this namespace and the patterns that select them."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute

from mermin_cli.config import values
from mermin_cli.errors import UsageError

ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772


@dataclass(frozen=True)
class Interface:
    """One link as netlink reports it."""

    index: int
    name: str
    kind: str  # IFLA_INFO_KIND (veth, bridge, vxlan, ...) or "device"
    state: str  # operstate: UP, DOWN, UNKNOWN, ...
    up: bool  # administratively up (IFF_UP)
    mtu: int
    mac: str
    link_type: int  # ARPHRD_*
    addresses: tuple[str, ...] = ()

    @property
    def l3(self) -> bool:
        """True for devices whose packets start at the IP header (tun, wireguard, ipip)."""
        return self.link_type not in (ARPHRD_ETHER, ARPHRD_LOOPBACK)


def _kind(msg: object) -> str:
    info = msg.get_attr("IFLA_LINKINFO")  # type: ignore[attr-defined]
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    return kind or "device"


def list_interfaces(ipr: IPRoute | None = None) -> list[Interface]:
    """All links of the current network namespace, ordered by index."""
    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        addrs: dict[int, list[str]] = {}
        for a in ipr.get_addr():
            addrs.setdefault(a["index"], []).append(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        links = [
            Interface(
                index=m["index"],
                name=m.get_attr("IFLA_IFNAME"),
                kind=_kind(m),
                state=m.get_attr("IFLA_OPERSTATE") or "UNKNOWN",
                up=bool(m["flags"] & 1),
                mtu=m.get_attr("IFLA_MTU") or 0,
                mac=m.get_attr("IFLA_ADDRESS") or "",
                link_type=m["ifi_type"],
                addresses=tuple(addrs.get(m["index"], ())),
            )
            for m in ipr.get_links()
        ]
    finally:
        if own:
            ipr.close()
    return sorted(links, key=lambda i: i.index)


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """Matcher for a literal name, a glob (`eth*`, `veth?`, `{a,b}`) or a `/regex/` (searched)."""
    try:
        rx = values.compile_pattern(pattern)
    except ValueError as exc:
        raise UsageError(f"Interface pattern {pattern!r} is invalid: {exc}.") from exc
    return lambda name: rx.search(name) is not None


def match_interfaces(patterns: Iterable[str], interfaces: Iterable[Interface]) -> list[Interface]:
    """Interfaces matched by any pattern, de-duplicated, in index order."""
    matchers = [compile_pattern(p) for p in patterns]
    return [i for i in interfaces if any(m(i.name) for m in matchers)]


def close_matches(pattern: str, interfaces: Iterable[Interface]) -> list[str]:
    """Names that look like what the user meant by `pattern`."""
    names = [i.name for i in interfaces]
    stem = pattern.strip("/*?")
    return difflib.get_close_matches(stem, names, n=3, cutoff=0.5)


def default_route_interfaces(ipr: IPRoute | None = None) -> list[int]:
    """Indexes of the interfaces holding an IPv4 or IPv6 default route."""
    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        found: list[int] = []
        for family in (2, 10):
            for route in ipr.get_default_routes(family=family):
                oif = route.get_attr("RTA_OIF")
                multipath = route.get_attr("RTA_MULTIPATH") or []
                for idx in [oif, *(hop["oif"] for hop in multipath)]:
                    if idx and idx not in found:
                        found.append(idx)
    finally:
        if own:
            ipr.close()
    return found
