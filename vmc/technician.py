"""The technician's operations on the control interface (docs/control.md, "Technician ops").

The console (vmc/console/), the field-test rig and a future service screen all call these
through the control socket (or, for the in-daemon serial console, ``ControlServer.handle``
in-process): one implementation of each op. Every op that touches a device or the money runs
as a job of the vend cycle's actor (``VendMachine.submit``), so it never overlaps a vend, a
payout or a bill decision; one that could lose money is refused unless the machine is idle
(no credit, no vend, no payout, no bill in escrow, no QR order shown). Every state-changing op
is journaled with the source ``{"kind": "console", "user": ...}``; login, logout, a wrong PIN
and a lockout as ``security`` records.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from drivers.errors import MdbError, MotorError
from drivers.mdb.bill import BillValidator
from drivers.mdb.coin import CoinChanger
from drivers.mdb.device import DeviceState, MdbDevice
from vmc.config import Config
from vmc.console.auth import PinGuard
from vmc.console.login import ConsoleLogin
from vmc.dex.service import DexError, build_dex_report
from vmc.journal import Source
from vmc.journal.files import database_path, open_readonly
from vmc.journal.records import console_source
from vmc.journal.reports import build_report, format_report
from vmc.machine import VendMachine
from vmc.payments.base import Phase, Refusal
from vmc.payments.manual import pay_out_tube, stacker_position
from vmc.planogram import SlotChange

if TYPE_CHECKING:  # the cloud link is imported only when [cloud] is on (docs/footprint.md)
    from vmc.cloud.link import CloudLink

log = structlog.get_logger("vmc.technician")

#: The most records ``journal_tail`` returns at once (a terminal screen's worth, many times).
MAX_TAIL = 500
USER_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
#: Where a login came from, as journaled: ``serial:/dev/ttyGS0``, ``terminal``.
LINE_RE = re.compile(r"[\x20-\x7e]{1,100}")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": code, "message": message}


def _plain(value: object) -> object:
    """JSON-safe copy of device details (IntFlag features, int-keyed maps)."""
    return json.loads(json.dumps(value, default=str))


class Technician:
    """The technician ops. ``cloud``: the cloud link once the daemon has one (else None)."""

    OPS = (
        "console_login",
        "console_logout",
        "console_status",
        "devices",
        "device_reset",
        "coins",
        "coin_fill",
        "coin_payout",
        "bills",
        "bills_emptied",
        "motor_test",
        "set_slot",
        "journal_tail",
        "journal_report",
        "sync",
        "sync_force",
        "config",
        "dex",
    )

    def __init__(
        self,
        config: Config,
        machine: VendMachine,
        devices: Mapping[str, MdbDevice],
        *,
        cloud: Callable[[], CloudLink | None] = lambda: None,
        guard: PinGuard | None = None,
    ) -> None:
        self.config = config
        self.machine = machine
        self.journal = machine.journal
        self.devices = devices
        self._cloud = cloud
        self.login = ConsoleLogin(config.console, machine.journal, guard=guard)

    async def handle(self, op: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one technician op (``op`` is one of ``OPS``)."""
        user = request.get("user", self.config.console.user)
        if not isinstance(user, str) or USER_RE.fullmatch(user) is None:
            return _error("bad_request", '"user": 1 to 32 letters, digits or _.-')
        source = console_source(user)
        try:
            handler: Callable[[Mapping[str, Any], Source], Awaitable[dict[str, Any]]] = getattr(
                self, f"_op_{op}"
            )
            return await handler(request, source)
        except _BadRequest as exc:
            return _error("bad_request", str(exc))

    # --- login (vmc/console/login.py) -------------------------------------------------------

    async def _op_console_login(self, request: Mapping[str, Any], source: Source) -> dict[str, Any]:
        pin = _text(request, "pin", 64)
        return await self.login.login(pin, _line(request), source)

    async def _op_console_logout(
        self, request: Mapping[str, Any], source: Source
    ) -> dict[str, Any]:
        reason = _text(request, "reason", 60)
        await self.login.logout(_line(request), reason, source)
        cash = self.machine.cash
        if cash.fill_mode:  # nobody is filling the tubes any more
            await self._in_actor(lambda: cash.set_fill_mode(False))
        return {"ok": True}

    async def _op_console_status(
        self, _request: Mapping[str, Any], _source: Source
    ) -> dict[str, Any]:
        return {"ok": True, **self.login.status()}

    # --- devices ---------------------------------------------------------------------------

    async def _op_devices(self, _request: Mapping[str, Any], _source: Source) -> dict[str, Any]:
        listed = []
        for name, device in self.devices.items():
            info = device.info
            listed.append(
                {
                    "device": name,
                    "state": device.state.value,
                    "accepting": device.accepting,
                    "level": info.level,
                    "manufacturer": info.manufacturer,
                    "serial": info.serial,
                    "model": info.model,
                    "version": info.version,
                    "details": _plain(info.details),
                }
            )
        motor = {
            "present": self.machine.motor is not None,
            "fault": self.machine.faults.reasons.get("motor", ""),
        }
        return {"ok": True, "devices": listed, "motor": motor}

    async def _op_device_reset(self, request: Mapping[str, Any], source: Source) -> dict[str, Any]:
        name = _text(request, "device", 16)
        device = self.devices.get(name)
        if device is None:
            return _error(
                "unknown_device", f"no MDB device {name!r} (have: {', '.join(self.devices)})"
            )

        async def reset() -> dict[str, Any]:
            self._require_idle("reset a device")
            if device.state not in (DeviceState.READY, DeviceState.FAULT):
                raise Refusal("busy", f"{name} is {device.state.value}: it is starting up anyway")
            await self.journal.append(
                "device",
                {"device": name, "state": "offline", "detail": "reset from the console"},
                source=source,
            )
            device.request_reset("reset from the console")
            return {"ok": True, "device": name, "state": "starting"}

        return await self._in_actor(reset)

    def _require_idle(self, what: str) -> None:
        """Refuse what could lose or mix up money unless nobody is using the machine."""
        machine = self.machine
        if machine.credit > 0:
            raise Refusal(
                "credit", f"cannot {what} while credit is on the machine ({machine.credit})"
            )
        if not machine.idle() or machine.cash.open_payout is not None:
            raise Refusal("busy", f"cannot {what} during a sale, a payout or a bill decision")

    async def _in_actor(self, work: Callable[[], Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.machine.submit(work)
        return result

    # --- coins -----------------------------------------------------------------------------

    def _changer(self) -> CoinChanger:
        device = self.devices.get("coin")
        if not isinstance(device, CoinChanger) or device.state is not DeviceState.READY:
            raise Refusal("unavailable", "the coin changer is not ready")
        return device

    async def _op_coins(self, _request: Mapping[str, Any], _source: Source) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            changer = self._changer()
            status = await changer.tube_status()
            levels = await self.journal.levels()
            tubes = [
                {
                    "coin_type": coin_type,
                    "value": value,
                    "count": count,
                    "full": status.is_full(coin_type),
                    "journal": levels.get(f"tubes.{coin_type}.count", 0),
                }
                for coin_type, (value, count) in sorted(changer.change_tubes(status).items())
            ]
            return {"ok": True, "tubes": tubes, "fill_mode": self.machine.cash.fill_mode}

        return await self._in_actor(read)

    async def _op_coin_fill(self, request: Mapping[str, Any], _source: Source) -> dict[str, Any]:
        on = request.get("on")
        if not isinstance(on, bool):
            raise _BadRequest('coin_fill needs "on": true or false')

        async def switch() -> dict[str, Any]:
            cash = self.machine.cash
            if on and not cash.fill_mode:
                self._changer()
                self._require_idle("fill the tubes")
            await cash.set_fill_mode(on)
            return {"ok": True, "fill_mode": on}

        return await self._in_actor(switch)

    async def _op_coin_payout(self, request: Mapping[str, Any], source: Source) -> dict[str, Any]:
        coin_type = _integer(request, "coin_type", 0, 15)
        count = _integer(request, "count", 1, 255)
        return await self._in_actor(lambda: self._payout(coin_type, count, source))

    async def _payout(self, coin_type: int, count: int, source: Source) -> dict[str, Any]:
        self._changer()
        changer = self.machine.cash.changer
        assert changer is not None
        self._require_idle("pay out a tube")
        if coin_type not in changer.tube_inventory():
            raise Refusal("invalid", f"coin type {coin_type} has no tube")
        return await pay_out_tube(self.machine, changer, coin_type, count, source)

    # --- bills -----------------------------------------------------------------------------

    def _validator(self) -> BillValidator:
        device = self.devices.get("bill")
        if not isinstance(device, BillValidator) or device.state is not DeviceState.READY:
            raise Refusal("unavailable", "the bill validator is not ready")
        return device

    async def _op_bills(self, _request: Mapping[str, Any], _source: Source) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            status = await self._validator().stacker()
            count, value = await stacker_position(self.journal)
            return {
                "ok": True,
                "device_count": status.count,
                "full": status.full,
                "journal_count": count,
                "value": value,
            }

        return await self._in_actor(read)

    async def _op_bills_emptied(
        self, _request: Mapping[str, Any], source: Source
    ) -> dict[str, Any]:
        async def emptied() -> dict[str, Any]:
            if self.machine.cash.escrow_intent is not None:
                raise Refusal("busy", "a bill is in escrow")
            device_count: int | None
            try:
                device_count = (await self._validator().stacker()).count
            except (Refusal, MdbError):
                device_count = None
            count, value = await stacker_position(self.journal)
            data = {"device": "bill", "count": count, "value": value, "device_count": device_count}
            await self.journal.append("cash_removed", data, source=source)
            return {"ok": True, **data}

        return await self._in_actor(emptied)

    # --- motors, planogram -----------------------------------------------------------------

    async def _op_motor_test(self, request: Mapping[str, Any], source: Source) -> dict[str, Any]:
        slot_id = _text(request, "slot", 8)
        return await self._in_actor(lambda: self._motor_test(slot_id, source))

    async def _motor_test(self, slot_id: str, source: Source) -> dict[str, Any]:
        """One turn of the slot's motor, no money. A product that dropped is off the stock
        (``inventory_changed``); one that did not leaves the stock as it is."""
        machine = self.machine
        slot = machine.slots.get(slot_id)
        if slot is None:
            raise Refusal("unknown_slot", f"no slot {slot_id!r}")
        if machine.motor is None:
            raise Refusal("unavailable", "no motor board")
        self._require_idle("test a motor")
        machine.set_phase(Phase.VENDING)
        try:
            motor = self.config.motor
            try:
                result = await machine.motor.run_slot(
                    slot.row,
                    slot.col,
                    turn_timeout_s=motor.turn_timeout_s,
                    drop_timeout_s=motor.drop_timeout_s,
                )
            except MotorError as exc:
                data = {
                    "slot": slot.id,
                    "outcome": "error",
                    "dropped": False,
                    "detail": str(exc)[:200],
                }
                await self.journal.append("motor_test", data, source=source)
                return _error("fault", f"motor board: {exc}")
            data = {
                "slot": slot.id,
                "outcome": result.outcome.value,
                "dropped": result.dropped,
                "detail": result.detail[:200],
            }
            records: list[tuple[str, Mapping[str, Any]]] = [("motor_test", data)]
            new_stock = max(0, slot.stock - 1) if result.dropped else slot.stock
            if new_stock != slot.stock:
                records.append(
                    ("inventory_changed", {"slot": slot.id, "old": slot.stock, "new": new_stock})
                )
            await self.journal.append_many(records, source=source)
            slot.stock = new_stock
            machine.publish("slot", **slot.as_dict(), reason="motor_test")
        finally:
            machine.set_phase(Phase.IDLE)
        return {"ok": True, **data, "stock": slot.stock}

    async def _op_set_slot(self, request: Mapping[str, Any], source: Source) -> dict[str, Any]:
        slot = _text(request, "slot", 8)
        price = _optional_integer(request, "price", 0, 100_000_000)
        stock = _optional_integer(request, "stock", 0, 1_000_000)
        enabled = request.get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            raise _BadRequest('"enabled": true or false')
        if price is None and stock is None and enabled is None:
            raise _BadRequest('set_slot needs "price", "stock" or "enabled"')
        change = SlotChange(slot=slot, price=price, stock=stock, enabled=enabled)
        return await self.machine.change_slot(change, source)

    # --- journal, sync, configuration ------------------------------------------------------

    async def _op_journal_tail(self, request: Mapping[str, Any], _source: Source) -> dict[str, Any]:
        count = _optional_integer(request, "n", 1, MAX_TAIL) or 20
        first = max(1, self.journal.last_seq - count + 1)
        records = await self.journal.records(first, count)
        return {"ok": True, "records": [r.to_wire() for r in records]}

    async def _op_journal_report(
        self, _request: Mapping[str, Any], _source: Source
    ) -> dict[str, Any]:
        machine = self.config.machine
        path = database_path(machine.state_dir)

        def read() -> tuple[dict[str, Any], str]:
            conn = open_readonly(path)
            try:
                report = build_report(conn)
            finally:
                conn.close()
            return report.to_dict(), format_report(report, machine.decimal_places, machine.currency)

        report, text = await asyncio.to_thread(read)
        return {"ok": True, "report": report, "text": text}

    def _sync_state(self) -> dict[str, Any]:
        cloud = self._cloud()
        return {
            "ok": True,
            "cloud_link": cloud.status.as_dict() if cloud is not None else None,
            "last_seq": self.journal.last_seq,
            "acked_upto": self.journal.acked_upto,
            "backlog": self.journal.backlog,
        }

    async def _op_sync(self, _request: Mapping[str, Any], _source: Source) -> dict[str, Any]:
        return self._sync_state()

    async def _op_sync_force(self, _request: Mapping[str, Any], _source: Source) -> dict[str, Any]:
        cloud = self._cloud()
        if cloud is None:
            return _error("unavailable", "no cloud link is configured")
        # Resends every unacknowledged record and telemetry now, or as soon as the link is up.
        cloud.request_sync()
        return {**self._sync_state(), "forced": True}

    async def _op_dex(self, request: Mapping[str, Any], source: Source) -> dict[str, Any]:
        """The EVA-DTS audit report (vmc/dex/); ``reset``: the interim counters start anew
        (an ``audit_read`` record)."""
        reset = request.get("reset", False)
        if not isinstance(reset, bool):
            raise _BadRequest('"reset": true or false')
        try:
            report = await build_dex_report(
                self.journal, self.config, reset=reset, via="console", source=source
            )
        except DexError as exc:
            return _error("dex", str(exc))
        return {"ok": True, "report": report, "reset": reset}

    async def _op_config(self, _request: Mapping[str, Any], _source: Source) -> dict[str, Any]:
        return {"ok": True, "config": self.config.redacted()}


class _BadRequest(ValueError):
    """A request field missing or of the wrong kind."""


def _text(request: Mapping[str, Any], name: str, max_chars: int) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= max_chars:
        raise _BadRequest(f'"{name}": a string of 1 to {max_chars} characters')
    return value


def _line(request: Mapping[str, Any]) -> str:
    line = request.get("line", "socket")
    if not isinstance(line, str) or LINE_RE.fullmatch(line) is None:
        raise _BadRequest('"line": 1 to 100 printable characters')
    return line


def _integer(request: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = request.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _BadRequest(f'"{name}": an integer {low}..{high}')
    return value


def _optional_integer(request: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    return None if request.get(name) is None else _integer(request, name, low, high)
