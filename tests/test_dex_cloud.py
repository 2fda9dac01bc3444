"""The signed cloud command ``dex {}``: the report published on ``vmc/M/dex`` through a real
cloud link to a real mosquitto (tests/conftest.py), seen by a plain MQTT client; with the link
down the command is answered ``unavailable``. Real journal, real vend cycle, real keys."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hil.backend.commands import CommandSigner
from tests.dex_support import check_g85_and_se, fill_journal, find
from tests.mqtt_broker import Broker, free_port, mosquitto_binary
from tests.test_cloud_link import Observer, cloud_config, wait_state
from tests.test_planogram import MACHINE_ID, Rig, make_config
from tests.waiting import stop_task
from vmc.cloud.commands import CommandProcessor
from vmc.cloud.link import CloudLink, LinkState
from vmc.dex.hooks import cloud_dex_hook

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")

SIGNER = CommandSigner.generate()
WAIT_S = 20.0


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    started = await Rig(tmp_path, make_config(tmp_path, public_key=SIGNER.public_key_b64)).start()
    await fill_journal(started.journal)
    try:
        yield started
    finally:
        await started.stop()


async def dex_command(rig: Rig, link: CloudLink, cmd_id: str) -> dict[str, Any]:
    """Send a signed ``dex {}``; its one result."""
    hook = cloud_dex_hook(rig.config, rig.journal, link.publish_json)
    processor = await CommandProcessor.open(rig.config, rig.journal, rig.machine, on_dex=hook)
    try:
        await processor.handle(
            SIGNER.payload(MACHINE_ID, "dex", {}, cmd_id=cmd_id, now=datetime.now(UTC))
        )
        (result,) = processor.unpublished_results()
        return result
    finally:
        await processor.close()


async def test_dex_publishes_the_report_on_the_dex_topic(broker: Broker, rig: Rig) -> None:
    seen = Observer(broker.port)
    ready = asyncio.Event()
    watching = asyncio.create_task(seen.run([f"vmc/{MACHINE_ID}/dex"], ready))
    link = CloudLink(cloud_config(broker.port), MACHINE_ID, boot_id="b-1", version="t")
    running = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(ready.wait(), WAIT_S)
        await wait_state(link, LinkState.UP)
        before = rig.journal.last_seq
        assert await dex_command(rig, link, "dex-1") == {
            "cmd_id": "dex-1",
            "ok": True,
            "error": None,
        }
        await seen.wait_for("the report", lambda: seen.messages)
        ((topic, payload, retained),) = seen.messages
        assert topic == f"vmc/{MACHINE_ID}/dex" and retained is False
        assert set(payload) == {"ts", "dex"} and payload["ts"].endswith("Z")
        check_g85_and_se(payload["dex"])
        assert find(payload["dex"], "VA1") == ["650", "4", "650", "4"]
        assert find(payload["dex"], "EA3")[3] == "CLOUD"
        assert rig.journal.last_seq == before  # a read without reset journals nothing
    finally:
        await link.stop()
        await stop_task(running)
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)


async def test_dex_with_the_link_down_is_answered_unavailable(rig: Rig) -> None:
    link = CloudLink(cloud_config(free_port()), MACHINE_ID, boot_id="b-1", version="t")
    result = await dex_command(rig, link, "dex-2")  # never started: no session
    assert result == {"cmd_id": "dex-2", "ok": False, "error": "unavailable"}
