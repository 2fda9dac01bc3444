"""The stand-in backend's MQTT side (contract: ../shared/contracts/cloud-mqtt.md).

Subscribes ``PREFIX/+/journal``, ``status``, ``telemetry``, ``orders``, ``cmd/result`` and
``dex`` at QoS 1 with a persistent session (client id ``vmc-backend``), so batches published
while it restarts wait for it at the broker. Each journal batch is stored (duplicates dropped)
and answered on ``PREFIX/M/journal/ack`` with ``{"journal": J, "upto": seq}``, the highest
contiguous stored seq, at QoS 1, also when the whole batch was a duplicate (the machine resent
it because an earlier ack was lost). Status and telemetry keep the latest per machine; orders,
command results and DEX reports are kept in arrival order.

QR orders wait for the operator (``confirm`` / ``decline``) or, with ``serve
--auto-confirm``, are confirmed after a delay (hil/backend/operator.py).

Others hook in with :meth:`BackendService.on` (a handler per topic suffix, called after the
message is stored) and publish through :meth:`BackendService.publish_json`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import aiomqtt

from hil.backend.store import BackendStore, BatchInvalid

log = logging.getLogger("hil.backend")

CLIENT_ID: Final = "vmc-backend"
SUFFIXES: Final = ("journal", "status", "telemetry", "orders", "cmd/result", "dex")
RECONNECT_S: Final = 0.5
SESSION_EXPIRY_S: Final = 86400

Handler = Callable[[str, dict[str, Any]], Awaitable[None] | None]


class BackendService:
    def __init__(
        self,
        store: BackendStore,
        host: str,
        port: int,
        *,
        prefix: str = "vmc",
        client_id: str = CLIENT_ID,
    ) -> None:
        self.store = store
        self.host = host
        self.port = port
        self.prefix = prefix
        self.client_id = client_id
        self.handlers: dict[str, list[Handler]] = {}
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        #: Counters for tests and the bench.
        self.batches = 0
        self.acks_sent = 0
        #: Ack journal batches (tests switch it off to hold records unacknowledged).
        self.acking = True
        self._acks_in_flight: set[asyncio.Task[None]] = set()  # held so none is collected

    def on(self, suffix: str, handler: Handler) -> None:
        """Call ``handler(machine, payload)`` for each message on ``PREFIX/+/suffix``."""
        self.handlers.setdefault(suffix, []).append(handler)

    async def publish_json(
        self, machine: str, suffix: str, payload: Mapping[str, Any], qos: int = 1
    ) -> None:
        client = self._client
        if client is None:
            raise aiomqtt.MqttError("backend not connected")
        data = json.dumps(payload, separators=(",", ":")).encode()
        await client.publish(f"{self.prefix}/{machine}/{suffix}", data, qos=qos)

    async def run(self) -> None:
        """Serve until cancelled, reconnecting to the broker."""
        while True:
            try:
                await self._serve()
            except aiomqtt.MqttError as exc:
                log.warning("backend: broker connection lost: %s", exc)
            except Exception:
                log.exception("backend: failed; reconnecting")
            self.connected.clear()
            self._client = None
            await asyncio.sleep(RECONNECT_S)

    async def _serve(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
            keepalive=30,
            max_inflight_messages=100,
        ) as client:
            for suffix in SUFFIXES:
                await client.subscribe(f"{self.prefix}/+/{suffix}", qos=1)
            self._client = client
            self.connected.set()
            log.info("backend: subscribed at %s:%s", self.host, self.port)
            async for message in client.messages:
                await self._handle(str(message.topic), message.payload)

    async def _handle(self, topic: str, raw: Any) -> None:
        parts = topic.split("/")
        head = len(self.prefix.split("/"))
        machine, suffix = parts[head], "/".join(parts[head + 1 :])
        try:
            payload = json.loads(raw)
        except (TypeError, ValueError):
            log.warning("backend: not JSON on %s", topic)
            return
        if not isinstance(payload, dict):
            log.warning("backend: not a JSON object on %s", topic)
            return
        if suffix == "journal":
            await self._journal(machine, payload)
        elif suffix in ("status", "telemetry"):
            self.store.put_latest(machine, suffix, payload)
        else:
            self.store.add_message(machine, suffix, payload)
        for handler in self.handlers.get(suffix, []):
            result = handler(machine, payload)
            if result is not None:
                await result

    async def _journal(self, machine: str, payload: dict[str, Any]) -> None:
        try:
            journal, outcome = self.store.store_batch(machine, payload)
        except BatchInvalid as exc:
            log.warning("backend: journal batch of %s refused: %s", machine, exc)
            return
        self.batches += 1
        if not self.acking or outcome.upto < 1:
            return
        # Sent without waiting for its PUBACK before the next batch is read: the store is
        # durable already, and paho sends the acks in the order they were made.
        ack = self.publish_json(machine, "journal/ack", {"journal": journal, "upto": outcome.upto})
        task = asyncio.create_task(ack, name="backend-journal-ack")
        self._acks_in_flight.add(task)
        task.add_done_callback(self._ack_done)
        self.acks_sent += 1

    def _ack_done(self, task: asyncio.Task[None]) -> None:
        self._acks_in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The machine resends from its first unacknowledged record: the next batch is
            # acked with the same or a higher upto.
            log.warning("backend: journal ack not sent: %s", task.exception())


async def serve(
    state_dir: Path,
    host: str,
    port: int,
    prefix: str = "vmc",
    *,
    auto_confirm_s: float | None = None,
) -> None:
    """Run the backend on ``state_dir``; with ``auto_confirm_s``, every QR order is confirmed
    (its signed vend sent) that many seconds after it arrived (hil/backend/operator.py)."""
    from hil.backend.operator import AutoConfirm, Operator

    store = BackendStore(state_dir)
    service = BackendService(store, host, port, prefix=prefix)
    operator = Operator(state_dir, store)
    if auto_confirm_s is not None:
        AutoConfirm(service, operator, auto_confirm_s)
        log.info("backend: QR orders are confirmed %g s after they arrive", auto_confirm_s)
    try:
        await service.run()
    finally:
        operator.close()
        store.close()
