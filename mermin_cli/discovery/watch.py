"""Netlink link events: learn at once when interfaces appear, go up, or vanish."""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from collections.abc import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

log = logging.getLogger("mermin.discovery")


class LinkWatcher(threading.Thread):
    """Calls `on_change()` after every batch of RTM_NEWLINK/RTM_DELLINK messages.

    The callback re-reads the whole link list (it never trusts a single message), so a
    socket overrun (ENOBUFS) is handled the same way: resynchronise.
    """

    def __init__(self, on_change: Callable[[], None]) -> None:
        super().__init__(name="mermin-links", daemon=True)
        self.on_change = on_change
        self._done = threading.Event()
        self._ipr = IPRoute()
        try:
            self._ipr.bind(groups=RTMGRP_LINK)
        except BaseException:
            self._ipr.close()
            raise
        self._wake_r, self._wake_w = os.pipe()  # stop() wakes the select at once

    def run(self) -> None:
        try:
            while not self._done.is_set():
                ready, _, _ = select.select([self._ipr, self._wake_r], [], [])
                if self._ipr not in ready:
                    continue
                try:
                    self._ipr.get()
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    log.debug("netlink overrun; resynchronising the interface list")
                self.on_change()
        except Exception:  # keep capturing with what is attached; say why discovery stopped
            log.exception("interface discovery stopped")
        finally:
            self._ipr.close()

    def stop(self) -> None:
        if self._done.is_set():
            return
        self._done.set()
        os.write(self._wake_w, b"x")
        if self.is_alive():
            self.join(timeout=2)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
