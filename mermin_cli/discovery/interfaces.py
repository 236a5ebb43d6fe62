"""Network interfaces of this namespace, the patterns that select them and the programs
already on their TC hooks."""

from __future__ import annotations

import difflib
import errno
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from mermin_cli.config import values
from mermin_cli.engine import bpfsys
from mermin_cli.engine.hooks import NAME_PREFIX, PARENT
from mermin_cli.errors import UsageError

ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
TCA_BPF_ID = 11  # cls_bpf option carrying the program id


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
    peer_index: int | None = None  # veth: ifindex of the other end (IFLA_LINK)
    peer_netnsid: int | None = None  # veth: netns id of the other end, if in another netns
    master: str | None = None  # bridge (or bond, VRF) this link is enslaved to

    @property
    def l3(self) -> bool:
        """True for devices whose packets start at the IP header (tun, wireguard, ipip)."""
        return self.link_type not in (ARPHRD_ETHER, ARPHRD_LOOPBACK)

    @property
    def peer_label(self) -> str:
        """The veth peer for tables: `index 7`, or `index 2, netns 0` in another namespace."""
        if self.peer_index is None:
            return ""
        where = "" if self.peer_netnsid is None else f", netns {self.peer_netnsid}"
        return f"index {self.peer_index}{where}"


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
        msgs = ipr.get_links()
        names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in msgs}
        links = []
        for m in msgs:
            kind = _kind(m)
            veth = kind == "veth"
            links.append(
                Interface(
                    index=m["index"],
                    name=m.get_attr("IFLA_IFNAME"),
                    kind=kind,
                    state=m.get_attr("IFLA_OPERSTATE") or "UNKNOWN",
                    up=bool(m["flags"] & 1),
                    mtu=m.get_attr("IFLA_MTU") or 0,
                    mac=m.get_attr("IFLA_ADDRESS") or "",
                    link_type=m["ifi_type"],
                    addresses=tuple(addrs.get(m["index"], ())),
                    peer_index=m.get_attr("IFLA_LINK") if veth else None,
                    peer_netnsid=m.get_attr("IFLA_LINK_NETNSID") if veth else None,
                    master=names.get(m.get_attr("IFLA_MASTER")),
                )
            )
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


def unmatched_warning(pattern: str, interfaces: list[Interface]) -> str | None:
    """The warning for a pattern that selects none of `interfaces` (with close names), or None."""
    if match_interfaces([pattern], interfaces):
        return None
    hint = close_matches(pattern, interfaces)
    suggestion = f" (did you mean {', '.join(hint)}?)" if hint else ""
    return f"Interface pattern {pattern!r} did not match any interfaces{suggestion}"


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


@dataclass(frozen=True)
class TcProgram:
    """A program on one TC hook: a TCX chain member or a clsact filter (any classifier)."""

    hook: str  # ingress | egress
    mechanism: str  # tcx | tc
    name: str  # program name (tcx) or filter name (tc, TCA_BPF_NAME); "" if none
    prog_id: int | None  # kernel program id; None for a classifier that is not BPF
    ours: bool  # named by mermin (NAME_PREFIX)
    order: int | None = None  # tcx: 1-based position in the chain (1 runs first)
    revision: int | None = None  # tcx: the hook's revision, changed by every (de)attach
    priority: int | None = None  # tc: filter priority (lower runs first)
    handle: int | None = None  # tc: filter handle
    kind: str | None = None  # tc: classifier kind (bpf, u32, flower, ...)

    @property
    def label(self) -> str:
        """Short form for tables: `tcx#1 mermin_l2 (ours)`, `tc prio 1 foreign`."""
        where = f"tcx#{self.order}" if self.mechanism == "tcx" else f"tc prio {self.priority}"
        text = f"{where} {self.name or self.kind}"
        return f"{text} (ours)" if self.ours else text


def hooks_summary(programs: Iterable[TcProgram]) -> str:
    """One line per hook: `ingress: tcx#1 mermin_l2 (ours), tc prio 1 foreign`."""
    by_hook: dict[str, list[str]] = {}
    for prog in programs:
        by_hook.setdefault(prog.hook, []).append(prog.label)
    return "\n".join(f"{hook}: {', '.join(labels)}" for hook, labels in by_hook.items())


def tc_programs(ifindex: int, ipr: IPRoute | None = None) -> list[TcProgram]:
    """Programs on the ingress and egress TC hooks of `ifindex`: TCX chains, then filters.

    Raises PermissionError unless root (CAP_SYS_ADMIN, CAP_NET_ADMIN): the kernel hides them.
    """

    own = ipr is None
    ipr = ipr or IPRoute()
    found: list[TcProgram] = []
    try:
        for egress, parent in PARENT.items():
            hook = "egress" if egress else "ingress"
            ids, revision = _tcx_chain(ifindex, egress)
            for order, pid in enumerate(ids, 1):
                name = _prog_name(pid)
                if name is not None:
                    ours = name.startswith(NAME_PREFIX)
                    found.append(TcProgram(hook, "tcx", name, pid, ours, order, revision))
            for filt in _filters(ipr, ifindex, parent):
                opts = filt.get_attr("TCA_OPTIONS")
                name = (opts.get_attr("TCA_BPF_NAME") if opts else None) or ""
                pid = _bpf_prog_id(opts) if opts else None
                ours = name.startswith(NAME_PREFIX)
                prio, handle, kind = filt["info"] >> 16, filt["handle"], filt.get_attr("TCA_KIND")
                found.append(
                    TcProgram(hook, "tc", name, pid, ours, priority=prio, handle=handle, kind=kind)
                )
    finally:
        if own:
            ipr.close()
    return found


def _tcx_chain(ifindex: int, egress: bool) -> tuple[list[int], int | None]:
    """Program ids on a TCX hook; none on kernels without TCX or for a vanished link."""
    try:
        return bpfsys.tcx_query(ifindex, egress)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENODEV):
            return [], None
        raise


def _prog_name(prog_id: int) -> str | None:
    """A program's name, or None when it was unloaded meanwhile."""
    try:
        return bpfsys.prog_name(prog_id)
    except FileNotFoundError:
        return None


def _bpf_prog_id(opts: Any) -> int | None:
    """TCA_BPF_ID of a cls_bpf filter; pyroute2 leaves it undecoded, so read the raw attribute."""
    for name, nla in opts["attrs"]:
        if name == "TCA_BPF_ID":
            return int(nla)
        if name == "UNKNOWN" and nla["header"]["type"] == TCA_BPF_ID:
            return int(struct.unpack_from("I", nla.data, nla.offset + 4)[0])
    return None


def _filters(ipr: IPRoute, ifindex: int, parent: int) -> list[Any]:
    """The filters under one clsact parent (none without a clsact qdisc)."""
    try:
        return [f for f in ipr.get_filters(index=ifindex, parent=parent) if f["handle"]]
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return []
        raise
