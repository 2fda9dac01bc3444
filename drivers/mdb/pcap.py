"""Write MDB exchanges to a pcap file in Wireshark's MDB format.

LINKTYPE_MDB (300). Each packet starts with a pseudo-header that Wireshark's
``epan/dissectors/packet-mdb.c`` reads: a version byte (0), an event byte (0xFF master to
peripheral, 0xFE peripheral to master, 0xFD bus reset) and, for peripheral to master only, the
peripheral's address byte. Then the MDB bytes: a command block with its CHK, a lone
ACK/RET/NAK, or a reply's data with its CHK.
"""

from __future__ import annotations

import enum
import struct
import threading
import time
from pathlib import Path
from typing import BinaryIO

from drivers.mdb.block import checksum

LINKTYPE_MDB = 300
PCAP_MAGIC = 0xA1B23C4D  # nanosecond-resolution pcap
PCAP_VERSION = (2, 4)
SNAPLEN = 0xFFFF
#: Flush to the OS after this many packets, so a crash loses little of the capture.
FLUSH_EVERY = 32


class Direction(enum.IntEnum):
    MASTER_TO_PERIPHERAL = 0xFF
    PERIPHERAL_TO_MASTER = 0xFE
    BUS_RESET = 0xFD


class PcapWriter:
    """Appends MDB packets to a pcap file; thread-safe, buffered."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._unflushed = 0
        self._file.write(
            struct.pack("<IHHiIII", PCAP_MAGIC, *PCAP_VERSION, 0, 0, SNAPLEN, LINKTYPE_MDB)
        )
        self._file.flush()

    def record(
        self,
        direction: Direction,
        payload: bytes,
        address: int = 0,
        add_checksum: bool = False,
    ) -> None:
        """``payload`` as on the wire; ``add_checksum`` appends CHK to a reply's data."""
        header = bytes((0, int(direction)))
        if direction is Direction.PERIPHERAL_TO_MASTER:
            header += bytes((address & 0xFF,))
        body = payload + bytes((checksum(payload),)) if add_checksum else payload
        packet = header + body
        now_ns = time.time_ns()
        with self._lock:
            if self._file is None:
                return
            self._file.write(
                struct.pack(
                    "<IIII",
                    now_ns // 1_000_000_000,
                    now_ns % 1_000_000_000,
                    len(packet),
                    len(packet),
                )
            )
            self._file.write(packet)
            self._unflushed += 1
            if self._unflushed >= FLUSH_EVERY:
                self._file.flush()
                self._unflushed = 0

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_pcap(path: Path | str) -> list[tuple[int, bytes]]:
    """Read back (timestamp_ns, packet) pairs: for tests and tools."""
    data = Path(path).read_bytes()
    magic, _vmaj, _vmin, _tz, _sig, _snap, linktype = struct.unpack_from("<IHHiIII", data, 0)
    if magic != PCAP_MAGIC or linktype != LINKTYPE_MDB:
        raise ValueError("not an MDB pcap written by vmc")
    out: list[tuple[int, bytes]] = []
    offset = 24
    while offset + 16 <= len(data):
        sec, nsec, incl, _orig = struct.unpack_from("<IIII", data, offset)
        offset += 16
        out.append((sec * 1_000_000_000 + nsec, data[offset : offset + incl]))
        offset += incl
    return out
