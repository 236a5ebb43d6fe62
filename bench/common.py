"""Shared helpers of the peer benchmarks: namespaces, processes, CPU time, peers' setup.

Every benchmark runs in network namespaces and veth pairs it creates (tests/netns.py:
names mtest-<pid>-*, addresses 10.203.x / fd00:203::) and removes them afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import netns  # noqa: E402

MERMIN = str(ROOT / ".venv" / "bin" / "mermin")
RESULTS = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Debian packages of the peers (and generators) the comparisons need.
PEER_PACKAGES = {
    "softflowd": "softflowd",
    "pmacctd": "pmacct",
    "argus": "argus-server",
    "ra": "argus-client",
    "tshark": "tshark",
    "trafgen": "netsniff-ng",
    "iperf3": "iperf3",
    "tcpdump": "tcpdump",
}


def ensure_tools(names: Sequence[str]) -> None:
    """Install the Debian packages of missing tools (non-interactively)."""
    missing = sorted({PEER_PACKAGES[n] for n in names if shutil.which(n) is None})
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for k in kids:
            out += [int(k), *descendants(int(k))]
    return out


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of the process tree's largest member, MiB (`field` of
    /proc/PID/status: RssAnon leaves out mapped files and BPF maps)."""
    best = 0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    best = max(best, int(line.split()[1]))
    return best / 1024


@contextlib.contextmanager
def running(host: netns.Host, argv: Sequence[str], ready: str | None = None,
            settle: float = 1.0, **kw: Any) -> Iterator[subprocess.Popen[str]]:  # fmt: skip
    """Run a tool in the namespace until the block ends (SIGINT, then SIGKILL)."""
    proc = host.popen(*argv, stdout=kw.pop("stdout", subprocess.DEVNULL),
                      stderr=subprocess.PIPE, **kw)  # fmt: skip
    try:
        if ready is not None:
            assert proc.stderr is not None
            deadline = time.monotonic() + 30
            for line in proc.stderr:
                if ready in line or time.monotonic() > deadline:
                    break
        time.sleep(settle)
        if proc.poll() is not None:
            raise RuntimeError(
                f"{argv[0]} exited early: {proc.stderr.read() if proc.stderr else ''}"
            )
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT, timeout: float = 20) -> None:
    if proc.poll() is None:
        for p in reversed([proc.pid, *descendants(proc.pid)]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def softflowd_argv(ifname: str) -> list[str]:
    """softflowd exporting NetFlow v9 to the namespace's own loopback (nothing listens).

    Run it in a scratch directory (cwd): softflowd keeps only 15 characters of its file
    arguments (it copies them into an interface-name buffer), so they are bare names.
    """
    return ["softflowd", "-d", "-i", ifname, "-n", "127.0.0.1:2055", "-v", "9",
            "-c", "sf.ctl", "-p", "sf.pid"]  # fmt: skip


def pmacctd_config(path: Path, ifname: str | None, out: Path, pcap: Path | None = None) -> Path:
    """A pmacctd config aggregating 5-tuples into a CSV file written at exit."""
    lines = [
        "daemonize: false",
        "plugins: print",
        "aggregate: src_host, dst_host, src_port, dst_port, proto",
        f"print_output_file: {out}",
        "print_output: csv",
        "print_refresh_time: 3600",
        "plugin_pipe_size: 10240000",
        "plugin_buffer_size: 102400",
    ]
    lines.append(f"pcap_savefile: {pcap}" if pcap else f"pcap_interface: {ifname}")
    path.write_text("\n".join(lines) + "\n")
    return path


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "unknown")  # fmt: skip
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    release = Path("/etc/os-release").read_text().splitlines()
    os_name = next(
        (line.split("=", 1)[1].strip('"') for line in release if line.startswith("PRETTY_NAME=")),
        "Linux",
    )
    return {
        "cpu": f"{os.cpu_count()} x {cpu}",
        "memory": f"{int(mem) // 1024 // 1024} GiB",
        "kernel": os.uname().release,
        "os": os_name,
        "python": sys.version.split()[0],
    }


def version(argv: Sequence[str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (res.stdout + res.stderr).strip().splitlines()[0] if (res.stdout + res.stderr) else "?"
