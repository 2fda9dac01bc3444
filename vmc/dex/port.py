"""The RS-232 DEX port (``[dex] port``): a handheld plugged in at any time reads the audit
report over DEX/UCS at 9600 8N1.

Serial I/O is pyserial-asyncio-fast (non-blocking, on the event loop, never in a thread that
could hold the loop); the report's snapshot is read on a thread (vmc/dex/service.py). Nothing
here touches the MDB line. A port that cannot be opened or goes away is reopened, waiting
0.25 s at first and doubling up to 5 s, like the MDB link. Errors never end the task: the port
is an audit convenience, never a reason to stop selling.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import serial
import serial_asyncio_fast
import structlog

from vmc.config import Config
from vmc.dex.link import Control
from vmc.dex.service import AuditReading, comm_id_for, read_audit, reset_audit
from vmc.dex.session import (
    BAUD,
    RESPONSE_TIMEOUT_S,
    LinkClosed,
    Session,
    SessionAborted,
    TokenReader,
)
from vmc.errors import VmcError
from vmc.journal import Journal
from vmc.log import FailureLog

log = structlog.get_logger("vmc.dex")

REOPEN_FIRST_S: Final = 0.25  # the MDB link's reopen schedule (README "Connecting real hardware")
REOPEN_MAX_S: Final = 5.0
OPEN_TIMEOUT_S: Final = 5.0  # opening a serial device; only a wedged USB stack takes longer
CLOSE_TIMEOUT_S: Final = 2.0


class DexPort:
    """Serves handhelds on one serial port until cancelled."""

    def __init__(self, port: str, config: Config, journal: Journal) -> None:
        self.port = port
        self.config = config
        self.journal = journal
        self.is_open = False
        self.sessions_completed = 0
        self.sessions_aborted = 0
        self.resets = 0
        #: The handheld's answer time (session.RESPONSE_TIMEOUT_S; tests shorten it).
        self.response_timeout_s = RESPONSE_TIMEOUT_S
        self._reading: AuditReading | None = None
        self._open_log = FailureLog(log)

    async def run(self) -> None:
        delay = REOPEN_FIRST_S
        while True:
            try:
                async with asyncio.timeout(OPEN_TIMEOUT_S):
                    reader, writer = await serial_asyncio_fast.open_serial_connection(
                        url=self.port,
                        baudrate=BAUD,
                        bytesize=serial.EIGHTBITS,
                        parity=serial.PARITY_NONE,
                        stopbits=serial.STOPBITS_ONE,
                    )
            except (OSError, TimeoutError) as exc:  # serial.SerialException is an OSError
                self._open_log.failed("DEX port cannot be opened", port=self.port, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, REOPEN_MAX_S)
                continue
            if not self._open_log.recovered("DEX port open", port=self.port):
                log.info("DEX port open", port=self.port)
            self.is_open = True
            delay = REOPEN_FIRST_S
            try:
                await self._serve(reader, writer)
            except (OSError, LinkClosed) as exc:
                log.warning("DEX port lost", port=self.port, error=str(exc))
            except Exception as exc:  # a fault here must not stop the machine selling
                log.error("DEX port failed", port=self.port, error=repr(exc), exc_info=exc)
            finally:
                self.is_open = False
                await _close(writer)
            await asyncio.sleep(delay)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tokens = TokenReader(reader)
        while True:
            if await tokens.next(None) is not Control.ENQ:
                continue  # anything before a handheld's ENQ is noise
            session = Session(
                tokens,
                writer,
                comm_id_for(self.config),
                self._report,
                response_timeout_s=self.response_timeout_s,
            )
            self._reading = None
            try:
                handheld = await session.run()
            except LinkClosed:
                self.sessions_aborted += 1
                raise
            except (SessionAborted, VmcError) as exc:
                self.sessions_aborted += 1
                log.warning("DEX session aborted", port=self.port, reason=str(exc))
                tokens.clear()
                continue
            self.sessions_completed += 1
            log.info(
                "DEX report read",
                port=self.port,
                handheld=handheld.comm_id,
                retransmissions=session.retransmissions,
            )
            await self._delivered()

    async def _report(self) -> bytes:
        reset = self.config.dex.reset_on_read
        self._reading = await read_audit(self.journal, self.config, via="dex_port", reset=reset)
        return self._reading.text.encode("ascii")

    async def _delivered(self) -> None:
        """The handheld acknowledged every block: now the read may reset the interims."""
        reading = self._reading
        if reading is None or not self.config.dex.reset_on_read:
            return
        try:
            await reset_audit(self.journal, reading)
            self.resets += 1
        except VmcError as exc:
            # The handheld has the report; its interims stay for the next read (none lost).
            log.warning("DEX read not reset", error=str(exc))


async def _close(writer: asyncio.StreamWriter) -> None:
    # abort, not close: close() drains in a thread, which never returns on a dead pty.
    if not writer.transport.is_closing():
        writer.transport.abort()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await writer.wait_closed()
