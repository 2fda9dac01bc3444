"""MDB blocks: address/command byte, data, CHK; the ACK/RET/NAK control words; 36-byte limit.

Pure: no I/O, no clock. Two framers turn decoded words into blocks:

* ``ReplyFramer`` (VMC side) reads peripheral replies, which end at their mode-bit word.
* ``CommandFramer`` (peripheral side, used by the simulators) reads VMC command blocks, which
  start at their mode-bit word and whose length the device's command table knows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from drivers.errors import BlockTooLong, ChecksumError, FramingError
from drivers.mdb.codec import Resync, Word

ACK = 0x00
RET = 0xAA
NAK = 0xFF

#: MDB 4.2 §2.2: a block is at most 36 bytes including CHK.
MAX_BLOCK_LEN = 36

ADDRESS_MASK = 0xF8
COMMAND_MASK = 0x07


def checksum(data: bytes) -> int:
    """CHK: the sum of every preceding byte of the block, modulo 256."""
    return sum(data) & 0xFF


def command_block(addr_cmd: int, data: bytes = b"") -> bytes:
    """A VMC command block: address|command, data, CHK."""
    block = bytes((addr_cmd,)) + data
    if len(block) + 1 > MAX_BLOCK_LEN:
        raise BlockTooLong(f"command block of {len(block) + 1} bytes", block)
    return block + bytes((checksum(block),))


def reply_block(data: bytes) -> bytes:
    """A peripheral data reply: data, CHK."""
    if not data:
        raise FramingError("a data reply needs at least one byte")
    if len(data) + 1 > MAX_BLOCK_LEN:
        raise BlockTooLong(f"reply block of {len(data) + 1} bytes", data)
    return data + bytes((checksum(data),))


def address_of(addr_cmd: int) -> int:
    return addr_cmd & ADDRESS_MASK


def split_checked(block: bytes) -> bytes:
    """Check a block's CHK and return what precedes it."""
    if len(block) < 2:
        raise FramingError("block too short for data and CHK", block)
    if len(block) > MAX_BLOCK_LEN:
        raise BlockTooLong(f"block of {len(block)} bytes", block)
    if checksum(block[:-1]) != block[-1]:
        raise ChecksumError(f"CHK 0x{block[-1]:02X}, expected 0x{checksum(block[:-1]):02X}", block)
    return block[:-1]


# --- what the VMC reads -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AckReply:
    """The peripheral's lone ACK (mode bit set)."""


@dataclass(frozen=True, slots=True)
class NakReply:
    """The peripheral's lone NAK (mode bit set): it could not take the command."""


@dataclass(frozen=True, slots=True)
class DataReply:
    """A peripheral data block whose CHK was good; ``data`` excludes CHK."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BadReply:
    """A reply that ended (mode-bit word seen) but is not valid: bad CHK, too long, garbage."""

    error: FramingError


ReplyEvent = AckReply | NakReply | DataReply | BadReply


class ReplyFramer:
    """Turns decoded words from a peripheral into replies.

    A reply ends at its mode-bit word. Words beyond 36 are dropped and the reply reported bad
    when it ends, so the buffer is bounded.
    """

    __slots__ = ("_buf", "_overflow")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._overflow = False

    def reset(self) -> None:
        self._buf.clear()
        self._overflow = False

    @property
    def in_progress(self) -> bool:
        return bool(self._buf) or self._overflow

    def feed(self, items: Iterable[Word | Resync]) -> list[ReplyEvent]:
        out: list[ReplyEvent] = []
        for item in items:
            if isinstance(item, Resync):
                if self._buf or self._overflow:
                    out.append(BadReply(FramingError("framing error inside a reply", item.raw)))
                self.reset()
                continue
            if len(self._buf) < MAX_BLOCK_LEN:
                self._buf.append(item.value)
            else:
                self._overflow = True
            if item.mode:
                out.append(self._finish())
        return out

    def _finish(self) -> ReplyEvent:
        block = bytes(self._buf)
        overflow = self._overflow
        self.reset()
        if overflow:
            return BadReply(BlockTooLong("reply longer than 36 bytes", block))
        if len(block) == 1:
            if block[0] == ACK:
                return AckReply()
            if block[0] == NAK:
                return NakReply()
            return BadReply(FramingError("lone mode-bit word is neither ACK nor NAK", block))
        try:
            return DataReply(split_checked(block))
        except FramingError as exc:
            return BadReply(exc)


# --- what a peripheral reads --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """A VMC command block with a good CHK; ``block`` excludes CHK (``block[0]`` is addr|cmd)."""

    block: bytes

    @property
    def addr_cmd(self) -> int:
        return self.block[0]

    @property
    def address(self) -> int:
        return self.block[0] & ADDRESS_MASK

    @property
    def data(self) -> bytes:
        return self.block[1:]


@dataclass(frozen=True, slots=True)
class ControlReceived:
    """A VMC control word (ACK, RET or NAK, mode bit 0) outside a command block."""

    value: int


@dataclass(frozen=True, slots=True)
class BadCommand:
    """A command block for us that failed its CHK or made no sense: the peripheral stays silent
    (or NAKs) and the VMC retransmits."""

    error: FramingError


CommandEvent = CommandReceived | ControlReceived | BadCommand

#: Given the bytes of a block so far (address|command first, no CHK), return the full length
#: of the block without CHK, or None while more bytes are needed to tell (a sub-command byte).
#: Return 0 when the command is unknown.
LengthOf = Callable[[bytes], "int | None"]


class CommandFramer:
    """Peripheral-side framer: command blocks start at their mode-bit word and are delimited by
    the length the device's command table gives, then CHK. Blocks addressed to other devices
    are skipped. Control words (mode bit 0 with no block open) are reported as such."""

    __slots__ = ("_address", "_buf", "_length_of", "_skipping")

    def __init__(self, address: int, length_of: LengthOf) -> None:
        self._address = address
        self._length_of = length_of
        self._buf: bytearray | None = None
        # After a block we could not delimit (unknown command), its remaining words are not
        # control words: skip them up to the next mode-bit word.
        self._skipping = False

    def reset(self) -> None:
        self._buf = None
        self._skipping = False

    def feed(self, items: Iterable[Word | Resync]) -> list[CommandEvent]:
        out: list[CommandEvent] = []
        for item in items:
            if isinstance(item, Resync):
                if self._buf is not None:
                    out.append(BadCommand(FramingError("framing error in a command", item.raw)))
                self._buf = None
                continue
            if item.mode:
                if self._buf is not None and (self._buf[0] & ADDRESS_MASK) == self._address:
                    out.append(BadCommand(FramingError("command cut short", bytes(self._buf))))
                self._buf = bytearray((item.value,))
                self._skipping = False
            elif self._skipping:
                continue
            elif self._buf is None:
                out.append(ControlReceived(item.value))
                continue
            else:
                self._buf.append(item.value)
            event = self._check_complete()
            if event is not None:
                out.append(event)
        return out

    def _check_complete(self) -> CommandEvent | None:
        buf = self._buf
        assert buf is not None
        if (buf[0] & ADDRESS_MASK) != self._address:
            # Not ours: keep skipping words until the next mode-bit word.
            if len(buf) > MAX_BLOCK_LEN:
                self._buf = bytearray(buf[:1])
            return None
        length = self._length_of(bytes(buf[: len(buf)]))
        if length == 0:
            self._buf = None
            self._skipping = True
            return BadCommand(FramingError("unknown command", bytes(buf)))
        if length is None:
            if len(buf) >= MAX_BLOCK_LEN:
                self._buf = None
                self._skipping = True
                return BadCommand(BlockTooLong("command longer than 36 bytes", bytes(buf)))
            return None
        if len(buf) < length + 1:
            return None
        self._buf = None
        try:
            return CommandReceived(split_checked(bytes(buf[: length + 1])))
        except FramingError as exc:
            return BadCommand(exc)
