"""User space's half of the per-CPU flow cache in bpf/flow.c.

Packets of known flows are counted in a small slot of their CPU's cache instead of their
table entry, which saves the table lookup that dominates a packet's cost. The entries
are exact again only after every CPU's slots are drained into them, so each poll runs
inside `settled()`:

1. `cache_gen` goes even: no packet hits or fills a slot any more;
2. mermin_cache_flush runs (BPF_PROG_TEST_RUN) on each online CPU, pinned there, adding
   its slots' counts to their entries; the slots of a CPU that went offline (hot-unplug)
   are read from here and added by mermin_cache_absorb, on any CPU;
3. the caller reads the table and deletes expired entries;
4. `cache_gen` goes odd and new: every slot is free, none points at a deleted entry.

A flush runs in process context, so TC on its CPU may interrupt it but not the reverse;
that is what makes plain (non-atomic) slot updates safe, and why the cache stays off when
a CPU cannot be reached: a cpuset without it, or PREEMPT_RT, where softirqs run in
threads that a flush can interrupt.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from mermin_cli.engine import bpfsys
from mermin_cli.engine.clock import PROBE_FRAME
from mermin_cli.engine.cpus import online_cpus, possible_cpus

log = logging.getLogger("mermin.engine")

REALTIME = Path("/sys/kernel/realtime")
ZERO_KEY = bytes(4)
CACHE_SLOTS = 256  # bpf/flow.c
SLOT_SIZE = 104  # sizeof(struct cache_slot)
SLOT_COUNTS = struct.Struct("<QQQ")  # gen, packets[0], packets[1]
SLOT_COUNTS_OFFSET = 48
ABSORB_MAX = 16  # slots per run of mermin_cache_absorb
FLUSH_CHUNK = 16  # slots per run of mermin_cache_flush


class FlowCache:
    """Turns the kernel's flow cache on, and drains it around each table poll."""

    def __init__(self, flush_fd: int, absorb_fd: int, gen_fd: int, slots_fd: int) -> None:
        """The mermin_cache_flush and mermin_cache_absorb programs, and the `cache_gen` and
        `flow_cache` maps."""
        self._flush_fd = flush_fd
        self._absorb_fd = absorb_fd
        self._gen_fd = gen_fd
        self._slots_fd = slots_fd
        self._gen = 0  # even: off (the map's value at load)
        self.enabled = False
        self.off_reason: str | None = "not enabled"

    def enable(self) -> bool:
        """Turn the cache on if every CPU that runs TC can be drained; returns whether it is."""
        why = unusable()
        if why:
            log.info("flow cache off: %s", why)
            self.off_reason = why
            return False
        if not self.enabled:
            self.enabled, self.off_reason = True, None
            self._turn(on=True)
        return True

    def disable(self) -> None:
        """Turn the cache off, its counts drained into the table."""
        if self.enabled:
            self._turn(on=False)
            self.drain()
            self.enabled, self.off_reason = False, "disabled"

    def _give_up(self, why: str) -> None:
        """Off for good, the generation left even: some CPU's slots cannot be drained."""
        log.warning("flow cache turned off: %s", why)
        self.enabled, self.off_reason = False, why

    @contextlib.contextmanager
    def settled(self) -> Iterator[None]:
        """Every cached count is in the table, and stays there, until the block ends."""
        if not self.enabled:
            yield
            return
        self._turn(on=False)
        try:
            self.drain()
            yield
        finally:
            if self.enabled:
                self._turn(on=True)

    def drain(self) -> None:
        """Run the flush program on each online CPU and absorb the slots of offline ones
        (the cache must be off meanwhile)."""
        allowed = os.sched_getaffinity(0)
        cpus = online_cpus()
        self.absorb(set(possible_cpus()) - cpus)
        try:
            for cpu in sorted(cpus & allowed):
                try:
                    os.sched_setaffinity(0, {cpu})
                except OSError as exc:
                    if cpu in online_cpus():  # the cpuset changed under us
                        self._give_up(f"CPU {cpu} cannot be reached ({exc.strerror})")
                    else:  # gone offline since the list was read
                        self.absorb({cpu})
                    continue
                for first in range(0, CACHE_SLOTS, FLUSH_CHUNK):
                    ran_on = bpfsys.prog_test_run(self._flush_fd, PROBE_FRAME, cb0=first).retval
                    if ran_on != cpu:
                        self._give_up(f"a flush meant for CPU {cpu} ran on CPU {ran_on}")
                        break
        finally:
            os.sched_setaffinity(0, allowed)
        if not cpus <= allowed:
            self._give_up(
                f"CPUs {sorted(cpus - allowed)} came online outside this process's cpuset"
            )

    def absorb(self, offline: set[int]) -> int:
        """Add the counts that offline CPUs' slots hold for the ended generation into the
        table; returns how many slots held some. A CPU offline since before the
        generation began has none (its slots are older), so this reads but adds nothing."""
        if not offline:
            return 0
        possible = possible_cpus()
        columns = [possible.index(cpu) for cpu in sorted(offline) if cpu in possible]
        ended = self._gen - 1
        pending = []
        row = SLOT_SIZE * len(possible)  # a slot's values, CPU after CPU
        slots = bpfsys.array_read(self._slots_fd, CACHE_SLOTS, row)
        for at in range(0, len(slots), row):
            for column in columns:
                raw = slots[at + column * SLOT_SIZE : at + (column + 1) * SLOT_SIZE]
                gen, forward, reverse = SLOT_COUNTS.unpack_from(raw, SLOT_COUNTS_OFFSET)
                if gen == ended and forward + reverse:
                    pending.append(raw)
        absorbed = 0
        for first in range(0, len(pending), ABSORB_MAX):
            records = b"".join(pending[first : first + ABSORB_MAX])
            absorbed += bpfsys.prog_test_run(self._absorb_fd, PROBE_FRAME + records).retval
        if pending:
            log.info("flow cache: %d slots of offline CPUs %s drained", absorbed, sorted(offline))
        return absorbed

    def _turn(self, on: bool) -> None:
        """Start a new generation: odd turns the cache on with every slot free, even off."""
        gen = self._gen + 1
        if gen & 1 != on:
            gen += 1
        self._gen = gen
        key = ctypes.create_string_buffer(ZERO_KEY, 4)
        value = ctypes.create_string_buffer(struct.pack("<Q", gen), 8)
        bpfsys.map_update(self._gen_fd, key, value)


def unusable() -> str:
    """Why this process could not drain the cache of every CPU ("" if it can)."""
    if REALTIME.exists() and REALTIME.read_text().strip() == "1":
        return "PREEMPT_RT kernel (softirqs run in threads a flush could interrupt)"
    missing = online_cpus() - os.sched_getaffinity(0)
    if missing:
        return f"CPUs {sorted(missing)} are outside this process's cpuset"
    return ""
