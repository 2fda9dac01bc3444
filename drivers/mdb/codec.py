"""The MDB word codec for links without a 9th bit (../shared/contracts/mdb-sim-link.md).

Every 9-bit word travels as the bytes Linux's termios PARMRK produces on a UART set to SPACE
parity with INPCK:

    mode 0, byte X != 0xFF  ->  X
    mode 0, byte 0xFF       ->  FF FF
    mode 1, byte X          ->  FF 00 X

The same encoding is used in both directions. This module is pure: no I/O, no clock. The
decoder is incremental (a marker may be split across reads) and holds at most two pending
bytes, so its buffer is bounded whatever arrives.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PARMRK_ESCAPE = 0xFF
PARMRK_MARK = 0x00


@dataclass(frozen=True, slots=True)
class Word:
    """One 9-bit MDB word: a data byte and the mode (9th) bit."""

    value: int
    mode: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.value <= 0xFF:
            raise ValueError(f"MDB word value out of range: {self.value}")


@dataclass(frozen=True, slots=True)
class Resync:
    """A framing error in the byte stream: the reader drops its partial block and resyncs.

    ``raw`` holds the bytes that could not be decoded (for the log).
    """

    raw: bytes


def encode_word(value: int, mode: bool = False) -> bytes:
    """Encode one word in the PARMRK byte form."""
    if mode:
        return bytes((PARMRK_ESCAPE, PARMRK_MARK, value))
    if value == PARMRK_ESCAPE:
        return b"\xff\xff"
    return bytes((value,))


def encode_words(words: Iterable[Word]) -> bytes:
    return b"".join(encode_word(w.value, w.mode) for w in words)


def encode_command(block: bytes) -> bytes:
    """VMC -> peripheral: the mode bit on the first word (address | command) only."""
    if not block:
        return b""
    return encode_word(block[0], True) + b"".join(encode_word(b) for b in block[1:])


def encode_reply(block: bytes) -> bytes:
    """Peripheral -> VMC: the mode bit on the last word (CHK, or a lone ACK/NAK) only."""
    if not block:
        return b""
    return b"".join(encode_word(b) for b in block[:-1]) + encode_word(block[-1], True)


class WordDecoder:
    """Incremental PARMRK decoder.

    ``feed`` returns the words decoded so far, with a ``Resync`` marker wherever the stream
    broke the encoding (``FF`` followed by anything but ``FF`` or ``00``). It never raises on
    input: garbage becomes ``Resync`` items. At most two bytes are held between calls.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = bytearray()

    @property
    def pending(self) -> bytes:
        """Bytes of a split marker still waiting for the rest (0 to 2 bytes)."""
        return bytes(self._pending)

    def reset(self) -> None:
        self._pending.clear()

    def feed(self, data: bytes) -> list[Word | Resync]:
        out: list[Word | Resync] = []
        pending = self._pending
        for byte in data:
            if not pending:
                if byte == PARMRK_ESCAPE:
                    pending.append(byte)
                else:
                    out.append(Word(byte, False))
            elif len(pending) == 1:
                if byte == PARMRK_ESCAPE:
                    out.append(Word(PARMRK_ESCAPE, False))
                    pending.clear()
                elif byte == PARMRK_MARK:
                    pending.append(byte)
                else:
                    out.append(Resync(bytes((PARMRK_ESCAPE, byte))))
                    pending.clear()
            else:
                out.append(Word(byte, True))
                pending.clear()
        return out
