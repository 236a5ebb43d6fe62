"""The BCC compile: /proc/kallsyms hidden from the compile thread only (see hide_kallsyms)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LOOK = """
import json, threading
from pathlib import Path
from mermin_cli.engine.compiler import hide_kallsyms

def kallsyms_mounts(mountinfo):
    return [line for line in mountinfo.splitlines() if line.split()[4] == "/proc/kallsyms"]

def look():
    return {
        "kallsyms_bytes": len(Path("/proc/kallsyms").read_bytes()),
        "kallsyms_mounts": len(kallsyms_mounts(Path("/proc/thread-self/mountinfo").read_text())),
    }

out = {}
def hide_and_look():
    out["hidden"] = hide_kallsyms()
    out["thread"] = look()
worker = threading.Thread(target=hide_and_look)
worker.start()
worker.join()
out["process"] = look()
print(json.dumps(out))
"""


def test_kallsyms_is_hidden_in_the_compile_thread_only() -> None:
    """Run where mounts propagate (a namespace of shared mounts, as under systemd): the
    bind must stay in the compile thread's namespace, not reach the process's."""
    host_before = Path("/proc/1/mountinfo").read_text()
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "shared", "--", sys.executable, "-c", LOOK],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["hidden"] is True
    assert seen["thread"] == {"kallsyms_bytes": 0, "kallsyms_mounts": 1}
    assert seen["process"]["kallsyms_mounts"] == 0
    assert seen["process"]["kallsyms_bytes"] > 10_000
    assert Path("/proc/1/mountinfo").read_text() == host_before


def test_without_cap_sys_admin_nothing_is_hidden_and_the_compile_works() -> None:
    script = (
        "import threading\n"
        "from pathlib import Path\n"
        "from mermin_cli.engine.compiler import compile_flow_c, hide_kallsyms\n"
        "out = []\n"
        "t = threading.Thread(target=lambda: out.append("
        "(hide_kallsyms(), len(Path('/proc/kallsyms').read_bytes()))))\n"
        "t.start(); t.join()\n"
        "compiled = compile_flow_c(1024, 16, False)\n"
        "print(out[0][0], out[0][1] > 0, type(compiled.bpf).__name__)\n"
    )
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", "--", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "BPF"]
