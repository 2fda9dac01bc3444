"""One DEX/UCS session with a handheld, the machine being the slave (docs/dex.md).

1. First handshake (the handheld's): ENQ -> DLE '0'; ``DLE SOH <comm id 10> <operation> <revision
   and level> DLE ETX CRC`` -> DLE '1'; EOT.
2. Second handshake (ours, roles reversed): ENQ <- DLE '0'; ``DLE SOH 00 <our comm id> <revision
   and level> DLE ETX CRC`` <- DLE '1'; EOT.
3. Data: ENQ <- DLE '0'; blocks ``DLE STX ... DLE ETB CRC``, the last ending ``DLE ETX``, each
   acknowledged DLE '1', '0', '1' ...; a NAK, a wrong acknowledgement or silence sends the block
   again; EOT.

The report is built when the first handshake was accepted (one snapshot), and only a session
whose every block was acknowledged counts as delivered (the caller then resets, if configured).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from vmc.dex.link import (
    ACK0,
    ACK1,
    ENQ,
    EOT,
    ETB,
    ETX,
    NAK,
    SOH,
    STX,
    Control,
    Frame,
    Token,
    Tokenizer,
    ack_for,
    encode_frame,
    split_blocks,
)

#: How long the handheld has to answer (its acknowledgement of a block or handshake, the next
#: step of a handshake), counted from the end of what we sent. One second, as the public slave
#: implementation waits for a block's acknowledgement (lanmark7/dex-utility,
#: dex_comm_thread.c, 1000 ms); handhelds answer within a few character times.
RESPONSE_TIMEOUT_S: Final = 1.0
#: Sending one byte at 9600 8N1: 10 bits. Added per byte sent, so that a long block's own
#: transmission time is not taken from the handheld's answer time.
BAUD: Final = 9600
BYTE_TIME_S: Final = 10 / BAUD
#: How often one step (ENQ, handshake, block) is sent again after a NAK, a wrong
#: acknowledgement or silence before the session is given up. Our choice: a bad cable fails
#: within a few seconds and the technician starts again.
MAX_ATTEMPTS: Final = 4
#: The revision and level we announce (EVA-DTS DEX/UCS, as public handhelds send it).
REVISION_LEVEL: Final = b"R01L01"
RESPONSE_OK: Final = b"00"
COMM_ID_BYTES: Final = 10
OPERATION_READ: Final = ord("R")  # the handheld wants to receive (read our audit data)


class SessionAborted(Exception):
    """The session ended before the whole report was acknowledged."""


class LinkClosed(SessionAborted):
    """The port closed (EOF) under the session."""


@dataclass(frozen=True)
class Handshake:
    """What the handheld said in its first handshake."""

    comm_id: str
    operation: str
    revision: str


class TokenReader:
    """Tokens from a stream, each with a deadline."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._tokenizer = Tokenizer()
        self._pending: list[Token] = []

    def clear(self) -> None:
        self._pending.clear()

    async def next(self, timeout_s: float | None) -> Token:
        """The next token; TimeoutError after ``timeout_s`` (None: wait for ever)."""
        async with asyncio.timeout(timeout_s):
            while not self._pending:
                data = await self._reader.read(512)
                if not data:
                    raise LinkClosed("the port closed")
                self._pending.extend(self._tokenizer.feed(data))
        return self._pending.pop(0)


class Session:
    """Serve one handheld on ``reader``/``writer`` once its ENQ arrived."""

    def __init__(
        self,
        tokens: TokenReader,
        writer: asyncio.StreamWriter,
        comm_id: str,
        report: Callable[[], Coroutine[Any, Any, bytes]],
        *,
        response_timeout_s: float = RESPONSE_TIMEOUT_S,
    ) -> None:
        self._tokens = tokens
        self._writer = writer
        self._comm_id = comm_id.encode("ascii")
        self._report = report
        self._response_timeout_s = response_timeout_s
        self.handheld: Handshake | None = None
        self.retransmissions = 0

    async def _send(self, data: bytes) -> float:
        """Write ``data``; the time to allow for the answer."""
        self._writer.write(data)
        send_time = len(data) * BYTE_TIME_S
        try:
            async with asyncio.timeout(self._response_timeout_s + send_time):
                await self._writer.drain()  # a port whose other side stopped reading
        except TimeoutError:
            raise SessionAborted("the port does not take our bytes") from None
        return self._response_timeout_s + send_time

    async def _answer(self, timeout_s: float) -> Token | None:
        try:
            return await self._tokens.next(timeout_s)
        except TimeoutError:
            return None

    async def run(self) -> Handshake:
        """ENQ was received. Returns the handheld's handshake once the whole report was
        acknowledged; raises SessionAborted otherwise."""
        # The snapshot is read (on a thread) while the first handshake runs: a large journal's
        # scan then does not lengthen the handheld's wait for our second handshake.
        report = asyncio.ensure_future(self._report())
        try:
            handshake = await self._first_handshake()
            self.handheld = handshake
            if handshake.operation != chr(OPERATION_READ):
                await self._send(bytes((EOT,)))
                raise SessionAborted(f"operation {handshake.operation!r} is not a read")
            data = await report
        finally:
            report.cancel()  # no-op once done; gather also collects an error nobody awaited
            await asyncio.gather(report, return_exceptions=True)
        await self._second_handshake()
        await self._transfer(data)
        return handshake

    async def _first_handshake(self) -> Handshake:
        timeout = await self._send(ACK0)
        for _ in range(MAX_ATTEMPTS):
            token = await self._answer(timeout)
            if token is None:
                raise SessionAborted("no first handshake")
            if token is Control.ENQ:  # it did not hear our DLE '0'
                timeout = await self._send(ACK0)
                continue
            if isinstance(token, Frame) and token.start == SOH and token.end == ETX:
                if not token.crc_ok or len(token.payload) < COMM_ID_BYTES + 1:
                    timeout = await self._send(bytes((NAK,)))
                    continue
                payload = token.payload.decode("ascii", "replace")
                timeout = await self._send(ACK1)
                if await self._answer(timeout) is not Control.EOT:
                    raise SessionAborted("no EOT after the first handshake")
                return Handshake(
                    payload[:COMM_ID_BYTES],
                    payload[COMM_ID_BYTES],
                    payload[COMM_ID_BYTES + 1 :],
                )
            raise SessionAborted(f"unexpected {token!r} in the first handshake")
        raise SessionAborted("first handshake failed")

    async def _exchange(self, message: bytes, expected: Control, what: str) -> None:
        """Send ``message`` until the handheld answers ``expected``."""
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                self.retransmissions += 1
            answer = await self._answer(await self._send(message))
            if answer is expected:
                return
            if answer is Control.EOT:
                raise SessionAborted(f"the handheld ended the session during {what}")
            # NAK, the other acknowledgement (our frame was lost) or silence: send it again.
        raise SessionAborted(f"{what}: no acknowledgement after {MAX_ATTEMPTS} attempts")

    async def _second_handshake(self) -> None:
        await self._exchange(bytes((ENQ,)), Control.ACK0, "the second handshake's ENQ")
        frame = encode_frame(SOH, RESPONSE_OK + self._comm_id + REVISION_LEVEL, ETX)
        await self._exchange(frame, Control.ACK1, "the second handshake")
        await self._send(bytes((EOT,)))

    async def _transfer(self, data: bytes) -> None:
        await self._exchange(bytes((ENQ,)), Control.ACK0, "the data ENQ")
        blocks = split_blocks(data)
        for index, block in enumerate(blocks):
            end = ETX if index == len(blocks) - 1 else ETB
            await self._exchange(encode_frame(STX, block, end), ack_for(index), f"block {index}")
        await self._send(bytes((EOT,)))
