"""The DEX/UCS link layer: control characters, frames and a tokenizer. Pure: no I/O.

A frame is ``DLE SOH|STX <payload> DLE ETX|ETB <CRC low> <CRC high>``; a DLE inside the
payload is sent twice (transparency). The CRC is CRC-16/ARC over the payload bytes and the
ending ETX or ETB, not the DLEs and not the SOH or STX (the public slave implementations agree
on this; docs/dex.md). Acknowledgements alternate ``DLE '0'`` and ``DLE '1'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Final

from vmc.dex.crc import crc16_arc

SOH: Final = 0x01
STX: Final = 0x02
ETX: Final = 0x03
EOT: Final = 0x04
ENQ: Final = 0x05
DLE: Final = 0x10
NAK: Final = 0x15
ETB: Final = 0x17
ACK0: Final = bytes((DLE, ord("0")))
ACK1: Final = bytes((DLE, ord("1")))

#: Data bytes per block. EVA-DTS gives 245 as the usual DEX/UCS block size; a handheld
#: reassembles blocks of any size, so a smaller one only costs a few more turn-arounds.
BLOCK_BYTES: Final = 245


class Control(Enum):
    """A single control token from the peer."""

    ENQ = "ENQ"
    EOT = "EOT"
    NAK = "NAK"
    ACK0 = "ACK0"
    ACK1 = "ACK1"


@dataclass(frozen=True)
class Frame:
    """A whole frame: ``start`` SOH or STX, ``end`` ETX or ETB, ``crc_ok`` as checked."""

    start: int
    payload: bytes
    end: int
    crc_ok: bool


Token = Control | Frame


def block_crc(payload: bytes, end: int) -> int:
    """The CRC of one frame: over the payload and its ending ETX or ETB."""
    return crc16_arc(payload + bytes((end,)))


def encode_frame(start: int, payload: bytes, end: int) -> bytes:
    """One frame as sent on the wire."""
    if start not in (SOH, STX) or end not in (ETX, ETB):
        raise ValueError("a frame starts with SOH or STX and ends with ETX or ETB")
    crc = block_crc(payload, end)
    stuffed = payload.replace(bytes((DLE,)), bytes((DLE, DLE)))
    return bytes((DLE, start)) + stuffed + bytes((DLE, end, crc & 0xFF, crc >> 8))


def ack_for(block_index: int) -> Control:
    """The acknowledgement the peer owes for the ``block_index``-th frame after ``DLE '0'``
    answered the ENQ: DLE '1' for the first, then '0', '1' ..."""
    return Control.ACK1 if block_index % 2 == 0 else Control.ACK0


def ack_bytes(control: Control) -> bytes:
    return ACK0 if control is Control.ACK0 else ACK1


def split_blocks(data: bytes, size: int = BLOCK_BYTES) -> list[bytes]:
    """The report cut into blocks (at least one, even for no data)."""
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


class _State(Enum):
    IDLE = 0
    AFTER_DLE = 1
    IN_FRAME = 2
    IN_FRAME_DLE = 3
    CRC = 4


class Tokenizer:
    """Bytes in, tokens out, split anywhere. Noise between tokens is skipped; a frame broken
    by a stray DLE sequence is dropped and the tokenizer resyncs on the next DLE SOH/STX."""

    MAX_PAYLOAD: Final = 4096  # far above any block or handshake: a runaway frame is noise

    def __init__(self) -> None:
        self._state = _State.IDLE
        self._start = 0
        self._end = 0
        self._payload = bytearray()
        self._crc = bytearray()
        self.skipped = 0  # noise bytes dropped, for the log

    def feed(self, data: bytes) -> Iterator[Token]:
        for byte in data:
            token = self._step(byte)
            if token is not None:
                yield token

    def _begin(self, start: int) -> None:
        self._state, self._start = _State.IN_FRAME, start
        self._payload.clear()

    def _step(self, byte: int) -> Token | None:
        match self._state:
            case _State.IDLE:
                if byte == DLE:
                    self._state = _State.AFTER_DLE
                elif byte == ENQ:
                    return Control.ENQ
                elif byte == EOT:
                    return Control.EOT
                elif byte == NAK:
                    return Control.NAK
                else:
                    self.skipped += 1
            case _State.AFTER_DLE:
                self._state = _State.IDLE
                if byte == ord("0"):
                    return Control.ACK0
                if byte == ord("1"):
                    return Control.ACK1
                if byte in (SOH, STX):
                    self._begin(byte)
                elif byte == DLE:
                    self._state = _State.AFTER_DLE
                else:
                    self.skipped += 2
            case _State.IN_FRAME:
                if byte == DLE:
                    self._state = _State.IN_FRAME_DLE
                elif len(self._payload) >= self.MAX_PAYLOAD:
                    self.skipped += len(self._payload)
                    self._state = _State.IDLE
                else:
                    self._payload.append(byte)
            case _State.IN_FRAME_DLE:
                if byte == DLE:
                    self._payload.append(DLE)
                    self._state = _State.IN_FRAME
                elif byte in (ETX, ETB):
                    self._end = byte
                    self._crc.clear()
                    self._state = _State.CRC
                elif byte in (SOH, STX):
                    self.skipped += len(self._payload)
                    self._begin(byte)
                else:
                    self.skipped += len(self._payload) + 2
                    self._state = _State.IDLE
            case _State.CRC:
                self._crc.append(byte)
                if len(self._crc) == 2:
                    self._state = _State.IDLE
                    payload = bytes(self._payload)
                    received = self._crc[0] | self._crc[1] << 8
                    ok = received == block_crc(payload, self._end)
                    return Frame(self._start, payload, self._end, ok)
        return None
