"""The DEX/UCS framer as a byte stream (vmc/dex/link.py): split anywhere, wrapped in noise, a bad
CRC then a good frame, DLE transparency; checked against the test's own CRC."""

from __future__ import annotations

from tests.dex_support import crc16_arc_bitwise
from vmc.dex.link import (
    DLE,
    ETB,
    ETX,
    SOH,
    STX,
    Control,
    Frame,
    Tokenizer,
    ack_for,
    encode_frame,
    split_blocks,
)

HANDSHAKE = b"HANDHELD01RR01L01"


def tokens(*chunks: bytes) -> list[object]:
    tokenizer = Tokenizer()
    return [token for chunk in chunks for token in tokenizer.feed(chunk)]


def test_a_frame_split_at_every_position_gives_one_frame() -> None:
    wire = b"\x05" + encode_frame(SOH, HANDSHAKE, ETX) + b"\x10\x31\x04"
    expected = [Control.ENQ, Frame(SOH, HANDSHAKE, ETX, True), Control.ACK1, Control.EOT]
    for cut in range(len(wire) + 1):
        assert tokens(wire[:cut], wire[cut:]) == expected, cut
    assert tokens(*[bytes([b]) for b in wire]) == expected


def test_noise_around_frames_is_skipped_and_a_bad_crc_is_reported() -> None:
    good = encode_frame(STX, b"ST*001*0001\r\n", ETB)
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    result = tokens(b"\x00\xff junk \x10\x7f", bytes(bad), b"\x41\x42", good, b"\x10\x30")
    assert result == [
        Frame(STX, b"ST*001*0001\r\n", ETB, False),
        Frame(STX, b"ST*001*0001\r\n", ETB, True),
        Control.ACK0,
    ]


def test_a_frame_broken_by_a_new_start_resyncs() -> None:
    broken = encode_frame(STX, b"ABCDEF", ETB)[:5]
    assert tokens(broken + encode_frame(STX, b"GH", ETX)) == [Frame(STX, b"GH", ETX, True)]


def test_dle_in_the_data_is_sent_twice_and_the_crc_covers_the_data_once() -> None:
    data = bytes([0x41, DLE, 0x42])
    wire = encode_frame(STX, data, ETX)
    assert wire[2:6] == bytes([0x41, DLE, DLE, 0x42])
    crc = crc16_arc_bitwise(data + bytes([ETX]))
    assert wire[-2:] == bytes([crc & 0xFF, crc >> 8])
    assert tokens(wire) == [Frame(STX, data, ETX, True)]


def test_blocks_and_acknowledgements_alternate_from_dle_one() -> None:
    assert [ack_for(i) for i in range(4)] == [
        Control.ACK1,
        Control.ACK0,
        Control.ACK1,
        Control.ACK0,
    ]
    assert split_blocks(b"x" * 500) == [b"x" * 245, b"x" * 245, b"x" * 10]
    assert split_blocks(b"") == [b""]
