"""pcap capture of MDB exchanges in Wireshark's MDB format (LINKTYPE_MDB 300).

The pseudo-header checked here is the one Wireshark's ``epan/dissectors/packet-mdb.c`` reads:
version 0, an event byte (0xFF master to peripheral, 0xFE peripheral to master, 0xFD bus reset),
and for peripheral to master only the peripheral's address; then the MDB bytes with CHK.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from bench._peripheral import SETUP, SETUP_REPLY, MiniChangerSim
from drivers.mdb.block import reply_block
from drivers.mdb.link import StreamLink
from drivers.mdb.master import BusMaster, Priority, Timing
from drivers.mdb.pcap import (
    FLUSH_EVERY,
    LINKTYPE_MDB,
    PCAP_MAGIC,
    Direction,
    PcapWriter,
    read_pcap,
)
from hil.sim.bus import SimBus

TO_PERIPHERAL = b"\x00\xff"
TO_MASTER = b"\x00\xfe"


def global_header(path: Path) -> tuple[int, ...]:
    return struct.unpack_from("<IHHiIII", path.read_bytes(), 0)


def test_global_header(tmp_path: Path) -> None:
    path = tmp_path / "empty.pcap"
    PcapWriter(path).close()
    magic, major, minor, zone, sigfigs, snaplen, linktype = global_header(path)
    assert magic == PCAP_MAGIC == 0xA1B23C4D  # nanosecond timestamps
    assert (major, minor) == (2, 4)
    assert zone == sigfigs == 0
    assert snaplen >= 36 + 3
    assert linktype == LINKTYPE_MDB == 300
    assert path.stat().st_size == 24
    assert read_pcap(path) == []


def test_pseudo_headers_and_payloads(tmp_path: Path) -> None:
    path = tmp_path / "exchange.pcap"
    before = time.time_ns()
    writer = PcapWriter(path)
    writer.record(Direction.MASTER_TO_PERIPHERAL, bytes.fromhex("13 00 00 0A 00 06 23"))
    writer.record(Direction.PERIPHERAL_TO_MASTER, bytes.fromhex("05 00 0A"), 0x10, True)
    writer.record(Direction.MASTER_TO_PERIPHERAL, b"\x00")
    writer.record(Direction.PERIPHERAL_TO_MASTER, b"\x00", 0x08)
    writer.record(Direction.BUS_RESET, b"")
    writer.close()
    writer.close()  # idempotent
    writer.record(Direction.MASTER_TO_PERIPHERAL, b"\x00")  # after close: ignored
    after = time.time_ns()
    packets = read_pcap(path)
    assert [p for _ts, p in packets] == [
        TO_PERIPHERAL + bytes.fromhex("13 00 00 0A 00 06 23"),
        TO_MASTER + b"\x10" + bytes.fromhex("05 00 0A 0F"),  # CHK appended
        TO_PERIPHERAL + b"\x00",
        TO_MASTER + b"\x08\x00",
        b"\x00\xfd",
    ]
    stamps = [ts for ts, _p in packets]
    assert before <= stamps[0] and stamps[-1] <= after
    assert stamps == sorted(stamps)


def test_record_headers_give_the_packet_length(tmp_path: Path) -> None:
    path = tmp_path / "lengths.pcap"
    with_data = bytes(range(1, 36))
    writer = PcapWriter(path)
    writer.record(Direction.PERIPHERAL_TO_MASTER, with_data, 0x30, True)
    writer.close()
    data = path.read_bytes()
    _sec, nsec, incl, orig = struct.unpack_from("<IIII", data, 24)
    assert nsec < 1_000_000_000
    assert incl == orig == 3 + 36
    assert data[40:] == TO_MASTER + b"\x30" + reply_block(with_data)


def test_capture_is_flushed_while_running(tmp_path: Path) -> None:
    """A daemon that dies mid-run leaves at most FLUSH_EVERY packets unwritten."""
    path = tmp_path / "running.pcap"
    writer = PcapWriter(path)
    try:
        for _ in range(FLUSH_EVERY + 5):
            writer.record(Direction.MASTER_TO_PERIPHERAL, b"\x0b\x0b")
        assert len(read_pcap(path)) >= FLUSH_EVERY
    finally:
        writer.close()
    assert len(read_pcap(path)) == FLUSH_EVERY + 5


def test_read_pcap_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "ethernet.pcap"
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    with pytest.raises(ValueError):
        read_pcap(path)


async def test_master_records_every_exchange(tmp_path: Path) -> None:
    path = tmp_path / "bus.pcap"
    sim = MiniChangerSim()
    with SimBus.on_pty([sim]) as bus:
        master = BusMaster(StreamLink(bus.port), timing=Timing(slack_s=0.03), pcap=PcapWriter(path))
        master.start()
        try:
            await master.request(0x08, priority=Priority.RESET)
            await master.request(0x0B, priority=Priority.POLL)
            sim.faults.bad_checksum = 1
            assert (await master.request(SETUP.addr_cmd(0x08))).data == SETUP_REPLY
        finally:
            await master.close()  # closes the capture too
    packets = [p for _ts, p in read_pcap(path)]
    assert packets == [
        TO_PERIPHERAL + bytes.fromhex("08 08"),  # RESET
        TO_MASTER + bytes.fromhex("08 00"),  # its lone ACK
        TO_PERIPHERAL + bytes.fromhex("0B 0B"),  # POLL
        TO_MASTER + bytes.fromhex("08 0B 0B"),  # JUST RESET, CHK
        TO_PERIPHERAL + b"\x00",  # our ACK
        TO_PERIPHERAL + bytes.fromhex("09 09"),  # SETUP
        TO_PERIPHERAL + b"\xaa",  # RET after the bad CHK (the bad reply itself is not kept)
        TO_MASTER + b"\x08" + reply_block(SETUP_REPLY),
        TO_PERIPHERAL + b"\x00",
    ]


def test_wireshark_dissects_the_capture(tmp_path: Path) -> None:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed")
    path = tmp_path / "dissect.pcap"
    writer = PcapWriter(path)
    writer.record(Direction.MASTER_TO_PERIPHERAL, bytes.fromhex("13 00 00 0A 00 06 23"))
    writer.record(Direction.PERIPHERAL_TO_MASTER, bytes.fromhex("05 00 0A"), 0x10, True)
    writer.record(Direction.MASTER_TO_PERIPHERAL, b"\x00")
    writer.close()
    out = subprocess.run(
        [tshark, "-r", str(path), "-T", "fields", "-e", "mdb.event", "-e", "mdb.addr"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split("\n")
    assert out[0].startswith("0xff") and out[1].startswith("0xfe")
    assert "0x10" in out[1]
