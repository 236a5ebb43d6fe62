"""Write a large synthetic pcap fast (struct templates, no per-packet objects).

`flows` concurrent flows (half TCP, half UDP, IPv4 10.203.x.y), packets round-robin over
them with 1 µs between packets, payload `size` bytes. Used by bench/offline.py.

    .venv/bin/python bench/pcapgen.py out.pcap --packets 1000000 --flows 1000
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

T0 = 1_700_000_000  # first packet's time, unix seconds
ETH = bytes.fromhex("02cb0000000202cb00000001") + b"\x08\x00"


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frame(flow: int, size: int) -> bytes:
    """Ethernet frame of flow `flow`: TCP (ACK) for even flows, UDP for odd ones."""
    src = bytes([10, 203, 100 + (flow >> 16 & 0x3F), flow >> 8 & 0xFF])
    dst = bytes([10, 203, 200, flow & 0xFF])
    sport, dport = 1024 + flow % 60000, 80 if flow % 2 == 0 else 53
    payload = bytes(size)
    if flow % 2 == 0:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x10, 65535, 0, 0) + payload
        proto = 6
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + size, 0) + payload
        proto = 17
    ident = flow & 0xFFFF
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, 0, 64, proto, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ETH + ip + l4


def write(path: Path, packets: int, flows: int, size: int = 64, start_s: int = T0) -> int:
    """Write the pcap; returns its size in bytes."""
    frames = [frame(f, size) for f in range(flows)]
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        rec = struct.Struct("<IIII")
        chunk = []
        for i in range(packets):
            f = frames[i % flows]
            usec = i
            chunk.append(rec.pack(start_s + usec // 1_000_000, usec % 1_000_000, len(f), len(f)))
            chunk.append(f)
            if len(chunk) >= 20000:
                out.write(b"".join(chunk))
                chunk.clear()
        out.write(b"".join(chunk))
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64, help="payload bytes per packet")
    args = ap.parse_args()
    size = write(args.path, args.packets, args.flows, args.size)
    print(f"{args.path}: {args.packets} packets, {args.flows} flows, {size} bytes")


if __name__ == "__main__":
    main()
