"""Shell completion: the committed scripts are current, and bash really completes with them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPLETIONS = ROOT / "completions"
VENV_BIN = ROOT / ".venv" / "bin"
FILES = ("mermin.bash", "_mermin", "mermin.fish")


def test_committed_completions_are_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_completions.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    for name in FILES:
        fresh = (tmp_path / name).read_text()
        assert (COMPLETIONS / name).read_text() == fresh, (
            f"completions/{name} is stale: run `make completions` and commit the result"
        )
        assert str(ROOT) not in fresh and "/.venv/" not in fresh  # nothing of this machine


def bash_complete(*words: str) -> list[str]:
    """COMPREPLY of the sourced bash script for `words` (the last one being completed)."""
    script = (
        f"source {COMPLETIONS / 'mermin.bash'}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))\n'
        "_mermin_completion mermin\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(
        ["bash", "--norc", "-c", script, "bash", *words],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return res.stdout.split()


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (("mermin", "cap"), ["capture"]),
        (("mermin", "capture", "--for"), ["--format"]),
        (("mermin", "interfaces", "--js"), ["--json"]),
        (("mermin", "capture", "--attach", ""), ["auto", "tcx", "tc"]),
    ],
)
def test_bash_completes(words: tuple[str, ...], expected: list[str]) -> None:
    assert bash_complete(*words) == expected
