"""Environment checks: privileges, kernel, BPF support, headers, bpffs, memlock, BCC."""

from __future__ import annotations

import errno
import os
import platform
import resource
from pathlib import Path

from mermin_cli.doctor.context import Context
from mermin_cli.doctor.framework import Check, Outcome, failed, passed, warned
from mermin_cli.engine import bpfsys, privileges
from mermin_cli.engine.attach import kernel_has_tcx, resolve_mode
from mermin_cli.engine.compiler import kernel_version
from mermin_cli.errors import MerminError

MIN_KERNEL = (5, 8)  # the oldest kernel mermin supports
MEMCG_KERNEL = (5, 11)  # BPF memory charged to the cgroup, not RLIMIT_MEMLOCK
CAP_SYS_RESOURCE = 24
CAPABILITIES = {
    "CAP_NET_ADMIN": privileges.CAP_NET_ADMIN,
    "CAP_SYS_ADMIN": privileges.CAP_SYS_ADMIN,
    "CAP_BPF": privileges.CAP_BPF,
    "CAP_PERFMON": privileges.CAP_PERFMON,
    "CAP_SYS_RESOURCE": CAP_SYS_RESOURCE,
}
JIT_SYSCTL = Path("/proc/sys/net/core/bpf_jit_enable")
BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")
BPFFS = "/sys/fs/bpf"


def _privileges(ctx: Context) -> Outcome:
    caps = privileges.effective_capabilities()
    missing = privileges.missing_capabilities(caps)
    held = [name for name, bit in CAPABILITIES.items() if caps >> bit & 1] or ["none"]
    seen = f"uid {os.geteuid()}, effective capabilities of interest: {', '.join(held)}"
    if missing:
        return failed(
            f"missing {', '.join(missing)} ({seen}): the kernel refuses to load and attach"
            " the flow program",
            "run as root (sudo mermin ...); in a container use --privileged or add"
            " NET_ADMIN, BPF, PERFMON (SYS_ADMIN on kernels before 5.8)",
        )
    return passed(seen)


def _kernel(ctx: Context) -> Outcome:
    release, version = platform.release(), kernel_version()
    seen = f"Linux {release} ({platform.machine()})"
    if version < MIN_KERNEL:
        return failed(
            f"{seen}: mermin supports Linux 5.8 and newer",
            "upgrade the kernel to 5.8 or newer (6.6+ for TCX links)",
        )
    if ctx.options.attach_mode == "tcx" and not kernel_has_tcx():
        return failed(f"{seen}: --attach tcx needs Linux 6.6+", "use --attach tc or --attach auto")
    how = {"tcx": "TCX links", "tc": "clsact qdisc + cls_bpf filters"}
    mode = resolve_mode(ctx.options.attach_mode)
    return passed(f"{seen}; --attach {ctx.options.attach_mode} uses {how[mode]}")


def _bpf_syscall(ctx: Context) -> Outcome:
    try:
        fd = bpfsys.load_pass_through_program()
    except OSError as exc:
        fixes = {
            errno.ENOSYS: "use a kernel built with CONFIG_BPF_SYSCALL=y",
            errno.EINVAL: "use a kernel with CONFIG_NET_CLS_BPF and CONFIG_NET_SCH_INGRESS",
            errno.EPERM: "run as root; check that no LSM (SELinux, AppArmor, lockdown) or"
            " seccomp profile forbids bpf(2)",
        }
        return failed(
            f"bpf(BPF_PROG_LOAD) of a 2-instruction SCHED_CLS program failed: {exc.strerror}",
            fixes.get(exc.errno or 0, "check dmesg for the kernel's reason"),
        )
    try:
        prog_id = bpfsys.prog_id(fd)
    finally:
        os.close(fd)
    return passed(f"loaded a 2-instruction SCHED_CLS program (id {prog_id}) and unloaded it")


def _bpf_jit(ctx: Context) -> Outcome:
    fix = (
        "sysctl -w net.core.bpf_jit_enable=1 in the host's network namespace (persist it in"
        " /etc/sysctl.d/); kernels without CONFIG_BPF_JIT cannot"
    )
    fd = bpfsys.load_pass_through_program()
    try:
        jited = bpfsys.prog_jited_len(fd)
    finally:
        os.close(fd)
    if not jited:
        return warned(
            "a test program got no JIT image: the kernel interprets every packet's program"
            " (several times slower)",
            fix,
        )
    try:  # visible in the host's network namespace only
        debug = JIT_SYSCTL.read_text().strip() == "2"
    except OSError:
        debug = False
    if debug:
        return warned(
            "net.core.bpf_jit_enable = 2: JIT on, dumping every image to the kernel log", fix
        )
    return passed(f"a test program was JIT-compiled to {jited} bytes of {platform.machine()} code")


def _btf(ctx: Context) -> Outcome:
    if BTF_VMLINUX.is_file():
        return passed(f"{BTF_VMLINUX} present ({BTF_VMLINUX.stat().st_size // 1024} KiB)")
    return warned(
        f"{BTF_VMLINUX} is missing: mermin compiles against kernel headers and does not need"
        " it, but bpftool and CO-RE tools show less without it",
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    )


def _kernel_headers(ctx: Context) -> Outcome:
    from mermin_cli.engine.kernel_headers import find_header_tree

    try:
        tree = find_header_tree()
    except MerminError as exc:
        return failed(
            str(exc),
            "apt-get install linux-headers-$(uname -r), or any linux-headers package of the"
            " distribution (mermin merges them), or set BCC_KERNEL_SOURCE",
        )
    if tree.matches_kernel:
        return passed(f"{tree.path} (headers of the running kernel)")
    return passed(
        f"{tree.path} ({tree.origin}): not the running kernel's headers; the flow program"
        " needs only UAPI types, so BCC compiles against this tree (BCC_KERNEL_SOURCE)"
    )


def _bpffs(ctx: Context) -> Outcome:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, where, kind, opts, *_ = line.split()
        if kind == "bpf" and where == BPFFS:
            mode = "read-only" if "ro" in opts.split(",") else "writable"
            return passed(f"bpffs mounted at {BPFFS} ({mode}); mermin pins nothing there")
    return passed(
        f"no bpffs at {BPFFS}; mermin does not need it (it pins no maps or links: TCX links"
        " belong to the process, tc filters to the kernel)"
    )


def _memlock(ctx: Context) -> Outcome:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def show(limit: int) -> str:
        return "unlimited" if limit == resource.RLIM_INFINITY else f"{limit // 1024} KiB"

    seen = f"RLIMIT_MEMLOCK {show(soft)} (hard {show(hard)})"
    if kernel_version() >= MEMCG_KERNEL:
        return passed(f"{seen}; not used: Linux 5.11+ charges BPF memory to the memory cgroup")
    raisable = (
        hard == resource.RLIM_INFINITY
        or privileges.effective_capabilities() >> CAP_SYS_RESOURCE & 1
    )
    if soft == resource.RLIM_INFINITY or raisable:
        return passed(f"{seen}; BCC raises it to unlimited when a map does not fit")
    return warned(
        f"{seen} and it cannot be raised without CAP_SYS_RESOURCE: the flow table may not fit"
        " ('Operation not permitted' when loading)",
        "run as root, `ulimit -l unlimited`, or LimitMEMLOCK=infinity in the systemd unit",
    )


def _bcc(ctx: Context) -> Outcome:
    from mermin_cli.engine.compiler import import_bcc

    try:
        bcc = import_bcc()
    except MerminError as exc:
        return failed(str(exc), "apt-get install python3-bpfcc, then `make setup`")
    if not hasattr(bcc, "BPF"):
        return failed(
            f"the module 'bcc' at {bcc.__file__} is not BCC (the unrelated PyPI package?)",
            ".venv/bin/pip uninstall bcc, then `make setup` to link python3-bpfcc",
        )
    from bcc.version import __version__ as version

    return passed(f"BCC {version} from {Path(bcc.__file__).parent}")


CHECKS = (
    Check("env.privileges", "capabilities to load and attach eBPF programs", _privileges),
    Check("env.kernel", "kernel version: 5.8+, TCX (6.6+)", _kernel),
    Check(
        "env.bpf_syscall",
        "bpf(2) loads a trivial SCHED_CLS program",
        _bpf_syscall,
        requires=("env.privileges",),
    ),
    Check(
        "env.bpf_jit",
        "the BPF JIT compiles programs to machine code",
        _bpf_jit,
        requires=("env.bpf_syscall",),
    ),
    Check("env.btf", "kernel BTF at /sys/kernel/btf/vmlinux", _btf),
    Check("env.kernel_headers", "a kernel header tree BCC can compile against", _kernel_headers),
    Check("env.bpffs", "bpffs at /sys/fs/bpf (informational)", _bpffs),
    Check("env.memlock", "RLIMIT_MEMLOCK does not stop the maps from loading", _memlock),
    Check("env.bcc", "the bcc Python module (python3-bpfcc) is importable", _bcc),
)
