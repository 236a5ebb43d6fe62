"""Which interfaces a capture is attached to, kept in step with patterns and the host."""

from __future__ import annotations

import logging
import threading

from mermin_cli.discovery.interfaces import (
    Interface,
    default_route_interfaces,
    list_interfaces,
    match_interfaces,
    unmatched_warning,
)
from mermin_cli.engine.attach import Attacher
from mermin_cli.errors import MerminError, UsageError

log = logging.getLogger("mermin.capture")


def select_interfaces(patterns: tuple[str, ...], links: list[Interface]) -> list[Interface]:
    """Interfaces to capture on: the patterns' matches, or the default-route interfaces."""
    if not patterns:
        wanted = default_route_interfaces()
        chosen = [i for i in links if i.index in wanted]
        if not chosen:
            raise UsageError(
                "No interface holds a default route here; name one with -i "
                f"(interfaces: {', '.join(i.name for i in links)})."
            )
        return chosen
    for pattern in patterns:
        if warning := unmatched_warning(pattern, links):
            log.warning("%s", warning)
    chosen = match_interfaces(patterns, links)
    if not chosen:
        raise UsageError(
            f"No interfaces found to instrument: {', '.join(repr(p) for p in patterns)} "
            f"matched nothing; interfaces here: {', '.join(i.name for i in links)}."
        )
    return chosen


class Hooks:
    """The interfaces we are attached to, kept in step with the patterns and the host.

    `reconcile()` is called from the netlink watcher thread and from the poll loop, so
    everything that touches the attacher holds the lock.
    """

    def __init__(self, attacher: Attacher, patterns: tuple[str, ...], auto_discover: bool) -> None:
        self.attacher = attacher
        self.patterns = patterns
        self.auto_discover = auto_discover
        self.names: dict[int, str] = {}
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._failed: set[int] = set()  # attach failed: retried while discovery runs

    def start(self) -> list[Interface]:
        """Attach to the initial selection (an error if it is empty)."""
        chosen = select_interfaces(self.patterns, list_interfaces())
        if not self.patterns:  # default-route interfaces: keep to exactly those
            self.patterns = tuple(i.name for i in chosen)
        with self._lock:
            for iface in chosen:
                self.attacher.remove_orphans(iface)
                self._attach(iface, fatal=not self.auto_discover)
        return chosen

    def reconcile(self) -> None:
        """Forget vanished interfaces; with auto-discovery, attach new matching ones."""
        links = list_interfaces()
        with self._lock:
            present = {i.index: i for i in links}
            for ifindex in [i for i in self.attacher.attached if i not in present]:
                log.warning("interface %s disappeared", self.names.get(ifindex, ifindex))
                self.attacher.detach(ifindex)
            self._failed &= present.keys()
            if self.auto_discover:
                for iface in match_interfaces(self.patterns, links):
                    if iface.index not in self.attacher.attached:
                        self._attach(iface, fatal=False)
            if not self.attacher.attached and not self.auto_discover:
                self.failure = "Every captured interface has disappeared; nothing left to capture."

    def set_patterns(self, patterns: tuple[str, ...]) -> None:
        """New patterns (config reload): detach what no longer matches, attach the rest."""
        with self._lock:
            self.patterns = patterns or self.patterns
            keep = {i.index for i in match_interfaces(self.patterns, list_interfaces())}
            for ifindex in [i for i in self.attacher.attached if i not in keep]:
                self.attacher.detach(ifindex)
        self.reconcile()

    def _attach(self, iface: Interface, fatal: bool) -> None:
        try:
            self.attacher.attach(iface)
        except MerminError as exc:
            if fatal:
                raise
            if iface.index not in self._failed:
                log.warning("%s; will retry while the interface exists", exc)
            self._failed.add(iface.index)
            return
        self._failed.discard(iface.index)
        self.names[iface.index] = iface.name
