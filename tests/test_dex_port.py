"""The RS-232 DEX port over a pty: a handheld written here (its own framing and CRC) performs
the DEX/UCS handshakes, receives the blocks, checks each CRC, reassembles the report and checks
its G85. A NAKed block comes again; a handheld gone silent mid-transfer leaves the port serving
the next one, and only a completed read resets the interim counters. Real journal in tmp_path."""

from __future__ import annotations

import asyncio
import os
import select
import tty
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.dex_support import check_g85_and_se, crc16_arc_bitwise, fill_journal, find, make_config
from tests.waiting import stop_task, wait_until
from vmc.dex.port import DexPort
from vmc.dex.session import RESPONSE_TIMEOUT_S
from vmc.journal import Journal

DLE, SOH, STX, ETX, EOT, ENQ, NAK, ETB = 0x10, 0x01, 0x02, 0x03, 0x04, 0x05, 0x15, 0x17
HANDHELD_ID = b"HANDHELD01"
#: Failure deadline for one read by the handheld: far above the port's 1 s response time.
READ_TIMEOUT_S = 8.0
#: The handheld's answer time the port allows in the drop test (1 s in service): the test
#: waits for the port to give a silent handheld up, 4 attempts of this each.
SHORT_RESPONSE_S = 0.2
ABORT_WAIT_S = 10.0


class Handheld:
    """A route technician's DEX/UCS master on the pty's master side (blocking; run it in a
    thread). Frames: DLE SOH|STX data DLE ETX|ETB, CRC-16/ARC over data + ETX|ETB, low first."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = bytearray()

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def read(self, count: int) -> bytes:
        while len(self.pending) < count:
            ready, _, _ = select.select([self.fd], [], [], READ_TIMEOUT_S)
            if not ready:
                raise AssertionError(f"nothing from the machine; have {bytes(self.pending)!r}")
            self.pending += os.read(self.fd, 4096)
        data = bytes(self.pending[:count])
        del self.pending[:count]
        return data

    def drain(self) -> None:
        """Forget what the machine sent while nobody listened."""
        while select.select([self.fd], [], [], 0.05)[0]:
            os.read(self.fd, 4096)
        self.pending.clear()

    def expect(self, data: bytes) -> None:
        got = self.read(len(data))
        assert got == data, (got, data)

    @staticmethod
    def frame(start: int, data: bytes, end: int) -> bytes:
        crc = crc16_arc_bitwise(data + bytes([end]))
        return bytes([DLE, start]) + data + bytes([DLE, end, crc & 0xFF, crc >> 8])

    def read_frame(self) -> tuple[int, bytes, int, bool]:
        """(start, data, end, crc ok)"""
        head = self.read(2)
        assert head[0] == DLE and head[1] in (SOH, STX), head
        data = bytearray()
        while True:
            byte = self.read(1)[0]
            if byte != DLE:
                data.append(byte)
                continue
            after = self.read(1)[0]
            if after == DLE:
                data.append(DLE)
                continue
            assert after in (ETX, ETB), after
            low, high = self.read(2)
            ok = (low | high << 8) == crc16_arc_bitwise(bytes(data) + bytes([after]))
            return head[1], bytes(data), after, ok

    def handshakes(self) -> bytes:
        """Both handshakes; the machine's communication id."""
        self.send(bytes([ENQ]))
        self.expect(b"\x100")
        self.send(self.frame(SOH, HANDHELD_ID + b"R" + b"R01L01", ETX))
        self.expect(b"\x101")
        self.send(bytes([EOT]))
        self.expect(bytes([ENQ]))
        self.send(b"\x100")
        start, data, end, ok = self.read_frame()
        assert (start, end, ok) == (SOH, ETX, True)
        assert data[:2] == b"00" and data[12:] == b"R01L01", data
        self.send(b"\x101")
        self.expect(bytes([EOT]))
        return data[2:12]

    def read_report(self, nak_block: int | None = None, stop_after: int | None = None) -> Read:
        read = Read(self.handshakes())
        self.expect(bytes([ENQ]))
        self.send(b"\x100")
        index = 0
        naked = False
        while True:
            start, data, end, ok = self.read_frame()
            assert start == STX and ok, (start, ok)
            if index == nak_block and not naked:
                naked = True
                read.naked.append(data)
                self.send(bytes([NAK]))
                continue
            read.blocks.append(data)
            if stop_after is not None and index == stop_after:
                return read  # the cable is pulled: no acknowledgement, nothing more
            self.send(b"\x101" if index % 2 == 0 else b"\x100")
            index += 1
            if end == ETX:
                self.expect(bytes([EOT]))
                return read


@dataclass
class Read:
    machine_id: bytes
    blocks: list[bytes] = field(default_factory=list)
    naked: list[bytes] = field(default_factory=list)

    @property
    def report(self) -> str:
        return b"".join(self.blocks).decode("ascii")


@dataclass
class Bench:
    port: DexPort
    journal: Journal
    handheld: Handheld


@pytest.fixture
async def bench(tmp_path: Path) -> AsyncIterator[Bench]:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    journal = await Journal.open(tmp_path)
    await fill_journal(journal)
    port = DexPort(path, make_config(tmp_path, port=path), journal)
    task = asyncio.create_task(port.run())
    try:
        await wait_until(lambda: port.is_open, "the DEX port open")
        yield Bench(port, journal, Handheld(master))
    finally:
        await stop_task(task)
        await journal.close()
        os.close(master)
        os.close(slave)


async def audit_reads(journal: Journal) -> list[dict[str, object]]:
    return [r.data for r in await journal.records(limit=10_000) if r.type == "audit_read"]


async def test_a_handheld_reads_the_report_in_blocks_and_the_read_resets(bench: Bench) -> None:
    bench.handheld.send(b"\x00garbage\x10\x7f")  # line noise before the handheld's ENQ
    read = await asyncio.to_thread(bench.handheld.read_report)
    assert read.machine_id == b"000DEX0042"
    assert len(read.blocks) >= 3 and all(len(b) <= 245 for b in read.blocks)
    report = read.report
    check_g85_and_se(report)
    assert find(report, "VA1") == ["650", "4", "650", "4"]
    assert find(report, "EA3")[0] == "1" and find(report, "EA3")[3] == "DEX_PORT"
    await wait_until(lambda: bench.port.resets == 1, "the read with reset")
    (audit,) = await audit_reads(bench.journal)
    assert audit["via"] == "dex_port"
    assert audit["interim"]["sales.value"] == 650  # type: ignore[index]
    again = await asyncio.to_thread(bench.handheld.read_report)
    assert find(again.report, "VA1") == ["650", "4", "0", "0"]


async def test_a_naked_block_is_sent_again(bench: Bench) -> None:
    read = await asyncio.to_thread(bench.handheld.read_report, 1)
    assert read.naked == [read.blocks[1]]
    check_g85_and_se(read.report)
    assert bench.port.sessions_completed == 1 and bench.port.sessions_aborted == 0


async def test_a_line_dropped_mid_transfer_leaves_the_port_serving(bench: Bench) -> None:
    bench.port.response_timeout_s = SHORT_RESPONSE_S
    partial = await asyncio.to_thread(bench.handheld.read_report, None, 0)
    assert len(partial.blocks) == 1
    await wait_until(lambda: bench.port.sessions_aborted == 1, "the session given up", ABORT_WAIT_S)
    bench.port.response_timeout_s = RESPONSE_TIMEOUT_S  # the next handheld gets the usual time
    assert await audit_reads(bench.journal) == []  # an incomplete read resets nothing
    await asyncio.to_thread(bench.handheld.drain)
    read = await asyncio.to_thread(bench.handheld.read_report)
    check_g85_and_se(read.report)
    assert find(read.report, "VA1") == ["650", "4", "650", "4"]
    await wait_until(lambda: bench.port.resets == 1, "the read with reset")
    assert len(await audit_reads(bench.journal)) == 1
