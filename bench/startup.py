"""Start-up cost of `mermin capture`: time to attached and peak RSS (median of N runs).

Runs the real CLI inside a throw-away network namespace on a veth pair it creates, so
nothing touches the host's interfaces. Usage: sudo .venv/bin/python bench/startup.py [N]
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import netns

MERMIN = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "mermin")


def one_run(host: netns.Host) -> tuple[float, float]:
    """Seconds from exec to 'capturing on', and the child's peak RSS in MiB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.monotonic()
    proc = host.popen(MERMIN, "capture", "-i", host.ifname, "--duration", "0.5",
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stderr is not None
    ready = None
    for line in proc.stderr:
        if "capturing on" in line and ready is None:
            ready = time.monotonic() - started
    proc.wait()
    if ready is None:
        raise RuntimeError("capture never attached")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return ready, max(peak, before) / 1024


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with netns.temp_link("bench-startup") as link:
        one_run(link.a)  # warm the header cache and the page cache
        results = [one_run(link.a) for _ in range(runs)]
    ready = statistics.median(r[0] for r in results)
    rss = max(r[1] for r in results)
    print("| metric | value |\n|---|---|")
    print(f"| start-up to attached (median of {runs}) | {ready:.2f} s |")
    print(f"| peak RSS of capture (max over runs) | {rss:.0f} MiB |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "startup.json").write_text(
        json.dumps({"runs": runs, "ready_s_median": ready, "peak_rss_mib": rss}, indent=2)
    )


if __name__ == "__main__":
    main()
