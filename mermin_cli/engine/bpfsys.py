"""The few bpf(2) commands BCC does not wrap (TCX links and queries, test runs, map reads),
and mmap of an mmapable array map.

`union bpf_attr` is built as a zeroed byte buffer with fields packed at their UAPI
offsets; the kernel requires every unused byte to be zero.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import platform
import struct
from dataclasses import dataclass

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_LOOKUP_BATCH = 24
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0

BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_F_BEFORE = 1 << 3
BPF_F_AFTER = 1 << 4
BPF_MPROG_MAX = 64  # most programs one TCX hook can hold
BPF_OBJ_NAME_LEN = 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@functools.cache
def syscall_number() -> int:
    """Number of the bpf(2) system call on this architecture."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf syscall number unknown for {platform.machine()}")
    return nr


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    nr = syscall_number()
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _found(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> bool:
    """Run a lookup-style command; False when the kernel has no such entry (ENOENT)."""
    try:
        _bpf(cmd, attr)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def _attr(size: int, *fields: tuple[int, str, int]) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(size)
    for offset, fmt, value in fields:
        struct.pack_into(fmt, buf, offset, value)
    return buf


def tcx_link_create(prog_fd: int, ifindex: int, egress: bool, first: bool = True) -> int:
    """Attach a SCHED_CLS program with a TCX link; returns the link fd (closing it detaches)."""
    attr = _attr(
        64,
        (0, "I", prog_fd),
        (4, "I", ifindex),
        (8, "I", BPF_TCX_EGRESS if egress else BPF_TCX_INGRESS),
        (12, "I", BPF_F_BEFORE if first else BPF_F_AFTER),
    )
    return _bpf(BPF_LINK_CREATE, attr)


def tcx_query(ifindex: int, egress: bool) -> tuple[list[int], int]:
    """Ids of the programs on a TCX hook in chain order, and the hook's revision."""
    ids = (ctypes.c_uint32 * BPF_MPROG_MAX)()
    attr = _attr(
        64,
        (0, "I", ifindex),
        (4, "I", BPF_TCX_EGRESS if egress else BPF_TCX_INGRESS),
        (16, "Q", ctypes.addressof(ids)),
        (24, "I", BPF_MPROG_MAX),
    )
    _bpf(BPF_PROG_QUERY, attr)
    count, revision = struct.unpack_from("I", attr, 24)[0], struct.unpack_from("Q", attr, 56)[0]
    return list(ids[:count]), int(revision)


def prog_info(prog_fd: int) -> ctypes.Array[ctypes.c_char]:
    """struct bpf_prog_info of a loaded program (id at offset 4, name at 64)."""
    info = ctypes.create_string_buffer(256)
    attr = _attr(
        16,
        (0, "I", prog_fd),
        (4, "I", len(info)),
        (8, "Q", ctypes.addressof(info)),
    )
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info


def prog_id(prog_fd: int) -> int:
    """Kernel id of a loaded program (what bpftool and `mermin interfaces` show)."""
    return int(struct.unpack_from("I", prog_info(prog_fd), 4)[0])


def _info_by_id(kernel_id: int) -> ctypes.Array[ctypes.c_char]:
    fd = _bpf(BPF_PROG_GET_FD_BY_ID, _attr(16, (0, "I", kernel_id)))
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


def prog_name(kernel_id: int) -> str:
    """Name of the loaded program with id `kernel_id` (as truncated by the kernel)."""
    name = _info_by_id(kernel_id).raw[64 : 64 + BPF_OBJ_NAME_LEN]
    return name.split(b"\0", 1)[0].decode(errors="replace")


def prog_ids() -> list[int]:
    """Kernel ids of every loaded eBPF program."""
    ids, attr = [], _attr(16)
    while _found(BPF_PROG_GET_NEXT_ID, attr):
        ids.append(struct.unpack_from("I", attr, 4)[0])
        struct.pack_into("I", attr, 0, ids[-1])  # next search starts after this one
    return ids


PROG_INFO_RUN_TIME = 192  # offset of run_time_ns (then run_cnt) in struct bpf_prog_info


def enable_run_time_stats() -> int:
    """Make the kernel count every program's runs and run time while the returned fd is
    open (kernel.bpf_stats_enabled without touching the sysctl; closing it ends them)."""
    return _bpf(BPF_ENABLE_STATS, _attr(8, (0, "I", BPF_STATS_RUN_TIME)))


def prog_run_time(kernel_id: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) the kernel counted for program `kernel_id` so far."""
    run_time, runs = struct.unpack_from("QQ", _info_by_id(kernel_id), PROG_INFO_RUN_TIME)
    return int(run_time), int(runs)


@dataclass(frozen=True)
class TestRun:
    """Result of BPF_PROG_TEST_RUN."""

    retval: int
    duration_ns: int  # mean per repetition, as measured by the kernel
    data_out: bytes = b""  # the frame after the program (with want_data_out)


def prog_test_run(
    prog_fd: int,
    data: bytes,
    repeat: int = 1,
    ifindex: int = 0,
    want_data_out: bool = False,
    ingress_ifindex: int = 0,
    cb0: int = 0,
) -> TestRun:
    """Run a loaded SCHED_CLS program on `data` (a whole frame) inside the kernel.

    `ifindex`: the device the skb is on (0: loopback); `ingress_ifindex`: the device it
    came in on (0: sent by this host), which is how flow.c tells ingress from egress;
    `cb0`: the skb's cb[0], an argument for the program."""
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(len(data) + 256 if want_data_out else 0)
    fields = [
        (0, "I", prog_fd),
        (8, "I", len(data)),
        (16, "Q", ctypes.addressof(data_in)),
        (32, "I", repeat),
    ]
    if want_data_out:
        fields += [(12, "I", len(data_out)), (24, "Q", ctypes.addressof(data_out))]
    ctx = None
    if ifindex or ingress_ifindex or cb0:
        # struct __sk_buff: ingress_ifindex, ifindex and cb[0] at offsets 36, 40 and 48.
        ctx = ctypes.create_string_buffer(192)
        struct.pack_into("III", ctx, 36, ingress_ifindex, ifindex, 0)
        struct.pack_into("I", ctx, 48, cb0)
        fields += [(40, "I", len(ctx)), (48, "Q", ctypes.addressof(ctx))]
    attr = _attr(80, *fields)
    _bpf(BPF_PROG_TEST_RUN, attr)
    retval, size_out = struct.unpack_from("iI", attr, 4)
    duration = struct.unpack_from("I", attr, 36)[0]
    return TestRun(retval, duration, data_out.raw[:size_out] if want_data_out else b"")


def map_lookup(map_fd: int, key: ctypes.Array[ctypes.c_char], value_size: int) -> bytes | None:
    """Read one entry; None if it does not exist."""
    return _map_op(BPF_MAP_LOOKUP_ELEM, map_fd, key, value_size)


def map_update(
    map_fd: int, key: ctypes.Array[ctypes.c_char], value: ctypes.Array[ctypes.c_char]
) -> None:
    """Create or overwrite one entry."""
    _bpf(BPF_MAP_UPDATE_ELEM, _map_attr(map_fd, key, value))


def array_read(map_fd: int, entries: int, value_size: int) -> bytes:
    """Every value of an array map (of a per-CPU one: `value_size` covers all CPUs), in one
    BPF_MAP_LOOKUP_BATCH."""
    keys = ctypes.create_string_buffer(4 * entries)
    values = ctypes.create_string_buffer(value_size * entries)
    out_batch = ctypes.create_string_buffer(4)
    attr = _attr(
        56,
        (8, "Q", ctypes.addressof(out_batch)),
        (16, "Q", ctypes.addressof(keys)),
        (24, "Q", ctypes.addressof(values)),
        (32, "I", entries),
        (36, "I", map_fd),
    )
    _found(BPF_MAP_LOOKUP_BATCH, attr)  # False (ENOENT) once the last entry is read
    read = struct.unpack_from("I", attr, 32)[0]
    if read != entries:
        raise OSError(errno.EIO, f"read {read} of {entries} array entries")
    return values.raw


def _map_op(
    cmd: int, map_fd: int, key: ctypes.Array[ctypes.c_char], value_size: int
) -> bytes | None:
    value = ctypes.create_string_buffer(value_size)
    return value.raw if _found(cmd, _map_attr(map_fd, key, value)) else None


_MAP_ATTR = struct.Struct("<I4xQQ8x")  # map_fd, key, value, flags: one pack per lookup


def _map_attr(
    map_fd: int, key: ctypes.Array[ctypes.c_char], value: ctypes.Array[ctypes.c_char]
) -> ctypes.Array[ctypes.c_char]:
    packed = _MAP_ATTR.pack(map_fd, ctypes.addressof(key), ctypes.addressof(value))
    return ctypes.create_string_buffer(packed, len(packed))


BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
# r0 = -1 (TC_ACT_UNSPEC); exit
PASS_THROUGH = struct.pack("<BBhi", 0xB7, 0, 0, -1) + struct.pack("<BBhi", 0x95, 0, 0, 0)
PROG_INFO_JITED_LEN = 16  # offset of jited_prog_len in struct bpf_prog_info


def load_pass_through_program(name: bytes = b"mermin_doctor") -> int:
    """Load a 2-instruction SCHED_CLS program (proves bpf(2) works); returns its fd."""
    insns = ctypes.create_string_buffer(PASS_THROUGH, len(PASS_THROUGH))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = _attr(
        128,
        (0, "I", BPF_PROG_TYPE_SCHED_CLS),
        (4, "I", len(PASS_THROUGH) // 8),
        (8, "Q", ctypes.addressof(insns)),
        (16, "Q", ctypes.addressof(license_)),
        (48, "15s", name[:15]),
    )
    return _bpf(BPF_PROG_LOAD, attr)


def prog_jited_len(prog_fd: int) -> int:
    """Size of the program's JIT image (0: the kernel interprets it)."""
    return int(struct.unpack_from("I", prog_info(prog_fd), PROG_INFO_JITED_LEN)[0])


def map_mmap(map_fd: int, size: int, writable: bool = False) -> mmap.mmap:
    """Shared mapping of an mmapable array map's values (`size` bytes, page-rounded)."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    length = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    return mmap.mmap(map_fd, length, mmap.MAP_SHARED, prot)
