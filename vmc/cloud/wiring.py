"""The cloud side of one run of the daemon: the MQTT link, the journal's sync, telemetry, the
signed-command processor and QR payments, started together once the machine exists and stopped
together at shutdown. vmc/daemon.py imports this module only when ``[cloud] enabled``: a
cash-only machine never loads MQTT, TLS, cryptography, qrcode or PIL (bench/footprint.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from drivers.mdb.device import MdbDevice
from vmc.cloud.commands import CommandProcessor
from vmc.cloud.link import CloudLink, LinkState, LinkStatus, software_version
from vmc.cloud.sync import JournalSync
from vmc.cloud.telemetry import Telemetry, build_telemetry
from vmc.config import Config
from vmc.dex.hooks import cloud_dex_hook
from vmc.journal import Journal
from vmc.journal.records import format_ts
from vmc.machine import VendMachine
from vmc.payments.qr import QrPayments

log = structlog.get_logger("vmc.daemon")

#: Share of the daemon's stop budget for the cloud link: ``online: false`` and the DISCONNECT.
CLOUD_STOP_TIMEOUT_S = 0.5

Spawn = Callable[[str, Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class CloudWiring:
    """Owns the cloud parts of a run; ``start`` opens them, ``stop`` closes them."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        machine: VendMachine,
        devices: Mapping[str, MdbDevice],
        *,
        motor_present: Callable[[], bool],
        started_mono: float,
        stopping: Callable[[], bool],
    ) -> None:
        self.config = config
        self.journal = journal
        self.machine = machine
        self.devices = devices
        self._motor_present = motor_present
        self._started_mono = started_mono
        self._stopping = stopping
        self.link: CloudLink | None = None
        self.commands: CommandProcessor | None = None
        self.qr: QrPayments | None = None
        self._sync: JournalSync | None = None
        self._telemetry: Telemetry | None = None

    async def start(self, spawn: Spawn) -> None:
        """Start the link as a task of its own: nothing here waits on the network. The
        signed-command processor opens first (its replay cache and unpublished results are on
        disk: a result a previous run could not publish goes out once the link is up)."""
        cloud, journal, machine = self.config.cloud, self.journal, self.machine
        # QR payment is a method of the vend cycle (vmc/payments/qr.py), offered while the link
        # is up; its orders are journaled and published live, its vends come as commands.
        self.qr = QrPayments(
            machine,
            link_up=lambda: self.link is not None and self.link.state is LinkState.UP,
            publish_order=self._publish_order,
        )
        self.commands = await CommandProcessor.open(self.config, journal, machine, qr=self.qr)
        machine_id = self.config.machine.id
        self._sync = JournalSync(
            journal,
            machine_id,
            batch_records=cloud.batch_records,
            max_in_flight=cloud.max_in_flight,
            ack_timeout_s=cloud.ack_timeout_s,
        )
        self._telemetry = Telemetry(self._telemetry_payload, heartbeat_s=cloud.heartbeat_s)
        self.link = CloudLink(
            cloud,
            machine_id,
            boot_id=journal.boot_id,
            version=software_version(),
            sync=self._sync,
            telemetry=self._telemetry,
            commands=self.commands,
        )
        self.commands.on_sync = self.link.request_sync
        self.commands.on_dex = cloud_dex_hook(self.config, journal, self.link.publish_json)
        self.link.add_listener(self._on_link)
        spawn("cloud-link", self.link.run())
        spawn("cloud-telemetry-changes", self._watch_for_telemetry())

    @property
    def status(self) -> LinkStatus | None:
        return self.link.status if self.link is not None else None

    async def stop(self) -> None:
        link = self.link
        if link is None:
            return
        try:
            async with asyncio.timeout(CLOUD_STOP_TIMEOUT_S):
                await link.stop()
        except TimeoutError:
            log.warning("stop: cloud link did not stop in time")
        if self._sync is not None:
            self._sync.close()
        if self.qr is not None:
            await self.qr.close()
            self.qr = None
        if self.commands is not None:
            await self.commands.close()
            self.commands = None

    # --- inside ------------------------------------------------------------------------------

    async def _publish_order(self, payload: Mapping[str, Any]) -> bool:
        link = self.link
        return link is not None and await link.publish_json("orders", dict(payload), qos=1)

    def _on_link(self, status: LinkStatus) -> None:
        if not self._stopping():
            self.machine.hub.publish({"event": "cloud", **status.as_dict()})
        if self._telemetry is not None:
            self._telemetry.changed()

    async def _watch_for_telemetry(self) -> None:
        """Every machine event may change what telemetry shows; it debounces and compares."""
        machine, telemetry, journal = self.machine, self._telemetry, self.journal
        assert telemetry is not None
        had_backlog = journal.backlog > 0

        def backlog_changed(_seq: int = 0) -> None:
            nonlocal had_backlog
            if (journal.backlog > 0) != had_backlog:
                had_backlog = journal.backlog > 0
                telemetry.changed()

        unsubscribe = journal.on_append(backlog_changed)
        queue = machine.hub.subscribe()
        try:
            while True:
                await queue.get()
                telemetry.changed()
                backlog_changed()
        finally:
            machine.hub.unsubscribe(queue)
            unsubscribe()

    def _telemetry_payload(self) -> dict[str, Any]:
        return build_telemetry(
            machine_id=self.config.machine.id,
            ts=_format_now(),
            version=software_version(),
            boot_id=self.journal.boot_id,
            uptime_s=asyncio.get_running_loop().time() - self._started_mono,
            link=self.status,
            snapshot=self.machine.snapshot(),
            devices=self.devices,
            motor_present=self._motor_present(),
            journal=self.journal,
        )


def _format_now() -> str:
    return format_ts(datetime.now(UTC))
