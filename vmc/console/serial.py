"""The console on a serial line (``[console] port``: a spare UART, a USB gadget port), served
inside the daemon.

The port is opened with pyserial-asyncio-fast (non-blocking reads and writes on the loop, no
thread), one session after another is run on it, and a dropped line (the port closes, a USB
gadget's host goes away, a pty whose other end closes) ends the session, is journaled as a
logout, and the port is opened again: at once, then after growing waits while it is missing.
The sessions call the control interface in-process (``ControlServer.call``): the same op
handlers as the socket, no second implementation.
"""

from __future__ import annotations

import asyncio
import contextlib

import serial
import structlog
from serial_asyncio_fast import open_serial_connection

from vmc.config import ConsoleConfig
from vmc.console.session import Caller, Ended, Session
from vmc.log import FailureLog

log = structlog.get_logger("vmc.console")

#: After a dropped line, the first wait before the port is opened again; it doubles while the
#: port cannot be opened, up to REOPEN_MAX_S (a USB gadget port comes back when a host plugs
#: in; a technician should not wait long for the prompt).
REOPEN_FIRST_S = 0.2
REOPEN_MAX_S = 5.0
#: How long a write to the line may wait for the port to take it (flow control held off by a
#: terminal that went away): the session counts the line as dropped after it.
WRITE_TIMEOUT_S = 5.0
READ_CHUNK = 256


class _SerialStream:
    """``ByteStream`` over pyserial-asyncio-fast's reader and writer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.dropped = False

    async def read(self) -> bytes:
        if self.dropped:
            return b""
        try:
            data = await self.reader.read(READ_CHUNK)
        except (OSError, serial.SerialException) as exc:
            log.info("console line dropped", error=str(exc))
            data = b""
        if not data:
            self.dropped = True
        return data

    async def write(self, data: bytes) -> None:
        if self.dropped or self.writer.is_closing():
            return
        try:
            self.writer.write(data)
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await self.writer.drain()
        except (OSError, serial.SerialException, TimeoutError) as exc:
            log.info("console line dropped while writing", error=str(exc))
            self.dropped = True


class SerialConsole:
    def __init__(self, config: ConsoleConfig, call: Caller) -> None:
        assert config.port is not None
        self.config = config
        self.port = config.port
        self.call = call

    async def run(self) -> None:
        """Serve the port until cancelled."""
        wait_s = REOPEN_FIRST_S
        open_log = FailureLog(log)  # a missing port: once at WARNING, repeats at DEBUG
        while True:
            try:
                reader, writer = await open_serial_connection(
                    url=self.port, baudrate=self.config.baud
                )
            except (OSError, serial.SerialException) as exc:
                open_log.failed("console port cannot be opened", port=self.port, error=str(exc))
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, REOPEN_MAX_S)
                continue
            if not open_log.recovered("console port open", port=self.port):
                log.info("console port open", port=self.port)
            wait_s = REOPEN_FIRST_S
            stream = _SerialStream(reader, writer)
            try:
                await self._serve(stream)
            finally:
                writer.close()
                with contextlib.suppress(OSError, serial.SerialException):
                    await writer.wait_closed()
            await asyncio.sleep(wait_s)

    async def _serve(self, stream: _SerialStream) -> None:
        while True:
            session = Session(
                stream,
                self.call,
                line=f"serial:{self.port}"[:100],
                idle_logout_s=self.config.idle_logout_s,
                user=self.config.user,
            )
            ended = await session.run()
            log.info("console session ended", port=self.port, how=ended.value)
            if ended is Ended.DROPPED:
                return
