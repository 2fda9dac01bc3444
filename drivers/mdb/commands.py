"""Commands as data: one declaration per MDB command gives its wire shape.

A device class (coin, bill, cashless) declares a table of ``CommandDef``; from it come the
request bytes the VMC sends, and the request length a peripheral (simulator) needs to delimit a
block. A protocol level is one table. Response decoding lives beside each table as small pure
functions, so the simulator and the VMC share one definition of every byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from drivers.errors import FramingError
from drivers.mdb.block import ADDRESS_MASK, COMMAND_MASK, MAX_BLOCK_LEN, LengthOf

#: Most data bytes a reply can carry: a block is at most 36 words, CHK included.
MAX_REPLY_DATA = MAX_BLOCK_LEN - 1


@dataclass(frozen=True, slots=True)
class ReplyShape:
    """What a well-formed answer to one command looks like (mdb.md "Wire": every reply's length
    and shape is checked against the command it answers, so a late reply of another device is
    never taken, nor ACKed, as this command's answer).

    ``ack``: a lone ACK is a valid answer. ``min_data``..``max_data``: the data bytes (CHK
    excluded) a data answer may carry; ``max_data == 0``: no data answer at all.
    """

    ack: bool = True
    min_data: int = 1
    max_data: int = MAX_REPLY_DATA

    def fits(self, data: bytes) -> bool:
        if not data:
            return self.ack
        return self.min_data <= len(data) <= self.max_data

    def describe(self) -> str:
        parts = ["ACK"] if self.ack else []
        if self.max_data:
            span = (
                str(self.min_data)
                if self.min_data == self.max_data
                else f"{self.min_data}..{self.max_data}"
            )
            parts.append(f"{span} data bytes")
        return " or ".join(parts)

    def as_tuple(self) -> tuple[bool, int, int]:
        return (self.ack, self.min_data, self.max_data)


#: A command answered by a lone ACK only (RESET, enable masks, ESCROW, DISPENSE ...).
ACK_ONLY = ReplyShape(ack=True, min_data=0, max_data=0)
#: A command answered by an ACK or any data (POLL, and every cashless command: a reader may
#: answer any command with its pending poll data).
ACK_OR_DATA = ReplyShape()


def data_reply(min_data: int, max_data: int | None = None) -> ReplyShape:
    """A command that must be answered with data, ``min_data``..``max_data`` bytes."""
    return ReplyShape(ack=False, min_data=min_data, max_data=max_data or min_data)


@dataclass(frozen=True, slots=True)
class CommandDef:
    """One MDB command: its 3-bit command code, optional sub-command byte, and request length.

    ``data_len`` counts the data bytes after addr|cmd, including the sub-command byte when there
    is one, and excluding CHK. ``None`` means variable length; then ``length_of`` must be given
    in the table's own ``length_of`` override. ``reply`` is the shape of a valid answer.
    """

    name: str
    command: int
    sub: int | None = None
    data_len: int = 0
    #: What a valid answer looks like; checked by the bus master before it ACKs.
    reply: ReplyShape = ACK_OR_DATA

    def addr_cmd(self, address: int) -> int:
        return (address & ADDRESS_MASK) | (self.command & COMMAND_MASK)

    def request(self, address: int, payload: bytes = b"") -> tuple[int, bytes]:
        """Return (addr|cmd, data) for this command; ``payload`` excludes the sub-command byte."""
        data = (bytes((self.sub,)) if self.sub is not None else b"") + payload
        if len(data) != self.data_len:
            raise FramingError(
                f"{self.name}: expected {self.data_len} data bytes, got {len(data)}", data
            )
        return self.addr_cmd(address), data


class CommandTable:
    """The commands of one device at one protocol level."""

    def __init__(self, address: int, commands: Iterable[CommandDef]) -> None:
        self.address = address & ADDRESS_MASK
        self._by_key: dict[tuple[int, int | None], CommandDef] = {}
        self._has_sub: set[int] = set()
        for c in commands:
            self._by_key[(c.command, c.sub)] = c
            if c.sub is not None:
                self._has_sub.add(c.command)

    def commands(self) -> list[CommandDef]:
        return list(self._by_key.values())

    def lookup(self, block: bytes) -> CommandDef | None:
        """The command a (possibly partial) block starts with; None if unknown or still unknown."""
        if not block:
            return None
        command = block[0] & COMMAND_MASK
        if command in self._has_sub:
            if len(block) < 2:
                return None
            return self._by_key.get((command, block[1]))
        return self._by_key.get((command, None))

    def length_of(self) -> LengthOf:
        """A ``LengthOf`` for ``CommandFramer``: total length without CHK, None if not yet known,
        0 if unknown."""

        def length(block: bytes) -> int | None:
            command = block[0] & COMMAND_MASK
            if command in self._has_sub and len(block) < 2:
                return None
            found = self.lookup(block)
            if found is None:
                return 0
            return 1 + found.data_len

        return length
