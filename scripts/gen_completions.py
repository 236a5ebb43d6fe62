"""Write the bash, zsh and fish completion scripts of `mermin` into completions/.

The scripts are Typer's, exactly what `mermin --show-completion SHELL` prints: at each Tab
they ask the `mermin` on PATH for candidates (`_MERMIN_COMPLETE=complete_<shell>`), so new
commands and options complete without regenerating. Regenerate when Typer changes them.

Usage: scripts/gen_completions.py [OUTPUT_DIR]   (default: completions/ of this checkout)
"""

from __future__ import annotations

import sys
from pathlib import Path

from typer._completion_shared import get_completion_script

ROOT = Path(__file__).resolve().parents[1]
PROG = "mermin"  # the console script ([project.scripts]); Typer derives the variable from it
COMPLETE_VAR = "_MERMIN_COMPLETE"
FILES = {"bash": "mermin.bash", "zsh": "_mermin", "fish": "mermin.fish"}


def render(shell: str) -> str:
    """The completion script for `shell`, as Typer's `--show-completion` renders it."""
    return get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "completions"
    out.mkdir(parents=True, exist_ok=True)
    for shell, name in FILES.items():
        (out / name).write_text(render(shell))
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
