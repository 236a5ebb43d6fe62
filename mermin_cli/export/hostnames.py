"""Reverse-DNS names for ``client.address`` / ``server.address``, off the hot path.

``decorate`` answers from a bounded cache; addresses it does not know are looked up by a few
daemon threads, and ``decorate`` waits for them at most ``timeout`` seconds per batch. An
address whose lookup fails, or is still running at the deadline, gets its IP string
(failures are cached like names; a late answer fills the cache for the next records). An
entry older than ``ttl`` is still used once more while it is looked up again.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable

from mermin_cli.flows.record import FlowRecord

log = logging.getLogger("mermin.hostnames")

# client = source (the initiator), server = destination.
ROLES = (("source.address", "client.address"), ("destination.address", "server.address"))
MAX_PENDING = 4096  # addresses queued for lookup; beyond that they get their IP this time


def reverse_dns(address: str) -> str:
    """The host name of an address (the system resolver: /etc/hosts, DNS PTR, ...)."""
    return socket.gethostbyaddr(address)[0]


class HostnameResolver:
    """Adds reverse-DNS names to records in place, within ``timeout`` seconds per batch."""

    def __init__(
        self,
        timeout: float,
        cache_size: int = 65536,
        ttl: float = 300.0,
        resolve: Callable[[str], str] = reverse_dns,
        workers: int = 4,
    ) -> None:
        self.timeout = timeout
        self.cache_size = cache_size
        self.ttl = ttl
        self.resolve = resolve
        # address -> (when to look it up again, monotonic clock; name or None for "no name")
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._pending: set[str] = set()
        self._cond = threading.Condition()
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"mermin-dns-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def decorate(self, records: list[FlowRecord]) -> None:
        """Set client.address / server.address of each record (name, else the IP string)."""
        addresses = {r.attributes[src] for r in records for src, _ in ROLES if src in r.attributes}
        deadline = time.monotonic() + self.timeout
        with self._cond:
            names = self._cached(addresses, refresh=True)
            missing = addresses - names.keys()
            for address in missing:
                self._submit(address)
            while missing and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
                found = self._cached(missing)
                names.update(found)
                missing -= found.keys()
        for record in records:
            attributes = record.attributes
            for src, dst in ROLES:
                address = attributes.get(src)
                if address is not None:
                    attributes[dst] = names.get(address) or address

    def close(self) -> None:
        """Stop the lookup threads (lookups still running finish in the background)."""
        for _ in self._threads:
            self._queue.put(None)

    @property
    def cached(self) -> int:
        return len(self._cache)

    def _cached(self, addresses: Iterable[str], refresh: bool = False) -> dict[str, str | None]:
        """Cached names of ``addresses`` (None: no name); lock held.

        With ``refresh``, entries older than the TTL are still answered but looked up again.
        """
        now = time.monotonic()
        found = {}
        for address in addresses:
            entry = self._cache.get(address)
            if entry is not None:
                found[address] = entry[1]
                if refresh and entry[0] <= now:
                    self._submit(address)
        return found

    def _submit(self, address: str) -> None:
        if address not in self._pending and len(self._pending) < MAX_PENDING:
            self._pending.add(address)
            self._queue.put(address)

    def _work(self) -> None:
        while (address := self._queue.get()) is not None:
            try:
                name: str | None = self.resolve(address)
            except (OSError, UnicodeError) as exc:  # no PTR record, resolver failure
                log.debug("no host name for %s: %s", address, exc)
                name = None
            except Exception:  # an injected resolver's bug: never kill the thread
                log.exception("resolving %s failed", address)
                name = None
            with self._cond:
                self._pending.discard(address)
                self._cache.pop(address, None)  # re-inserted last: oldest first out
                self._cache[address] = (time.monotonic() + self.ttl, name or None)
                while len(self._cache) > self.cache_size:
                    del self._cache[next(iter(self._cache))]
                self._cond.notify_all()
