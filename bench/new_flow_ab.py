"""New-flow kernel cost of variants of bpf/flow.c, side by side in one process.

Each round measures every variant once, in the order given: an empty-program run, the
variant's address-bump wrapper alone, then a fill of half its table with new flows (the
`new_flow` row of kernel_cost.py, same method and entry points). Prints each variant's
median ratio to the empty program, and for every variant after the first the median of
its per-round ratios to the first: the VM's memory latency drifts by a third within
minutes, so only such paired ratios compare variants.

    sudo .venv/bin/python bench/new_flow_ab.py [--rounds 40] flow.c other/flow.c ...

A variant from before the per-CPU event rings (a BPF ring buffer, e.g. `git show
0785fb6:bpf/flow.c`) works too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from pathlib import Path

from kernel_cost import DEFAULT_CAPACITY, EMPTY_PROGRAM, BenchModule, hit_frames, run_ns

from mermin_cli.engine.compiler import import_bcc
from mermin_cli.engine.kernel_headers import prepare_bcc_headers

REPEAT = 200_000


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=Path, help="flow.c variants")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--chunks", type=int, default=30, help="test-run calls per fill")
    parser.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY)
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU: stable caches
    prepare_bcc_headers()
    bcc = import_bcc()
    tcp = hit_frames()["ipv4_tcp"]
    ratios: list[list[float]] = [[] for _ in args.sources]
    with contextlib.ExitStack() as cleanup:
        empty = bcc.BPF(text=EMPTY_PROGRAM)
        cleanup.callback(empty.cleanup)
        empty_fd = empty.load_func(b"empty", bcc.BPF.SCHED_CLS).fd
        modules = []
        for source in args.sources:
            modules.append(BenchModule(source.read_bytes(), args.capacity, args.chunks))
            cleanup.callback(modules[-1].close)
        for _ in range(args.rounds):
            for module, out in zip(modules, ratios, strict=True):
                e = run_ns(empty_fd, tcp, REPEAT)
                bump = module.write_only(REPEAT)
                out.append((module.new_flows() - bump + e) / e)
    for source, out in zip(args.sources, ratios, strict=True):
        print(f"{source}: {statistics.median(out):.2f}x the empty program "
              f"({min(out):.1f}-{max(out):.1f})")  # fmt: skip
    for source, out in zip(args.sources[1:], ratios[1:], strict=True):
        paired = [b / a for a, b in zip(ratios[0], out, strict=True)]
        lower = sum(r < 1 for r in paired)
        print(f"{source} / {args.sources[0]}: {statistics.median(paired):.3f} "
              f"(median of {len(paired)} rounds; lower in {lower})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
