"""Read the kernel flow table through mmap and remove expired entries.

The table is the open-addressing table of bpf/flow.c (see its comment there): a control
word per slot in `flow_ctl` (a 62-bit tag of the key's hash, a 2-bit state), the keys and
stats in `flows`. `read()` finds the FULL words and copies their slots with numpy, with no
system call. A delete marks the word DELETED (only user space ever leaves FULL, so a
plain store is safe) and adds one to the deletes the kernel subtracts from its claims to
know how full the table is. Lookups in the kernel stop at an EMPTY slot and pass DELETED
ones, so after a poll has deleted entries, `sweep()` has the kernel turn DELETED slots
before EMPTY ones back into EMPTY.

A key is, in rare races, in two slots; every read merges such duplicates (counts added,
first-packet fields of the earliest), and a delete takes them all. Live, a poll reads and
deletes inside `settled()`, which first drains the per-CPU flow cache into the table
(engine/cache.py).
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator

import numpy as np

from mermin_cli.engine import bpfsys
from mermin_cli.engine.cache import FlowCache
from mermin_cli.engine.clock import PROBE_FRAME, TickClock
from mermin_cli.engine.compiler import FLOW_PROBES, flow_slots
from mermin_cli.engine.layout import (
    KEY_DTYPE,
    SLOT_CLAIMED,
    SLOT_DELETED,
    SLOT_DTYPE,
    SLOT_EMPTY,
    SLOT_FULL,
    SLOT_STATE,
    STATS_DTYPE,
)

USE_STRIDE = 8  # struct table_use: one u64 and seven of padding (a cache line)
SWEEP_MAX = 16  # slot indices per run of mermin_table_sweep
_MASK = (1 << 64) - 1
_KEY_AT, _STATS_AT = SLOT_DTYPE.fields["key"][1], SLOT_DTYPE.fields["stats"][1]


def flow_hash(key: bytes) -> int:
    """flow_hash() of bpf/flow.c: multiply-xor over the key's 11 little-endian words."""
    h = 0x9E3779B97F4A7C15
    for i in range(0, KEY_DTYPE.itemsize, 4):
        h ^= int.from_bytes(key[i : i + 4], "little")
        h = (h * 0xBF58476D1CE4E5B9) & _MASK
        h ^= h >> 29
    return h


def full_word(h: int) -> int:
    """The control word of a FULL slot of hash `h` (its tag and the state)."""
    return (h & ~SLOT_STATE) | SLOT_FULL


def merge(stats: np.ndarray) -> np.void:
    """One row for the stats of one key's duplicate slots: counts and flags of all, the
    first-packet fields of the earliest."""
    out = stats[int(np.argmin(stats["first_ns"]))].copy()
    out["packets"] = stats["packets"].sum(axis=0)
    out["bytes"] = stats["bytes"].sum(axis=0)
    out["last_ns"] = stats["last_ns"].max()
    out["tcp_flags"] = np.bitwise_or.reduce(stats["tcp_flags"], axis=0)
    out["meta_seen"] = np.bitwise_or.reduce(stats["meta_seen"])
    return out


class FlowTable:
    """The flow table of a loaded flow program, through mmap."""

    def __init__(
        self,
        fds: tuple[int, int, int],
        sweep_fd: int,
        capacity: int,
        clock: TickClock | None,
        cache: FlowCache | None = None,
    ) -> None:
        """`fds`: the `flow_ctl`, `flows` and `flow_use` maps of a program compiled for
        `capacity` entries; `sweep_fd`: its mermin_table_sweep. `clock` converts the
        kernel's timestamps; None when they are already ns. `cache`: the program's flow
        cache, drained by `settled()`."""
        self.capacity = capacity
        self.clock = clock
        self.cache = cache
        self._homes = flow_slots(capacity)
        slots = self._homes + FLOW_PROBES
        ctl_fd, slots_fd, use_fd = fds
        self._maps: list[mmap.mmap] = [
            bpfsys.map_mmap(ctl_fd, slots * 8, writable=True),
            bpfsys.map_mmap(slots_fd, slots * SLOT_DTYPE.itemsize),
            bpfsys.map_mmap(use_fd, 2 * USE_STRIDE * 8, writable=True),
        ]
        self._ctl = np.frombuffer(self._maps[0], "<u8", slots)
        # The words' low bytes (little-endian), which hold the states: scanning them makes
        # byte-sized temporaries, not word-sized ones (8 MiB for 2^20 slots).
        self._low = self._ctl.view(np.uint8)[::8]
        self._slots = np.frombuffer(self._maps[1], SLOT_DTYPE, slots)
        self._bytes = self._slots.view(np.uint8).reshape(slots, SLOT_DTYPE.itemsize)
        self._deletes = np.frombuffer(self._maps[2], "<u8", 2 * USE_STRIDE)[USE_STRIDE:][:1]
        self._sweep_fd = sweep_fd
        self._swept = True  # no DELETED slot waits for a sweep
        # The last read's rows: the slot of each, and the other slots of merged ones.
        self._read_slots = np.empty(0, dtype=np.int64)
        self._read_extra: dict[int, np.ndarray] = {}

    @contextlib.contextmanager
    def settled(self) -> Iterator[None]:
        """The table holds every packet counted so far, and deletes are safe, in this
        block; slots deleted in it are swept after."""
        with self.cache.settled() if self.cache else contextlib.nullcontext():
            yield
        self.sweep()

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """Copy of every (key, stats) row in the table, one per key."""
        full = np.flatnonzero(self.states() == SLOT_FULL)
        words = self._ctl[full]  # the words stay FULL: only user space leaves FULL
        keys, vals = self._gather(full)
        self._read_slots, self._read_extra = full, {}
        if len(np.unique(words)) < len(words):  # a key in two slots: one tag twice
            keys, vals = self._merge_duplicates(keys, vals, words)
        if self.clock is not None:
            self.clock.to_ns(vals)
        return keys, vals

    def _gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the keys and stats of these slots. np.take of whole rows as bytes, then
        the two fields: 66 ms for 400,000 slots of 2^20, where fancy indexing the fields of
        the structured array took 246 ms."""
        rows = np.take(self._bytes, slots, axis=0)
        keys = np.ascontiguousarray(rows[:, _KEY_AT : _KEY_AT + KEY_DTYPE.itemsize])
        vals = np.ascontiguousarray(rows[:, _STATS_AT : _STATS_AT + STATS_DTYPE.itemsize])
        return keys.view(KEY_DTYPE).ravel(), vals.view(STATS_DTYPE).ravel()

    def _merge_duplicates(
        self, keys: np.ndarray, vals: np.ndarray, words: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fold rows of one key into its first; remembers the slots folded in."""
        values, counts = np.unique(words, return_counts=True)
        drop: list[int] = []
        for word in values[counts > 1]:
            by_key: dict[bytes, list[int]] = {}
            for i in np.flatnonzero(words == word):
                by_key.setdefault(keys[i].tobytes(), []).append(int(i))
            for rows in by_key.values():
                if len(rows) > 1:
                    vals[rows[0]] = merge(vals[rows])
                    drop.extend(rows[1:])
                    self._read_extra[rows[0]] = self._read_slots[rows[1:]]
        keep = np.setdiff1d(np.arange(len(keys)), drop)
        if drop:  # renumber the remembered rows after the dropped ones
            self._read_extra = {
                int(np.searchsorted(keep, r)): s for r, s in self._read_extra.items()
            }
            self._read_slots = self._read_slots[keep]
        return keys[keep], vals[keep]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Remove rows of the latest read() from the table and return their final stats,
        in order (call inside the same settled() block)."""
        rows = np.asarray(rows, dtype=np.int64)
        final = self._delete(self._read_slots[rows])
        merged = np.flatnonzero(np.isin(rows, list(self._read_extra))) if self._read_extra else ()
        for n in merged:  # twins only (rare): no Python step per expired flow
            extra = self._delete(self._read_extra[int(rows[n])])
            final[n] = merge(np.concatenate([final[n : n + 1], extra]))
        if self.clock is not None:
            self.clock.to_ns(final)
        return final

    def _delete(self, slots: np.ndarray) -> np.ndarray:
        """Mark FULL slots DELETED; their stats (raw), counted up to the mark."""
        before = self._slots["stats"][slots]
        self._ctl[slots] = self._ctl[slots] ^ (SLOT_FULL ^ SLOT_DELETED)  # the hash stays
        after = self._slots["stats"][slots]
        # A CPU may have claimed a slot again since the mark: its stats are then another
        # flow's, and the copy from before the mark stands.
        reused = (self._ctl[slots] & SLOT_STATE) != SLOT_DELETED
        after[reused] = before[reused]
        self._deletes[0] += len(slots)
        self._swept = self._swept and not len(slots)
        return after

    def home_slot(self, h: int) -> int:
        """The home slot of hash `h`, as flow.c's home_slot()."""
        return ((h >> 32) * self._homes) >> 32

    def lookup(self, key: np.void) -> np.void | None:
        """Current stats of one flow (None if it is not in the table)."""
        kb = key.tobytes()
        h = flow_hash(kb)
        home = self.home_slot(h)
        words = self._ctl[home : home + FLOW_PROBES]
        window = self._slots[home : home + FLOW_PROBES]
        found = [
            window["stats"][i]
            for i in np.flatnonzero(words == full_word(h))
            if window["key"][i].tobytes() == kb
        ]
        if not found:
            return None
        stats = np.array(found, dtype=STATS_DTYPE)
        if self.clock is not None:
            self.clock.to_ns(stats)
        return stats[0] if len(stats) == 1 else merge(stats)

    def states(self) -> np.ndarray:
        """Every slot's state (SLOT_*), as bytes."""
        return self._low & SLOT_STATE

    def occupancy(self) -> dict[str, int]:
        """Slots in all, and how many hold an entry or wait for a sweep."""
        counts = np.bincount(self.states(), minlength=SLOT_CLAIMED + 1)
        return {
            "slots": len(self._ctl),
            "full": int(counts[SLOT_FULL]),
            "deleted": int(counts[SLOT_DELETED]),
        }

    def sweep(self) -> int:
        """Have the kernel empty DELETED slots that end a probe sequence (see flow.c);
        how many it emptied. The kernel walks back at most 16 slots from each EMPTY one,
        so a longer run of DELETED slots is finished by later sweeps."""
        if self._swept:
            return 0
        state = self.states()
        ends = np.flatnonzero((self._ctl[1:] == SLOT_EMPTY) & (state[:-1] == SLOT_DELETED)) + 1
        if state[-1] == SLOT_DELETED:  # the end of the array counts as EMPTY
            ends = np.append(ends, len(state))
        swept = 0
        for first in range(0, len(ends), SWEEP_MAX):
            indices = ends[first : first + SWEEP_MAX].astype("<u4").tobytes()
            swept += bpfsys.prog_test_run(self._sweep_fd, PROBE_FRAME + indices).retval
        self._swept = not np.any(self.states() == SLOT_DELETED)
        return swept

    def close(self) -> None:
        """Unmap the table (the views go first: a mapping with live views cannot close)."""
        if self._maps:
            del self._ctl, self._low, self._slots, self._bytes, self._deletes
            for mapping in self._maps:
                mapping.close()
            self._maps = []
