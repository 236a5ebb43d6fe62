"""Names shared by the code that attaches programs and the code that lists them.

Kept free of heavy imports: the CLI (and shell completion) imports it at start-up.
"""

from __future__ import annotations

from enum import Enum

NAME_PREFIX = "mermin_"  # our cls_bpf filters and BPF programs
TC_HANDLE = 0x6D72  # "mr": identifies our cls_bpf filters next to other tools' filters
PARENT = {False: 0xFFFFFFF2, True: 0xFFFFFFF3}  # clsact ingress / egress, by `egress`


class AttachMode(str, Enum):
    """How programs are hooked to TC: TCX links, clsact filters, or whichever fits."""

    auto = "auto"
    tcx = "tcx"
    tc = "tc"
