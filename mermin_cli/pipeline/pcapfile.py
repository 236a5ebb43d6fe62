"""Capture files as windows of classic pcap records, the form the kernel reads offline.

A classic pcap file in this host's byte order with Ethernet frames (what tcpdump writes)
is handed over as it lies: `Stream` reads it (gunzipped when compressed, or from standard
input) and the kernel walks its records itself, so no Python runs per packet. Any other
input (pcapng, other link types, the other byte order) is read by libpcap (through
ctypes: its formats and its exact error messages for damaged files) and `Stager` writes
each packet into a window as such a record: link types other than Ethernet behind a fake
Ethernet header (zero MACs) whose EtherType the kernel reads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gzip
import io
import os
import struct
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from mermin_cli.errors import MerminError, UsageError

ETH_HLEN = 14
RECORD = struct.Struct("=IIII")  # sec, frac, caplen, len: the kernel's struct pcap_rec
# Bytes of a frame staged: every header bpf/flow.c reads (Ethernet, two VLAN tags, IPv6 with
# extension headers or IPv4 with options, the transport header) with room to spare.
STAGED_BYTES = 256
MAX_CAPLEN = 0x40000  # REC_MAX_CAPLEN in flow.c, and libpcap's limit: longer is damage
FILE_HEADER = struct.Struct("=IHHiIII")  # magic, version, zone, sigfigs, snaplen, linktype
MAGIC_US, MAGIC_NS = 0xA1B2C3D4, 0xA1B23C4D
GZIP_MAGIC = b"\x1f\x8b"

PCAP_TSTAMP_PRECISION_NANO = 1
PCAP_ERRBUF_SIZE = 256
PCAP_ERROR_BREAK = -2  # pcap_next_ex: end of the savefile

# libpcap DLT_* values (pcap_datalink() maps file LINKTYPE_* values to these).
DLT_NULL, DLT_EN10MB, DLT_RAW, DLT_LOOP = 0, 1, 12, 108
DLT_LINUX_SLL, DLT_IPV4, DLT_IPV6, DLT_LINUX_SLL2 = 113, 228, 229, 276
LINK_NAMES = {
    DLT_NULL: "BSD loopback",
    DLT_EN10MB: "Ethernet",
    DLT_RAW: "raw IP",
    DLT_LOOP: "OpenBSD loopback",
    DLT_LINUX_SLL: "Linux cooked (SLL)",
    DLT_IPV4: "raw IPv4",
    DLT_IPV6: "raw IPv6",
    DLT_LINUX_SLL2: "Linux cooked v2 (SLL2)",
}
# Link-layer header length of the link types carried behind a fake Ethernet header.
LINK_HEADER = {
    DLT_RAW: 0,
    DLT_IPV4: 0,
    DLT_IPV6: 0,
    DLT_NULL: 4,
    DLT_LOOP: 4,
    DLT_LINUX_SLL: 16,
    DLT_LINUX_SLL2: 20,
}
ETHERTYPE_OF_IP_VERSION = {4: b"\x08\x00", 6: b"\x86\xdd"}


class Damaged(Exception):
    """The input ends early or is corrupt; the message says how."""


class _Timeval(ctypes.Structure):
    _fields_ = (("sec", ctypes.c_long), ("frac", ctypes.c_long))  # ns with NANO precision


class _PktHdr(ctypes.Structure):
    _fields_ = (("ts", _Timeval), ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32))


class Stream:
    """The capture's bytes: a file or standard input (`-`), gunzipped when compressed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = "stdin" if path == "-" else Path(path).name
        self.label = "standard input" if path == "-" else path
        self.total: int | None = None  # bytes to read, for the progress bar
        if path == "-":
            self.raw: io.BufferedReader = sys.stdin.buffer  # type: ignore[assignment]
        else:
            try:
                self.raw = open(path, "rb")  # noqa: SIM115 (closed by close())
                self.total = os.path.getsize(path)
            except OSError as exc:
                raise UsageError(
                    f"Cannot read {path}: {exc.strerror or exc}; give an existing pcap or "
                    "pcapng file (or - for standard input)."
                ) from exc
        self.compressed = self.raw.peek(2)[:2] == GZIP_MAGIC
        self._data: io.BufferedIOBase = (
            gzip.GzipFile(fileobj=self.raw, mode="rb") if self.compressed else self.raw
        )
        self._consumed = 0  # bytes read from a stream that cannot tell()

    def read1(self, size: int) -> bytes:
        """Up to `size` bytes (b"" at the end); raises Damaged for a corrupt gzip stream.
        What was decompressed before the damage is returned by the calls before."""
        try:
            chunk = self._data.read1(size)
        except (OSError, EOFError, zlib.error) as exc:
            raise Damaged(f"gzip: {exc}" if self.compressed else str(exc)) from exc
        self._consumed += len(chunk)
        return chunk

    def readinto(self, view: memoryview) -> int:
        """Fill `view` as far as one read goes; 0 at the end. A plain file is read straight
        into it (no intermediate bytes object)."""
        if self.compressed:
            chunk = self.read1(len(view))
            view[: len(chunk)] = chunk
            return len(chunk)
        count = self.raw.readinto1(view)  # at most one read: a pipe hands on what it has
        self._consumed += count
        return count

    def read_header(self) -> bytes:
        """The first bytes, enough for a pcap file header (fewer if the input is shorter)."""
        head = b""
        while len(head) < FILE_HEADER.size and (chunk := self.read1(FILE_HEADER.size - len(head))):
            head += chunk
        return head

    def position(self) -> int:
        """Bytes of the file consumed so far (compressed bytes for gzip input)."""
        return self.raw.tell() if self.raw.seekable() else self._consumed

    def close(self) -> None:
        if self.raw is not sys.stdin.buffer:
            self.raw.close()


class Classic(NamedTuple):
    """A classic pcap file the kernel can walk as it lies."""

    frac_ns: int  # ns per unit of the records' second fraction


def classic_header(head: bytes) -> Classic | None:
    """The file's format if the kernel reads it directly: classic pcap in this host's byte
    order with Ethernet frames; None for anything else (libpcap reads that)."""
    if len(head) < FILE_HEADER.size:
        return None
    magic, _major, _minor, _zone, _sigfigs, _snaplen, linktype = FILE_HEADER.unpack(head)
    if magic not in (MAGIC_US, MAGIC_NS) or linktype & 0xFFFF != DLT_EN10MB:
        return None
    return Classic(1000 if magic == MAGIC_US else 1)


class CaptureFile:
    """An open capture: its bytes, and libpcap's handle unless the kernel walks them as
    they lie (`classic`). Opening reads the file header, so a missing file, one that is not
    a capture and an unsupported link type are reported before anything is compiled."""

    def __init__(self, path: str) -> None:
        self.stream = Stream(path)
        self.source: LibpcapSource | None = None
        try:
            try:
                head = self.stream.read_header()
            except Damaged as exc:
                raise MerminError(
                    f"{self.stream.label} is truncated or damaged ({exc}); 0 packets were read."
                ) from exc
            self.classic = classic_header(head)
            if self.classic is None:
                self.source = LibpcapSource(self.stream, head)
        except BaseException:
            self.stream.close()
            raise

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        self.stream.close()


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fdopen.restype = ctypes.c_void_p
    libc.fdopen.argtypes = (ctypes.c_int, ctypes.c_char_p)
    libc.ftell.restype = ctypes.c_long
    libc.ftell.argtypes = (ctypes.c_void_p,)
    return libc


def _libpcap() -> ctypes.CDLL:
    """libpcap with the prototypes we call (ctypes' defaults would truncate pointers)."""
    name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise MerminError(
            "Reading capture files needs libpcap; install it (Debian/Ubuntu: "
            "apt-get install libpcap0.8) and retry."
        ) from exc
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    for fn, res, args in (
        ("pcap_open_offline_with_tstamp_precision", vp, (cp, ctypes.c_uint, cp)),
        ("pcap_fopen_offline_with_tstamp_precision", vp, (vp, ctypes.c_uint, cp)),
        ("pcap_next_ex", ctypes.c_int, (vp, ctypes.POINTER(vp), ctypes.POINTER(vp))),
        ("pcap_datalink", ctypes.c_int, (vp,)),
        ("pcap_datalink_val_to_name", cp, (ctypes.c_int,)),
        ("pcap_geterr", cp, (vp,)),
        ("pcap_file", vp, (vp,)),
        ("pcap_close", None, (vp,)),
    ):
        func = getattr(lib, fn)
        func.restype, func.argtypes = res, args
    return lib


class LibpcapSource:
    """A capture libpcap reads: by path for a plain file, else through a pipe that a
    thread fills from `stream` (the bytes already read from it first)."""

    def __init__(self, stream: Stream, head: bytes) -> None:
        self.stream = stream
        self.lib = _libpcap()
        self._libc = _libc()
        self._feeder: _Feeder | None = None
        errbuf = ctypes.create_string_buffer(PCAP_ERRBUF_SIZE)
        if stream.path != "-" and not stream.compressed:
            self.handle = self.lib.pcap_open_offline_with_tstamp_precision(
                os.fsencode(stream.path), PCAP_TSTAMP_PRECISION_NANO, errbuf
            )
        else:
            self._feeder = _Feeder(stream, head)
            file = self._libc.fdopen(self._feeder.read_fd, b"rb")
            if not file:
                raise MerminError(f"Cannot read {stream.label}: fdopen failed.")
            self.handle = self.lib.pcap_fopen_offline_with_tstamp_precision(
                file, PCAP_TSTAMP_PRECISION_NANO, errbuf
            )
        if not self.handle:
            self._fail_open(errbuf.value.decode(errors="replace"))
        self.dlt = int(self.lib.pcap_datalink(self.handle))
        if self.dlt != DLT_EN10MB and self.dlt not in LINK_HEADER:
            name = self.lib.pcap_datalink_val_to_name(self.dlt) or b"unknown"
            self.close()
            raise MerminError(
                f"{stream.label} has link type {name.decode()} ({self.dlt}), which mermin "
                "cannot read; it reads Ethernet, raw IP, Linux cooked (SLL, SLL2) and "
                "loopback captures."
            )

    def _fail_open(self, reason: str) -> None:
        what = "is not a pcap or pcapng file"
        if self._feeder is not None:
            self._feeder.close()
            if self._feeder.error:
                what, reason = "is truncated or damaged", self._feeder.error
        raise MerminError(f"{self.stream.label} {what} ({reason}); 0 packets were read.")

    def position(self) -> int:
        if self._feeder is not None:
            return self.stream.position()
        return max(0, int(self._libc.ftell(self.lib.pcap_file(self.handle))))

    def error(self) -> str:
        """Why reading stopped early (libpcap's message, or the decompressor's)."""
        if self._feeder is not None:
            self._feeder.join(timeout=0.2)  # it may still be blocked on a full pipe
            if self._feeder.error:
                return self._feeder.error
        return (self.lib.pcap_geterr(self.handle) or b"read error").decode(errors="replace")

    def feeder_error(self) -> str | None:
        """A decompression error that libpcap saw only as a clean end of input."""
        if self._feeder is None:
            return None
        self._feeder.join()
        return self._feeder.error

    def stage_all(self, stager: Stager) -> str | None:
        """Stage every packet, then run what is left; returns libpcap's error if the file
        ends early, else None."""
        next_ex, handle, add = self.lib.pcap_next_ex, self.handle, stager.add
        hdr_ptr, data_ptr = ctypes.c_void_p(), ctypes.c_void_p()
        hdr_ref, data_ref = ctypes.byref(hdr_ptr), ctypes.byref(data_ptr)
        hdr = _PktHdr()
        hdr_at: int | None = None
        while (ret := next_ex(handle, hdr_ref, data_ref)) == 1:
            if hdr_ptr.value != hdr_at:  # libpcap reuses one header struct for a savefile
                hdr_at = hdr_ptr.value
                hdr = _PktHdr.from_address(hdr_at or 0)
            add(hdr.ts.sec, hdr.ts.frac, data_ptr.value, hdr.caplen, hdr.len)
        stager.finish()
        return None if ret == PCAP_ERROR_BREAK else self.error()

    def close(self) -> None:
        if self.handle:
            self.lib.pcap_close(self.handle)  # closes the FILE and the pipe's read end
            self.handle = None
        if self._feeder is not None:
            self._feeder.close()


class _Feeder(threading.Thread):
    """Copies a stream's bytes (`head` first) into a pipe that libpcap reads."""

    CHUNK = 1 << 20

    def __init__(self, stream: Stream, head: bytes) -> None:
        super().__init__(name="mermin-read", daemon=True)
        self.stream = stream
        self.head = head
        self.read_fd, self._write_fd = os.pipe()
        self.error: str | None = None
        self.start()

    def run(self) -> None:
        chunk = self.head
        try:
            while chunk:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._write_fd, view) :]
                chunk = self.stream.read1(self.CHUNK)
        except BrokenPipeError:
            pass  # the reader stopped early
        except Damaged as exc:
            self.error = str(exc)
        finally:
            os.close(self._write_fd)

    def close(self) -> None:
        self.join(timeout=5)


class Stager:
    """Packets written as records into a window buffer: a frame's first STAGED_BYTES at
    most (every header the kernel reads) and its length on the wire, so a window holds
    many records whatever the packet size. `flush(address, size)` runs a full window."""

    def __init__(
        self, window: int, flush: Callable[[int, int], object], dlt: int = DLT_EN10MB
    ) -> None:
        self.window = window
        self.flush = flush
        self.buf = ctypes.create_string_buffer(window)
        self.base = ctypes.addressof(self.buf)
        self.view = memoryview(self.buf).cast("B")
        self.pos = 0
        self.grow = ETH_HLEN - LINK_HEADER.get(dlt, ETH_HLEN)  # frame length - packet length
        self.rewrite = self._rewriter(dlt) if dlt != DLT_EN10MB else None
        self.room = min(STAGED_BYTES, window - RECORD.size - self.grow)  # packet bytes kept

    def add(self, sec: int, frac: int, src: int, caplen: int, wire: int) -> None:
        """Stage the packet at address `src` (`caplen` bytes captured, `wire` on the wire)."""
        size = min(caplen, self.room)
        grow, pos = self.grow, self.pos
        if pos + RECORD.size + size + grow > self.window:
            self.flush(self.base, pos)
            pos = 0
        frame = pos + RECORD.size
        if self.rewrite is None:
            ctypes.memmove(self.base + frame, src, size)
        else:
            self.rewrite(frame, src, size)
        stored = max(size + grow, 0)  # negative: shorter than its own link header
        RECORD.pack_into(self.buf, pos, sec, frac, stored, max(wire + grow, 0))
        self.pos = frame + stored

    def add_classic(self, src: memoryview, pos: int, end: int, stop: int) -> tuple[int, int]:
        """Stage the classic pcap records (Ethernet) lying in `src` from `pos`, while they
        start before `stop` and end by `end`; returns where it stopped and how many. The
        same as add() per record, with the copy from memory to memory."""
        view, buf, base, flush = self.view, self.buf, self.base, self.flush
        room, window, out, records = self.room, self.window, self.pos, 0
        unpack, pack, head = RECORD.unpack_from, RECORD.pack_into, RECORD.size
        while pos + head <= stop:
            sec, frac, caplen, wire = unpack(src, pos)
            after = pos + head + caplen
            if after > end or caplen > MAX_CAPLEN:
                break
            size = caplen if caplen < room else room
            if out + head + size > window:
                flush(base, out)
                out = 0
            pack(buf, out, sec, frac, size, wire)
            view[out + head : out + head + size] = src[pos + head : pos + head + size]
            out += head + size
            pos = after
            records += 1
        self.pos = out
        return pos, records

    def finish(self) -> None:
        """Run what is staged."""
        if self.pos:
            self.flush(self.base, self.pos)
            self.pos = 0

    def _rewriter(self, dlt: int) -> Callable[[int, int, int], None]:
        """For a non-Ethernet link type: copy a packet to `frame` behind a fake Ethernet
        header (zero MACs, the right EtherType). A link header longer than Ethernet's is
        copied over the record header's bytes, which are written afterwards."""
        strip = LINK_HEADER[dlt]
        view, base, memmove = self.view, self.base, ctypes.memmove
        zero_macs = bytes(12)

        def by_ip_version(frame: int, src: int, size: int) -> None:
            memmove(base + frame + ETH_HLEN - strip, src, size)
            view[frame : frame + 12] = zero_macs
            ether = ETHERTYPE_OF_IP_VERSION.get(view[frame + ETH_HLEN] >> 4, b"\0\0")
            view[frame + 12 : frame + 14] = ether

        def sll(frame: int, src: int, size: int) -> None:  # protocol lands on the EtherType
            memmove(base + frame + ETH_HLEN - strip, src, size)
            view[frame : frame + 12] = zero_macs

        def sll2(frame: int, src: int, size: int) -> None:  # protocol field is the first one
            memmove(base + frame + ETH_HLEN - strip, src, size)
            view[frame + 12 : frame + 14] = view[frame - 6 : frame - 4]
            view[frame : frame + 12] = zero_macs

        return {DLT_LINUX_SLL: sll, DLT_LINUX_SLL2: sll2}.get(dlt, by_ip_version)
