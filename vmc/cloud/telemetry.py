"""Telemetry: the machine's current state, retained on ``PREFIX/M/telemetry`` at QoS 0.

Published at every connection, ``TELEMETRY_DEBOUNCE_S`` after a change (changes within that
time make one message, and nothing goes out when what changed is not in the payload), on the
``sync`` command, and as a heartbeat when nothing was sent for ``cloud.heartbeat_s`` (default
900 s, the contract's 15 minutes). Liveness comes from ``status`` and its will, not from this.

The payload (docs/cloud.md has the field list): ``machine``, ``ts``, ``version``, ``boot_id``,
``uptime_s``, ``link``, ``in_service``, ``faults``, ``devices`` (each device's ``state`` and
``faults``), ``coin_tubes``, ``bill_stacker``, ``slots`` (price, currency, stock, capacity,
enabled, sellable), ``door`` (``null``: the machine has no door switch yet), ``journal``
(``unacked``, ``last_seq``, ``acked_upto``, ``journal``).

What counts as a change: everything but ``ts``, ``uptime_s`` and the journal's counts, of which
only "any unacknowledged or none" counts (a busy machine would otherwise send telemetry after
every sale's records and their ack, on a metered SIM).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import structlog

from vmc.cloud.link import MAX_PAYLOAD_BYTES, LinkStatus, encode_payload
from vmc.log import FailureLog

if TYPE_CHECKING:
    from drivers.mdb.device import MdbDevice
    from vmc.cloud.link import Session
    from vmc.journal import Journal

log = structlog.get_logger("vmc.cloud.telemetry")

#: Changes within this long after the first make one telemetry message: a sale changes credit,
#: phase, stock and tube levels within a second or two.
TELEMETRY_DEBOUNCE_S: Final = 2.0

#: The door has no switch input yet (a later issue): telemetry says ``"door": null``.
DOOR_UNKNOWN: Final = None


def significant(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a telemetry payload whose change is worth a message."""
    out = {k: v for k, v in payload.items() if k not in ("ts", "uptime_s", "journal")}
    journal = payload.get("journal")
    if isinstance(journal, Mapping):
        out["journal_unacked_any"] = bool(journal.get("unacked"))
        out["journal_id"] = journal.get("journal")
    return out


def build_telemetry(
    *,
    machine_id: str,
    ts: str,
    version: str,
    boot_id: str,
    uptime_s: float,
    link: LinkStatus | None,
    snapshot: Mapping[str, Any],
    devices: Mapping[str, MdbDevice],
    motor_present: bool,
    journal: Journal | None,
) -> dict[str, Any]:
    """The telemetry payload from what the daemon knows: the machine's snapshot (faults,
    devices, slots), the MDB devices' own last readings (tubes, stacker), the journal."""
    from drivers.mdb.bill import BillValidator
    from drivers.mdb.coin import CoinChanger

    faults: dict[str, str] = dict(snapshot.get("faults", {}))
    currency = snapshot.get("currency")
    device_states: dict[str, str] = dict(snapshot.get("devices", {}))
    out_devices: dict[str, dict[str, Any]] = {}
    for name, device in devices.items():
        state = device_states.get(name, device.state.value)
        out_devices[name] = {
            "state": state,
            "faults": [reason for cause, reason in faults.items() if cause == name],
        }
    if motor_present or "motor" in faults:
        out_devices["motor"] = {
            "state": "fault" if "motor" in faults else "ready",
            "faults": [faults["motor"]] if "motor" in faults else [],
        }
    coin_tubes: list[dict[str, Any]] | None = None
    changer = devices.get("coin")
    if isinstance(changer, CoinChanger) and changer.setup is not None:
        tubes = changer.tubes
        coin_tubes = [
            {
                "coin_type": coin.coin_type,
                "value": coin.value,
                "count": tubes.count(coin.coin_type) if tubes is not None else None,
                "full": tubes.is_full(coin.coin_type) if tubes is not None else None,
            }
            for coin in changer.setup.coins
            if coin.routable and coin.value > 0
        ]
    bill_stacker: dict[str, Any] | None = None
    validator = devices.get("bill")
    if isinstance(validator, BillValidator) and validator.details.stacker is not None:
        stacker = validator.details.stacker
        bill_stacker = {"count": stacker.count, "full": stacker.full}
    slots = [
        {
            "slot": slot["slot"],
            "name": slot.get("name", ""),
            "price": slot["price"],
            "currency": currency,
            "stock": slot["stock"],
            "capacity": slot.get("capacity"),
            "enabled": slot["enabled"],
            "sellable": slot.get("sellable"),
        }
        for slot in snapshot.get("slots", [])
    ]
    journal_part: dict[str, Any] | None = None
    if journal is not None:
        journal_part = {
            "journal": journal.journal_id,
            "unacked": journal.backlog,
            "last_seq": journal.last_seq,
            "acked_upto": journal.acked_upto,
        }
    return {
        "machine": machine_id,
        "ts": ts,
        "version": version,
        "boot_id": boot_id,
        "uptime_s": round(uptime_s, 1),
        "link": link.as_dict() if link is not None else None,
        "in_service": snapshot.get("in_service"),
        "phase": snapshot.get("phase"),
        "faults": faults,
        "devices": out_devices,
        "coin_tubes": coin_tubes,
        "bill_stacker": bill_stacker,
        "currency": currency,
        "slots": slots,
        "door": DOOR_UNKNOWN,
        "journal": journal_part,
    }


class Telemetry:
    """Publishes ``build()`` while the link is up: on change (debounced), on request, and as a
    heartbeat. ``changed()`` and ``request()`` may be called any time, link up or not."""

    def __init__(
        self,
        build: Callable[[], dict[str, Any]],
        *,
        heartbeat_s: float,
        debounce_s: float = TELEMETRY_DEBOUNCE_S,
    ) -> None:
        self._build = build
        self.heartbeat_s = heartbeat_s
        self.debounce_s = debounce_s
        self._wake = asyncio.Event()
        self._dirty = False
        self._requested = False
        self._last: dict[str, Any] | None = None
        self._oversize_log = FailureLog(log)
        #: Messages published by this run, for tests and the bench.
        self.published = 0
        self.heartbeats = 0

    def changed(self) -> None:
        """Something the payload shows may have changed."""
        self._dirty = True
        self._wake.set()

    def request(self) -> None:
        """Publish now (the ``sync`` command)."""
        self._requested = True
        self._wake.set()

    async def _publish(self, session: Session, reason: str) -> None:
        payload = self._build()
        data = encode_payload(payload)
        if len(data) > MAX_PAYLOAD_BYTES:  # a planogram of hundreds of slots
            # Every publish until the planogram shrinks: said once, repeats at DEBUG.
            self._oversize_log.failed("telemetry over 64 KiB: slots left out", size=len(data))
            payload = {**copy.copy(payload), "slots": None, "slots_omitted": True}
            data = encode_payload(payload)
        else:
            self._oversize_log.recovered("telemetry within 64 KiB again", size=len(data))
        await session.publish("telemetry", data, qos=0, retain=True)
        self._last = significant(payload)
        self.published += 1
        if reason == "heartbeat":
            self.heartbeats += 1
        log.debug("telemetry published", reason=reason, size=len(data))

    async def run(self, session: Session) -> None:
        """While the connection lasts (cancelled when it ends)."""
        loop = asyncio.get_running_loop()
        self._dirty = self._requested = False
        await self._publish(session, "connected")
        last_sent = loop.time()
        while True:
            self._wake.clear()
            if self._requested:
                self._requested = False
                await self._publish(session, "requested")
                last_sent = loop.time()
                continue
            if self._dirty:
                await asyncio.sleep(self.debounce_s)  # gather what changes with it
                self._dirty = False
                if significant(self._build()) != self._last:
                    await self._publish(session, "changed")
                    last_sent = loop.time()
                continue
            left = last_sent + self.heartbeat_s - loop.time()
            if left <= 0:
                await self._publish(session, "heartbeat")
                last_sent = loop.time()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)
