"""Capabilities needed to load and attach eBPF programs."""

from __future__ import annotations

from pathlib import Path

from mermin_cli.errors import MerminError

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


def effective_capabilities(status: Path = Path("/proc/self/status")) -> int:
    """The CapEff bit mask of this process."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def missing_capabilities(caps: int | None = None) -> list[str]:
    """Names of the capabilities capture needs but this process lacks."""
    caps = effective_capabilities() if caps is None else caps

    def has(bit: int) -> bool:
        return bool(caps >> bit & 1)

    missing = []
    if not has(CAP_NET_ADMIN):
        missing.append("CAP_NET_ADMIN")
    if not (has(CAP_BPF) or has(CAP_SYS_ADMIN)):
        missing.append("CAP_BPF")
    if not (has(CAP_PERFMON) or has(CAP_SYS_ADMIN)):
        missing.append("CAP_PERFMON")
    return missing


def require_read_privileges() -> None:
    """`capture --read`: fail before compiling when the kernel would refuse the program."""
    missing = missing_capabilities()
    if missing:
        raise MerminError(
            f"Reading a capture file runs it through the eBPF flow program, and loading that "
            f"needs {', '.join(missing)} (no interface is touched); run it as root "
            "(sudo mermin capture --read ...)."
        )


def require_capture_privileges() -> None:
    """Fail early, before compiling anything, when the kernel would refuse us."""
    missing = missing_capabilities()
    if missing:
        raise MerminError(
            f"Capturing needs {', '.join(missing)}; run it as root (sudo mermin capture ...)."
        )
