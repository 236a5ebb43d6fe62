"""Attach the flow program to TC ingress and egress of interfaces, and take it away again.

Two mechanisms:
* TCX links (kernel >= 6.6): owned by our file descriptors, so the kernel detaches them
  when the process ends, however it ends. Nothing can be orphaned.
* clsact + cls_bpf filters through netlink (older kernels, or `--attach tc`): filters
  outlive the process, so each carries our name and a recognisable handle; a later run
  removes such orphans. We remove only what we added and keep a clsact qdisc that was
  there before us.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from mermin_cli.discovery.interfaces import Interface
from mermin_cli.engine import bpfsys
from mermin_cli.engine.compiler import kernel_version
from mermin_cli.engine.hooks import NAME_PREFIX, PARENT, TC_HANDLE
from mermin_cli.engine.program import FlowProgram
from mermin_cli.errors import MerminError

log = logging.getLogger("mermin.engine")


def kernel_has_tcx() -> bool:
    return kernel_version() >= (6, 6)


def resolve_mode(mode: str) -> str:
    """`auto` becomes `tcx` on kernels >= 6.6, else `tc`."""
    if mode == "auto":
        return "tcx" if kernel_has_tcx() else "tc"
    return mode


@dataclass
class Attached:
    """What we hold on one interface."""

    iface: Interface
    link_fds: list[int] = field(default_factory=list)  # TCX
    tc_hooks: list[bool] = field(default_factory=list)  # clsact: egress flags we added
    created_qdisc: bool = False


def _is_ours(filt: object) -> bool:
    opts = filt.get_attr("TCA_OPTIONS")  # type: ignore[attr-defined]
    name = opts.get_attr("TCA_BPF_NAME") if opts else None
    return bool(name and name.startswith(NAME_PREFIX))


class Attacher:
    """Attaches one loaded FlowProgram to interfaces; `close()` undoes everything."""

    def __init__(
        self, program: FlowProgram, mode: str = "auto", tc_priority: int = 1, first: bool = True
    ) -> None:
        self.program = program
        self.mode = resolve_mode(mode)
        self.tc_priority = tc_priority
        self.first = first
        self.attached: dict[int, Attached] = {}
        self._ipr = IPRoute()

    def attach(self, iface: Interface) -> None:
        """Attach to both hooks of `iface`; on failure nothing stays attached there."""
        if iface.index in self.attached:
            return
        entry = Attached(iface)
        try:
            fd = self.program.prog_fd(iface.l3)
            for egress in (False, True):
                if self.mode == "tcx":
                    entry.link_fds.append(
                        bpfsys.tcx_link_create(fd, iface.index, egress, self.first)
                    )
                else:
                    entry.created_qdisc |= self._ensure_clsact(iface.index)
                    self._add_filter(iface, fd, egress)
                    entry.tc_hooks.append(egress)
        except (OSError, NetlinkError) as exc:
            self._release(entry)
            raise MerminError(_attach_error(iface.name, exc)) from exc
        self.attached[iface.index] = entry
        log.info("attached to %s (index %d, %s)", iface.name, iface.index, self.mode)

    def detach(self, ifindex: int) -> None:
        entry = self.attached.pop(ifindex, None)
        if entry is not None:
            self._release(entry)
            log.info("detached from %s", entry.iface.name)

    def close(self) -> None:
        """Detach from every interface (safe to call more than once)."""
        for ifindex in list(self.attached):
            self.detach(ifindex)
        self._ipr.close()

    def remove_orphans(self, iface: Interface) -> int:
        """Delete cls_bpf filters a crashed earlier run left on `iface`; returns how many."""
        removed = 0
        for egress, parent in PARENT.items():
            try:
                filters = self._ipr.get_filters(index=iface.index, parent=parent)
            except NetlinkError:
                continue  # no clsact qdisc: nothing of ours can be there
            for filt in filters:
                if _is_ours(filt) and filt["handle"]:
                    prio = filt["info"] >> 16
                    self._del_filter(iface.index, egress, prio, filt["handle"])
                    removed += 1
        if removed:
            log.warning("removed %d filter(s) left on %s by an earlier run", removed, iface.name)
        return removed

    # -- clsact ------------------------------------------------------------------

    def _ensure_clsact(self, ifindex: int) -> bool:
        try:
            self._ipr.tc("add", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise
        return True

    def _add_filter(self, iface: Interface, fd: int, egress: bool) -> None:
        self._ipr.tc(
            "add-filter",
            "bpf",
            iface.index,
            TC_HANDLE,
            fd=fd,
            name=NAME_PREFIX + ("egress" if egress else "ingress"),
            parent=PARENT[egress],
            prio=self.tc_priority,
            direct_action=True,
        )

    def _del_filter(self, ifindex: int, egress: bool, prio: int, handle: int) -> None:
        try:
            self._ipr.tc("del-filter", "bpf", ifindex, handle, parent=PARENT[egress], prio=prio)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                raise

    def _release(self, entry: Attached) -> None:
        for fd in entry.link_fds:
            os.close(fd)
        entry.link_fds.clear()
        for egress in entry.tc_hooks:
            self._del_filter(entry.iface.index, egress, self.tc_priority, TC_HANDLE)
        entry.tc_hooks.clear()
        if entry.created_qdisc:
            self._drop_qdisc_if_empty(entry.iface.index)

    def _drop_qdisc_if_empty(self, ifindex: int) -> None:
        """Remove the clsact qdisc we created, unless another tool has filters on it now."""
        try:
            for parent in PARENT.values():
                if self._ipr.get_filters(index=ifindex, parent=parent):
                    return
            self._ipr.tc("del", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                raise


def _attach_error(name: str, exc: OSError | NetlinkError) -> str:
    code = exc.code if isinstance(exc, NetlinkError) else exc.errno
    if code in (errno.EPERM, errno.EACCES):
        return f"Attaching to {name} was refused; run as root or with CAP_NET_ADMIN and CAP_BPF."
    if code == errno.EBUSY:
        return (
            f"Attaching to {name} failed: device or resource busy (another program holds the "
            "hook); see `mermin interfaces` and choose another tc priority."
        )
    if code == errno.ENODEV:
        return f"Interface {name} disappeared while attaching."
    return f"Attaching to {name} failed ({os.strerror(code) if code else exc})."
