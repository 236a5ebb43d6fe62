"""Raw bpf(2) helpers that the CLI and the benchmarks share (real syscalls, as root)."""

from __future__ import annotations

import os

import pytest

from mermin_cli.engine import bpfsys

pytestmark = pytest.mark.bpf


def test_run_time_stats_count_exactly_the_runs_made_while_enabled() -> None:
    prog = bpfsys.load_pass_through_program(b"mermin_stats")
    try:
        kernel_id = bpfsys.prog_id(prog)
        assert kernel_id in bpfsys.prog_ids()
        assert bpfsys.prog_name(kernel_id) == "mermin_stats"
        assert bpfsys.prog_run_time(kernel_id) == (0, 0)  # nothing counted while disabled

        stats = bpfsys.enable_run_time_stats()
        try:
            bpfsys.prog_test_run(prog, bytes(64), 1000)
            run_time, runs = bpfsys.prog_run_time(kernel_id)
        finally:
            os.close(stats)
        assert runs == 1000
        assert 0 < run_time < 1000 * 100_000  # under 100 us per two-instruction run

        bpfsys.prog_test_run(prog, bytes(64), 500)  # stats off again: not counted
        assert bpfsys.prog_run_time(kernel_id) == (run_time, runs)
    finally:
        os.close(prog)
