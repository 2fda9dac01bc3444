"""The daemon (a subprocess, on its embedded simulators) and a real mosquitto broker: signed
commands change the planogram at once and across a restart, a forged command is refused with
nothing changed, every command gets one result, and the journal reaches the broker."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from hil.backend.commands import CommandSigner
from hil.harness import Daemon, wait_until, write_config
from tests.mqtt_broker import Broker, mosquitto_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
]

MACHINE = "TEST-0001"  # hil.harness.write_config's machine id
WAIT_S = 30.0


class Backend:
    """What a backend sees of the machine: every message under vmc/M/, by topic."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-backend")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"vmc/{MACHINE}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, json.loads(message.payload)))

    def on(self, suffix: str) -> list[dict[str, Any]]:
        with self._lock:
            return [p for t, p in self.messages if t == f"vmc/{MACHINE}/{suffix}"]

    def send(self, payload: bytes) -> None:
        self.client.publish(f"vmc/{MACHINE}/cmd", payload, qos=1).wait_for_publish(10)

    def result(self, cmd_id: str) -> list[dict[str, Any]]:
        return [r for r in self.on("cmd/result") if r.get("cmd_id") == cmd_id]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def heartbeat_s() -> int:
    return 900  # the default: 15 minutes


@pytest.fixture
def cloud(tmp_path: Path, heartbeat_s: int) -> Iterator[tuple[Daemon, Backend, CommandSigner]]:
    signer = CommandSigner.generate()
    with Broker(tmp_path / "broker") as broker:
        state = tmp_path / "state"
        extra = "\n".join(
            [
                "[cloud]",
                "enabled = true",
                'host = "127.0.0.1"',
                f"port = {broker.port}",
                f'command_public_key = "{signer.public_key_b64}"',
                f"heartbeat_s = {heartbeat_s}",
            ]
        )
        config = write_config(tmp_path / "vmc.toml", state, extra=extra)
        daemon = Daemon(config, state)
        backend = Backend(broker.port)
        try:
            daemon.start()
            daemon.wait_state(
                lambda s: (s.get("cloud_link") or {}).get("state") == "up", "cloud link up"
            )
            yield daemon, backend, signer
        finally:
            backend.close()
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()


def price_of(state: dict[str, Any], slot: str) -> int:
    return next(s["price"] for s in state["slots"] if s["slot"] == slot)


def test_signed_set_price_applies_at_once_and_survives_a_restart(
    cloud: tuple[Daemon, Backend, CommandSigner],
) -> None:
    daemon, backend, signer = cloud
    assert price_of(daemon.state()["state"], "A1") == 100
    body = signer.body(MACHINE, "set_price", {"slot": "A1", "price": 130, "currency": "EUR"})
    backend.send(json.dumps(signer.sign(body)).encode())
    daemon.wait_state(lambda s: price_of(s, "A1") == 130, "the remote price")
    wait_until(lambda: backend.result(body["cmd_id"]), WAIT_S, "its result")
    assert backend.result(body["cmd_id"]) == [{"cmd_id": body["cmd_id"], "ok": True, "error": None}]
    # The change is a journal record, synced to the backend with its source.
    wait_until(
        lambda: any(
            r["type"] == "price_changed" and r["source"].get("cmd_id") == body["cmd_id"]
            for batch in backend.on("journal")
            for r in batch["records"]
        ),
        WAIT_S,
        "the price_changed record on vmc/M/journal",
    )
    # A restart with the same configuration file keeps the remote price.
    daemon.stop()
    daemon.start()
    assert price_of(daemon.state()["state"], "A1") == 130


def test_forged_command_is_refused_and_changes_nothing(
    cloud: tuple[Daemon, Backend, CommandSigner],
) -> None:
    daemon, backend, _signer = cloud
    forger = CommandSigner.generate()
    body = forger.body(MACHINE, "set_price", {"slot": "A1", "price": 1, "currency": "EUR"})
    backend.send(json.dumps(forger.sign(body)).encode())
    wait_until(lambda: backend.result(body["cmd_id"]), WAIT_S, "its result")
    assert backend.result(body["cmd_id"]) == [
        {"cmd_id": body["cmd_id"], "ok": False, "error": "bad_signature"}
    ]
    assert price_of(daemon.state()["state"], "A1") == 100
    wait_until(
        lambda: any(
            r["type"] == "security" for batch in backend.on("journal") for r in batch["records"]
        ),
        WAIT_S,
        "the security record on vmc/M/journal",
    )


@pytest.mark.parametrize("heartbeat_s", [2])
def test_telemetry_carries_every_contract_field_on_change_and_as_a_heartbeat(
    cloud: tuple[Daemon, Backend, CommandSigner],
) -> None:
    daemon, backend, signer = cloud
    wait_until(lambda: backend.on("telemetry"), WAIT_S, "telemetry")
    first = backend.on("telemetry")[-1]
    # The contract's list: link state, each device's state and faults, coin tube levels, bill
    # stacker count and full flag, per-slot price, stock and enabled flag, door state, records
    # not yet acknowledged, software version and uptime.
    assert first["link"]["state"] == "up"
    assert {"coin", "bill"} <= set(first["devices"])
    assert all({"state", "faults"} <= set(d) for d in first["devices"].values())
    assert first["coin_tubes"] and all({"count", "full"} <= set(t) for t in first["coin_tubes"])
    assert {"count", "full"} <= set(first["bill_stacker"])
    assert all({"price", "stock", "enabled"} <= set(s) for s in first["slots"])
    assert "door" in first
    assert isinstance(first["journal"]["unacked"], int)
    assert first["version"] and first["uptime_s"] >= 0
    # A change is published (debounced), without waiting for the heartbeat.
    body = signer.body(MACHINE, "set_price", {"slot": "A2", "price": 125, "currency": "EUR"})
    backend.send(json.dumps(signer.sign(body)).encode())
    wait_until(
        lambda: any(
            s["slot"] == "A2" and s["price"] == 125
            for t in backend.on("telemetry")
            for s in t["slots"]
        ),
        WAIT_S,
        "telemetry with the new price",
    )
    # And with nothing changing, the heartbeat (2 s here, 15 minutes by default) goes on.
    seen = len(backend.on("telemetry"))
    wait_until(lambda: len(backend.on("telemetry")) >= seen + 2, WAIT_S, "two heartbeats")
    assert daemon.state()["state"]["in_service"]


def test_a_qr_sale_through_the_broker(cloud: tuple[Daemon, Backend, CommandSigner]) -> None:
    """The screen asks for an order; it is published on vmc/M/orders; the backend, told the
    wallet paid, sends a signed vend; the machine vends and answers; the sale syncs."""
    daemon, backend, signer = cloud
    daemon.wait_state(lambda s: (s.get("qr") or {}).get("available") is True, "QR offered")
    shown = daemon.control({"op": "qr_order", "slot": "A1"})
    assert shown["ok"] is True, shown
    order = shown["order"]
    wait_until(
        lambda: any(o["order_id"] == order["order_id"] for o in backend.on("orders")),
        WAIT_S,
        "the order on vmc/M/orders",
    )
    published = next(o for o in backend.on("orders") if o["order_id"] == order["order_id"])
    assert published["qr"] == order["qr"] and published["price"] == 100
    body = signer.body(
        MACHINE,
        "vend",
        {
            "order_id": order["order_id"],
            "slot": "A1",
            "price": 100,
            "currency": "EUR",
            "origin": "machine",
        },
    )
    backend.send(json.dumps(signer.sign(body)).encode())
    wait_until(lambda: backend.result(body["cmd_id"]), WAIT_S, "the vend's result")
    assert backend.result(body["cmd_id"]) == [{"cmd_id": body["cmd_id"], "ok": True, "error": None}]
    wait_until(
        lambda: any(
            r["type"] == "sale" and r["data"].get("method") == "qr"
            for batch in backend.on("journal")
            for r in batch["records"]
        ),
        WAIT_S,
        "the QR sale on vmc/M/journal",
    )
    stock = next(s["stock"] for s in daemon.state()["state"]["slots"] if s["slot"] == "A1")
    assert stock == 9  # hil.harness's default slots hold 10
