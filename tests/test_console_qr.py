"""A test QR order from the serial console, in one process: the console (vmc/console/serial.py)
on a pty the test types into, the control interface answering it in-process with the
technician ops, the real vend cycle, journal, QR method, motor driver and VMC96 simulator
(tests/test_payments_qr.py builds them, with the cloud link up)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

from tests.console_pty import PtyLine
from tests.test_payments_qr import Rig, until
from vmc.config import ConsoleConfig
from vmc.console.auth import hash_pin
from vmc.console.serial import SerialConsole
from vmc.control import ControlServer
from vmc.journal import Journal, Record
from vmc.technician import Technician

PIN = "2580"


async def test_a_test_qr_order_is_drawn_on_the_serial_console(tmp_path: Path) -> None:
    rig = await Rig(tmp_path / "state", cash=False).start()
    line = PtyLine(tmp_path / "console.tty")
    console = ConsoleConfig(port=str(line.link), pin_hash=hash_pin(PIN), idle_logout_s=60.0)
    config = dataclasses.replace(rig.config, console=console)
    server = ControlServer(
        tmp_path / "control.sock", rig.machine, technician=Technician(config, rig.machine, {})
    )
    await server.start()
    serving = asyncio.create_task(SerialConsole(console, server.call).run())
    try:
        # The pty is read with blocking selects: in a thread, so the console keeps running.
        await asyncio.to_thread(line.expect, "PIN: ")
        line.type(PIN + "\r")
        await asyncio.to_thread(line.expect, "vmc> ")
        line.type("qr a1\r")
        shown = await asyncio.to_thread(line.expect, "vmc> ")
        await until(lambda: len(rig.published) == 1, "the order published")
        order = rig.published[0]
        assert f"order {order['order_id']} slot A1 price {order['price']}" in shown
        assert shown.count("\r\n") > 10  # the QR drawn in text, line by line
        line.type("qr cancel\r")
        assert '"state": "cancelled"' in await asyncio.to_thread(line.expect, "vmc> ")
        line.type("logout\r")
        await asyncio.to_thread(line.expect, "logged out")
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        line.close()
        await server.close()
        await rig.stop()
    records = [r.type for r in await _records(rig)]
    assert records.count("order") == 2  # created, then cancelled
    assert records.count("security") == 2  # login, logout


async def _records(rig: Rig) -> list[Record]:
    """The journal as the machine left it (opened again after the rig stopped)."""
    journal = await Journal.open(rig.state_dir)
    try:
        return await journal.records(1, 1000)
    finally:
        await journal.close()
