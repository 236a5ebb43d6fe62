"""Attach an empty pass-through TC program at ingress and egress of one interface until
SIGINT/SIGTERM: the "any eBPF hook at all" baseline of bench/throughput.py.

Run inside the interface's namespace. TCX links die with the process, so nothing stays.

    ip netns exec NS .venv/bin/python bench/empty_hooks.py IFNAME
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mermin_cli.engine import bpfsys


def main() -> None:
    ifindex = socket.if_nametoindex(sys.argv[1])
    prog = bpfsys.load_pass_through_program(b"bench_empty")
    links = [bpfsys.tcx_link_create(prog, ifindex, egress) for egress in (False, True)]
    print(f"attached {len(links)} empty hooks", file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
