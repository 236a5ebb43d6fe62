"""Run every benchmark of bench/ in turn (each prints its own markdown table), then write
bench/RESULTS.md with tables and plots (bench/report.py).

Setup first: the `bench` extra of pyproject.toml (matplotlib) into the running venv; each
script installs the Debian packages of the peers it compares with when they are missing.

sudo make bench
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = (
    "kernel_cost.py",
    "startup.py",
    "throughput.py",
    "accuracy.py",
    "flowrate.py",
    "otlp_throughput.py",
    "offline.py",
    "report.py",
)


def install_bench_extra() -> None:
    """pip install -e '.[bench]' when matplotlib is missing (make setup installs [test])."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-e", f"{BENCH.parent}[bench]"],
            check=True,
        )


def main() -> int:
    install_bench_extra()
    failed = []
    for script in SCRIPTS:
        print(f"\n## {script}\n", flush=True)
        if subprocess.run([sys.executable, str(BENCH / script)], check=False).returncode:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
