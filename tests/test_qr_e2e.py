"""A QR sale end to end in one process, as the screen and the backend see it: the control
interface on its real unix socket (JSON lines), signed commands through the real
CommandProcessor, the real vend cycle, journal, motor driver and VMC96 simulator
(tests/test_payments_qr.py builds them)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_payments_qr import Rig, until
from vmc.control import ControlServer


class Screen:
    """A control-interface client: one request line, one answer line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.writer.write(json.dumps(request).encode() + b"\n")
        await self.writer.drain()
        answer: dict[str, Any] = json.loads(await self.reader.readline())
        return answer


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Rig, Screen, ControlServer]]:
    rig = await Rig(tmp_path / "state", cash=False).start()
    server = ControlServer(tmp_path / "control.sock", rig.machine)
    await server.start()
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "control.sock"))
    try:
        yield rig, Screen(reader, writer), server
    finally:
        writer.close()
        await server.close()
        await rig.stop()


async def test_a_qr_sale_from_the_screen_to_the_command_result(
    served: tuple[Rig, Screen, ControlServer],
) -> None:
    rig, screen, _server = served
    state = (await screen.ask({"op": "state"}))["state"]
    assert state["qr"] == {"available": True, "order": None}

    shown = await screen.ask({"op": "qr_order", "slot": "A1"})

    assert shown["ok"] is True
    order = shown["order"]
    assert base64.b64decode(shown["png"])[:4] == b"\x89PNG"
    assert shown["text"].strip()
    assert (await screen.ask({"op": "state"}))["state"]["qr"]["order"] == order
    await until(lambda: rig.published == [order], "published on orders")

    result = await rig.vend(order)  # the wallet paid: the backend's signed vend

    assert result["ok"] is True
    assert rig.dropped() == {(0, 0): 1}
    state = (await screen.ask({"op": "state"}))["state"]
    assert state["qr"]["order"] is None and state["phase"] == "idle"
    assert {s["slot"]: s["stock"] for s in state["slots"]}["A1"] == 4
    types = [r.type for r in await rig.records("order", "vend_intent", "sale")]
    assert types == ["order", "vend_intent", "sale"]


async def test_the_screen_ops_refuse_clearly(served: tuple[Rig, Screen, ControlServer]) -> None:
    rig, screen, _server = served
    assert (await screen.ask({"op": "qr_order"}))["error"] == "bad_request"
    assert (await screen.ask({"op": "qr_cancel"}))["error"] == "no_order"
    assert (await screen.ask({"op": "qr_order", "slot": "Z9"}))["error"] == "unknown_slot"
    rig.link = False
    refused = await screen.ask({"op": "qr_order", "slot": "A1"})
    assert refused["ok"] is False and refused["error"] == "qr_unavailable"
    assert (await screen.ask({"op": "state"}))["state"]["qr"]["available"] is False
    rig.link = True
    shown = await screen.ask({"op": "qr_order", "slot": "A2"})
    cancelled = await screen.ask({"op": "qr_cancel"})
    assert cancelled == {"ok": True, "order_id": shown["order"]["order_id"], "state": "cancelled"}
    assert (await rig.vend(shown["order"]))["error"] == "order_expired"
    assert rig.turns() == 0


async def test_without_a_qr_method_the_screen_is_told_so(tmp_path: Path) -> None:
    rig = await Rig(tmp_path / "state", cash=False).start()
    rig.machine.methods.clear()  # a daemon without the cloud link attaches none
    server = ControlServer(tmp_path / "control.sock", rig.machine)
    await server.start()
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "control.sock"))
    try:
        answer = await Screen(reader, writer).ask({"op": "qr_order", "slot": "A1"})
        assert answer["ok"] is False and answer["error"] == "qr_unavailable"
        assert "qr" not in rig.machine.snapshot()
    finally:
        writer.close()
        await server.close()
        await rig.stop()
