"""Trace-ID correlation: records with one Community ID share a trace ID for a while."""

from __future__ import annotations

import secrets
from collections import OrderedDict


class TraceIds:
    """Community ID -> trace ID, forgotten `timeout_ns` after its last use; bounded size.

    Kept in least-recently-used order, so expiry and the size bound both pop from the
    front: O(1) per lookup, no scans.
    """

    def __init__(self, timeout_ns: int, max_entries: int) -> None:
        self.timeout_ns = timeout_ns
        self.max_entries = max_entries
        self._ids: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, community_id: str, now_ns: int) -> str:
        """Trace ID for `community_id` at `now_ns` (monotonic), creating one if needed."""
        self._expire(now_ns)
        entry = self._ids.pop(community_id, None)
        trace_id = entry[0] if entry else secrets.token_hex(16)
        self._ids[community_id] = (trace_id, now_ns)
        while len(self._ids) > self.max_entries:
            self._ids.popitem(last=False)
        return trace_id

    def _expire(self, now_ns: int) -> None:
        while self._ids:
            _cid, (_tid, used) = next(iter(self._ids.items()))
            if now_ns - used < self.timeout_ns:
                return
            self._ids.popitem(last=False)
