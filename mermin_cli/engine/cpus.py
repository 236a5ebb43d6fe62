"""The CPUs the kernel knows of (no numpy: the compiler needs them before it loads)."""

from __future__ import annotations

from pathlib import Path

ONLINE = Path("/sys/devices/system/cpu/online")
POSSIBLE = Path("/sys/devices/system/cpu/possible")


def parse_cpu_list(text: str) -> set[int]:
    """CPUs of a kernel cpu list such as "0-3,8,10-11"."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def online_cpus() -> set[int]:
    """CPUs that can run a TC program right now."""
    return parse_cpu_list(ONLINE.read_text())


def possible_cpus() -> list[int]:
    """Every CPU that can ever come online: the order of a per-CPU map's values."""
    return sorted(parse_cpu_list(POSSIBLE.read_text()))
