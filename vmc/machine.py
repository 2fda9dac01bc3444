"""The vend cycle: credit, selection, vend, drop check, change or refund.

One actor task owns the machine's money state. Device events (coins, bills, the return lever,
device states), customer requests (select, cancel) and timers all enter through one queue and
are handled one at a time, so credit is never changed by two things at once. Every money
movement is journaled before the machine acts on it (an intent) and after (the outcome):

* a coin reported by the changer: ``cash_in`` (the changer took it before we could record it;
  start-up reconciles tube counts against the journal for exactly this window);
* a bill in escrow: ``escrow_decision`` before ESCROW, then ``cash_in`` (stacked) or
  ``escrow_returned``;
* a selection: ``vend_intent`` before the motor turns, then ``sale`` or ``vend_failed``;
* change or a refund: ``payout_intent`` before the first DISPENSE, a ``cash_out`` per coin type
  paid, the last one ``final``.

Policies (documented for operators in docs/vend-cycle.md):
* a bill is stacked only if, with it, some sellable item can be bought and its change paid, and
  the credit stays within ``vend.max_credit``; otherwise it is returned;
* a selection needs enough credit, stock, an enabled slot, and exact change for the rest;
* a vend is one turn, the drop sensor, one more turn if nothing dropped, then failure: the
  credit stays for another choice or the return button; a jammed or missing motor takes the
  slot out of sale;
* change is planned exactly from the tube contents (``drivers.mdb.change.plan_change``), never
  greedily; if a tube runs short mid-payout the rest is planned again from what is left, and
  what cannot be paid stays as credit on the display, journaled;
* credit timeout: after ``vend.credit_timeout_s`` without customer activity the credit is paid
  back as if the return lever had been pressed (0 disables it). Credit that cannot be paid back
  exactly stays as credit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from drivers.errors import MdbError, MotorError
from drivers.mdb.bill import BillInEscrow, BillReturned, BillStacked
from drivers.mdb.change import can_pay_all_up_to, plan_change
from drivers.mdb.coin import CoinDeposited, CoinRoute, CoinsDispensedManually, ReturnLeverPressed
from drivers.mdb.device import DeviceEvent, DeviceState, StateChanged
from drivers.motor.base import MotorBoard, MotorOutcome
from vmc import planogram
from vmc.cash import BillPort, ChangerPort
from vmc.config import Config
from vmc.errors import VmcError
from vmc.journal import Journal, JournalError, Source
from vmc.journal.recovery import (
    DeviceFacts,
    customer_credit,
    reconcile_devices,
    resolve_open_intents,
)
from vmc.planogram import Slot, SlotChange

log = structlog.get_logger("vmc.machine")

#: Rounds of planning a payout again after a tube paid short.
MAX_PAYOUT_ROUNDS = 4
#: How long one settlement attempt waits for the changer to report a pending payout's end.
SETTLE_WAIT_S = 2.0
#: How often a motor board that failed is pinged to see whether it is back.
MOTOR_RECHECK_S = 5.0
#: How often the actor wakes without events, to check the credit timeout.
TICK_S = 0.5
#: Bound of the subscriber queue of one control-interface client; a slow client loses events
#: (it can always ask for the full state) rather than slowing the machine down.
SUBSCRIBER_QUEUE_MAX = 256


#: Faults under which nothing is sold, not even for credit already on the machine: no record
#: can be made (journal), the bus to the money devices is gone (mdb: a payout could not be
#: checked), or the daemon is stopping. Other faults (a changer offline) only stop taking money.
#: The key of the machine fault while the daemon stops (no money is taken any more).
STOPPING_FAULT = "stopping"
#: The key of the machine fault while the MDB link is down.
MDB_LINK_FAULT = "mdb"
SELLING_FAULTS = frozenset({"journal", MDB_LINK_FAULT, STOPPING_FAULT})


class Refusal(VmcError):
    """A customer request the machine turns down, with a code a screen can translate."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Phase(enum.Enum):
    IDLE = "idle"
    VENDING = "vending"
    PAYING = "paying"


class EventHub:
    """Fan-out of machine events to control-interface subscribers."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(SUBSCRIBER_QUEUE_MAX)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._queues.discard(queue)

    def publish(self, event: dict[str, Any]) -> None:
        stamped = {"ts_mono": time.monotonic(), **event}
        for queue in list(self._queues):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(stamped)


Work = Callable[[], Awaitable[Any]]


@dataclass
class _Job:
    work: Work
    done: asyncio.Future[Any] | None = None


@dataclass
class MachineFaults:
    """Why the machine cannot take money right now (empty = it can)."""

    reasons: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, reason: str | None) -> bool:
        """Set or clear one reason; True when that changed anything."""
        if reason is None:
            return self.reasons.pop(key, None) is not None
        changed = self.reasons.get(key) != reason
        self.reasons[key] = reason
        return changed


class VendMachine:
    """The cash vend cycle. ``run()`` is its actor task."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        *,
        changer: ChangerPort | None,
        bills: BillPort | None,
        motor: MotorBoard | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.journal = journal
        self.changer = changer
        self.bills = bills
        self.motor = motor
        self._clock = clock
        self.slots: dict[str, Slot] = planogram.slots_from_config(config)
        self.credit = 0
        self.phase = Phase.IDLE
        self.faults = MachineFaults()
        self.hub = EventHub()
        self.started = False
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._last_activity = clock()
        self._escrow_intent: tuple[str, int, int] | None = None  # (intent_id, bill_type, value)
        self._devices_down: set[str] = set()
        self._unsettled: _OpenPayout | None = None  # a payout whose outcome is not known yet
        self._open_payout: _OpenPayout | None = None  # the payout being paid now
        self.device_states: dict[str, str] = {}
        self._next_motor_check = 0.0

    # --- inputs ------------------------------------------------------------------------------

    def submit(self, work: Work) -> asyncio.Future[Any]:
        """Queue work for the actor; the future resolves with its result."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(_Job(work, future))
        return future

    def post(self, work: Work) -> None:
        """Queue work whose result nobody awaits (device events)."""
        self._jobs.put_nowait(_Job(work))

    async def select(self, slot_id: str) -> dict[str, Any]:
        """A customer's selection: vend it for cash credit, or say why not."""
        result: dict[str, Any] = await self.submit(lambda: self._select(slot_id))
        return result

    async def cancel(self) -> dict[str, Any]:
        """The customer asks for their money back (the screen's return button)."""
        result: dict[str, Any] = await self.submit(lambda: self._pay_back("refund"))
        return result

    async def change_slot(self, change: SlotChange, source: Source) -> dict[str, Any]:
        """A planogram change (a cloud command, the console), made by the actor between two
        steps of the vend cycle, so it never races a vend; a vend in progress keeps the price
        its intent carries (vmc/planogram.py)."""
        result: dict[str, Any] = await self.submit(lambda: self._change_slot(change, source))
        return result

    # --- the actor ---------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancellation
                # that arrives as a job does, and the daemon could not stop this loop.
                async with asyncio.timeout(TICK_S):
                    job = await self._jobs.get()
            except TimeoutError:
                await self._tick()
                continue
            try:
                result = await job.work()
            except Refusal as exc:
                if job.done is not None and not job.done.done():
                    job.done.set_result({"ok": False, "error": exc.code, "message": str(exc)})
                continue
            except (JournalError, MdbError, MotorError) as exc:
                log.error("vend cycle step failed", error=str(exc))
                if job.done is not None and not job.done.done():
                    job.done.set_result({"ok": False, "error": "fault", "message": str(exc)})
                continue
            except Exception as exc:
                if job.done is not None and not job.done.done():
                    job.done.set_exception(exc)
                raise
            if job.done is not None and not job.done.done():
                job.done.set_result(result)

    async def _tick(self) -> None:
        if self._unsettled is not None:
            await self._settle_payout()
        if "motor" in self.faults.reasons and self.motor is not None:
            now = self._clock()
            if now >= self._next_motor_check:
                self._next_motor_check = now + MOTOR_RECHECK_S
                if await self.motor.ping():
                    self.set_fault("motor", None)
        timeout = self.config.vend.credit_timeout_s
        if (
            timeout
            and self.credit > 0
            and self.phase is Phase.IDLE
            and self._escrow_intent is None
            and self._clock() - self._last_activity > timeout
        ):
            log.info("credit timeout: paying the credit back", credit=self.credit)
            await self._pay_back("refund")
            self._last_activity = self._clock()

    # --- state for the screen and telemetry --------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "credit": self.credit,
            "currency": self.config.machine.currency,
            "decimal_places": self.config.machine.decimal_places,
            "phase": self.phase.value,
            "in_service": self.accepting_money(),
            "faults": dict(self.faults.reasons),
            "exact_change_only": self.exact_change_only(),
            "max_credit": self.config.vend.max_credit,
            "devices": dict(self.device_states),
            "accepting": {
                name: port.accepting
                for name, port in (("coin", self.changer), ("bill", self.bills))
                if port is not None
            },
            "slots": [s.as_dict() for s in self.slots.values()],
        }

    def _publish(self, event: str, **fields: Any) -> None:
        self.hub.publish({"event": event, **fields})

    def _touch(self) -> None:
        self._last_activity = self._clock()

    # --- money state -------------------------------------------------------------------------

    def accepting_money(self) -> bool:
        return self.started and not self.faults.reasons

    def exact_change_only(self) -> bool:
        """True when the tubes cannot pay every amount of change a sale could need: any amount
        up to ``max_credit`` less the cheapest sellable price."""
        if self.changer is None or not self.changer.ready:
            return True
        sellable = [s.price for s in self.slots.values() if s.sellable]
        if not sellable:
            return False
        limit = max(0, self.config.vend.max_credit - min(sellable))
        return not can_pay_all_up_to(limit, self.changer.tube_inventory())

    def can_pay(self, amount: int) -> bool:
        if amount == 0:
            return True
        if self.changer is None or not self.changer.ready:
            return False
        return plan_change(amount, self.changer.tube_inventory()) is not None

    def _sale_possible_with(self, credit: int) -> bool:
        return any(
            s.sellable and s.price <= credit and self.can_pay(credit - s.price)
            for s in self.slots.values()
        )

    def update_acceptance(self) -> None:
        """Enable the acceptors exactly when the machine may take money now."""
        idle = self.phase is Phase.IDLE and self._escrow_intent is None
        may_take = self.accepting_money() and idle and self.credit < self.config.vend.max_credit
        if self.changer is not None:
            self.changer.set_accepting(may_take)
        if self.bills is not None:
            self.bills.set_accepting(may_take and self.config.vend.accept_bills)

    def set_fault(self, key: str, reason: str | None) -> None:
        """A reason to stop taking money appears (text) or goes away (None)."""
        if self.faults.set(key, reason):
            log.warning(
                "machine fault" if reason else "machine fault cleared", key=key, reason=reason or ""
            )
            self._publish(
                "service", in_service=self.accepting_money(), faults=dict(self.faults.reasons)
            )
        self.update_acceptance()

    def _set_credit(self, credit: int) -> None:
        if credit < 0:
            # Never below zero: the customer cannot owe the machine. A ledger that says so has
            # counted money out that did not leave (or missed money in): reconciliation of the
            # device counters settles the difference.
            log.error("credit would go below zero; kept at zero", credit=credit)
            credit = 0
        if credit != self.credit:
            self.credit = credit
            self._publish("credit", credit=credit)

    def _set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self._publish("phase", phase=phase.value)
        self.update_acceptance()

    # --- cash in -----------------------------------------------------------------------------

    async def coin_in(self, coin_type: int, value: int, route: str) -> None:
        """A coin the changer took (it is already in a tube or the cashbox)."""
        await self.journal.append(
            "cash_in",
            {"amount": value, "device": "coin", "route": route, "coin_type": coin_type},
        )
        self._touch()
        self._set_credit(self.credit + value)
        self._publish("cash_in", device="coin", amount=value, route=route)
        self.update_acceptance()

    async def bill_in_escrow(self, bill_type: int, value: int) -> None:
        """Decide, journal the decision, then tell the validator to stack or return."""
        self._touch()
        with_bill = self.credit + value
        stack = (
            self.accepting_money()
            and self.phase is Phase.IDLE
            and with_bill <= self.config.vend.max_credit
            and self._sale_possible_with(with_bill)
        )
        intent_id = _new_id()
        await self.journal.append(
            "escrow_decision",
            {
                "intent_id": intent_id,
                "bill_type": bill_type,
                "amount": value,
                "decision": "stack" if stack else "return",
            },
        )
        # Kept until the validator reports the bill stacked or returned (a jam can take a
        # technician); start-up recovery settles it from the stacker count after a crash.
        self._escrow_intent = (intent_id, bill_type, value)
        self.update_acceptance()
        self._publish("escrow", amount=value, decision="stack" if stack else "return")
        assert self.bills is not None
        await self.bills.escrow(stack)

    async def bill_stacked(self, bill_type: int, value: int) -> None:
        pending = self._escrow_intent
        data: dict[str, Any] = {
            "amount": value,
            "device": "bill",
            "route": "stacker",
            "bill_type": bill_type,
        }
        if pending is not None and pending[1] == bill_type:
            data["intent_id"] = pending[0]
        await self.journal.append("cash_in", data)
        self._escrow_intent = None
        self._touch()
        self._set_credit(self.credit + value)
        self._publish("cash_in", device="bill", amount=value, route="stacker")
        self.update_acceptance()

    async def bill_returned(self, bill_type: int) -> None:
        pending = self._escrow_intent
        if pending is not None and pending[1] == bill_type:
            await self.journal.append("escrow_returned", {"intent_id": pending[0]})
            self._escrow_intent = None
            self._publish("bill_returned", amount=pending[2])
        self.update_acceptance()

    # --- selection and vend ------------------------------------------------------------------

    def check_selection(self, slot_id: str) -> Slot:
        slot = self.slots.get(slot_id)
        if slot is None:
            raise Refusal("unknown_slot", f"no slot {slot_id!r}")
        if not self.started or not SELLING_FAULTS.isdisjoint(self.faults.reasons):
            raise Refusal("out_of_service", "the machine is out of service")
        if self.phase is not Phase.IDLE or self._escrow_intent is not None:
            raise Refusal("busy", "a vend or payout is in progress")
        if self._unsettled is not None:
            raise Refusal("busy", "the last payout is being checked; please wait")
        if not slot.in_sale:
            raise Refusal("slot_disabled", f"slot {slot_id} is out of sale")
        if slot.stock <= 0:
            raise Refusal("sold_out", f"slot {slot_id} is sold out")
        if self.motor is None or "motor" in self.faults.reasons:
            raise Refusal("out_of_service", "the dispenser is out of service")
        if self.credit < slot.price:
            raise Refusal("insufficient_credit", f"insert {slot.price - self.credit} more")
        if not self.can_pay(self.credit - slot.price):
            raise Refusal("no_change", "change cannot be paid: use exact money or choose again")
        return slot

    async def _select(self, slot_id: str) -> dict[str, Any]:
        self._touch()
        slot = self.check_selection(slot_id)
        if self.credit > slot.price and self.changer is not None and self.changer.ready:
            # Decide on the tubes as they are now, not as the last deposit left them.
            await self.changer.refresh_tubes()
            slot = self.check_selection(slot_id)
        intent_id = _new_id()
        price = slot.price
        await self.journal.append(
            "vend_intent",
            {"intent_id": intent_id, "slot": slot.id, "price": price, "method": "cash"},
        )
        self._set_phase(Phase.VENDING)
        self._publish("vend_started", slot=slot.id, price=price)
        try:
            return await self._vend(slot, intent_id, price)
        finally:
            # Also when a step failed (journal, bug) or the daemon is stopping: the machine must
            # not stay "busy". An intent left open is resolved by start-up recovery (credit kept,
            # never a second vend).
            if self.phase is not Phase.IDLE:
                self._set_phase(Phase.IDLE)

    async def _vend(self, slot: Slot, intent_id: str, price: int) -> dict[str, Any]:
        dropped, reason = await self._dispense_product(slot)
        if not dropped:
            await self.journal.append(
                "vend_failed",
                {
                    "intent_id": intent_id,
                    "slot": slot.id,
                    "price": price,
                    "method": "cash",
                    "reason": reason,
                },
            )
            self._publish("vend_failed", slot=slot.id, reason=reason, credit=self.credit)
            return {"ok": False, "error": "vend_failed", "message": reason, "credit": self.credit}
        change = self.credit - price
        await self.journal.append(
            "sale",
            {
                "intent_id": intent_id,
                "slot": slot.id,
                "price": price,
                "method": "cash",
                "paid": price,
                "change": change,
            },
        )
        slot.stock -= 1
        self._set_credit(change)
        self._publish("sale", slot=slot.id, price=price, change=change, stock=slot.stock)
        paid = 0
        if change:
            self._set_phase(Phase.PAYING)
            paid = await self._payout(change, "change")
        return {"ok": True, "slot": slot.id, "price": price, "change": paid, "credit": self.credit}

    async def _dispense_product(self, slot: Slot) -> tuple[bool, str]:
        """One turn, the drop sensor, one more turn if nothing dropped. (dropped, reason)."""
        assert self.motor is not None
        motor_cfg = self.config.motor
        for turn in (1, 2):
            try:
                result = await self.motor.run_slot(
                    slot.row,
                    slot.col,
                    turn_timeout_s=motor_cfg.turn_timeout_s,
                    drop_timeout_s=motor_cfg.drop_timeout_s,
                )
            except MotorError as exc:
                self.set_fault("motor", f"motor board: {exc}")
                return False, f"motor board: {exc}"
            if result.dropped:
                return True, ""
            if result.outcome in (MotorOutcome.JAMMED, MotorOutcome.NO_MOTOR):
                await self._take_slot_out(slot, result.outcome.value)
                return False, f"{result.outcome.value}: {result.detail}"
            log.info("no drop seen", slot=slot.id, turn=turn, outcome=result.outcome.value)
        return False, "no product dropped after two turns"

    async def _take_slot_out(self, slot: Slot, why: str) -> None:
        """Out of sale until a restart or a ``set_slot``: not a planogram change."""
        slot.taken_out = why
        await self.journal.append(
            "slot_changed", {"slot": slot.id, "enabled": False, "reason": why}
        )
        self._publish("slot", **slot.as_dict(), reason=why)

    async def _change_slot(self, change: SlotChange, source: Source) -> dict[str, Any]:
        refused = planogram.check_change(self.slots, change)
        if refused is not None:
            raise Refusal(*refused)
        slot = self.slots[change.slot]
        await self.journal.append_many(planogram.change_records(slot, change), source=source)
        planogram.apply_change(slot, change)
        self._publish("slot", **slot.as_dict(), reason=source["kind"])
        self.update_acceptance()
        return {"ok": True, **slot.as_dict()}

    # --- cash out ----------------------------------------------------------------------------

    async def _pay_back(self, reason: str) -> dict[str, Any]:
        self._touch()
        if self.phase is not Phase.IDLE or self._unsettled is not None:
            raise Refusal("busy", "a vend or payout is in progress")
        self._set_phase(Phase.PAYING)
        try:
            if self.changer is not None and self.changer.ready:
                # Coins the changer took before acceptance went off are reported now; credit
                # them first, so the customer gets back everything they put in.
                await self.changer.stop_accepting()
                await self._absorb_device_events()
            if self.credit == 0:
                return {"ok": True, "paid": 0, "credit": 0}
            paid = await self._payout(self.credit, reason)
        finally:
            self._set_phase(Phase.IDLE)
        return {"ok": paid > 0 or self.credit == 0, "paid": paid, "credit": self.credit}

    async def _absorb_device_events(self) -> None:
        """Run the device events already queued for the actor (coins reported while it was
        busy) now, ahead of customer work, which keeps its order."""
        others: list[_Job] = []
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            if job.done is None:  # a device event: nobody awaits it
                await job.work()
            else:
                others.append(job)
        for job in others:
            self._jobs.put_nowait(job)

    async def _payout(self, amount: int, reason: str) -> int:
        """Pay ``amount`` of the customer's credit in coins; return what was paid.

        What cannot be paid stays as credit. If the changer cannot say what a DISPENSE paid
        (it went away, or never reported the end), the payout stays open as ``_unsettled``:
        money is neither taken nor sold against until the changer's own report or tube counts
        settle it (``_settle_payout``)."""
        changer = self.changer
        if changer is None or not changer.ready:
            self._publish("payout_short", wanted=amount, paid=0, credit=self.credit)
            return 0
        # Acceptance off on the wire first, then the tube counts: a coin that entered a tube
        # during the payout would hide a coin that left it from a recovery that has only the
        # counts to go by. With the counts in the intent, recovery measures the payout alone;
        # coins that went in before (and whose report a crash lost) show up as a surplus.
        await changer.stop_accepting()
        tubes = {str(t): n for t, n in (await changer.tube_counts_now()).items()}
        intent_id = _new_id()
        await self.journal.append(
            "payout_intent",
            {"intent_id": intent_id, "amount": amount, "reason": reason, "tubes": tubes},
        )
        self._publish("payout_started", amount=amount, reason=reason)
        self._open_payout = _OpenPayout(intent_id, reason, amount)
        paid_coins: dict[int, int] = {}
        paid_total = 0
        try:
            # Each round plans what is still owed from the tubes as they are now; a tube that
            # ran short mid-payout is read again and the rest planned from what is left.
            for round_ in range(MAX_PAYOUT_ROUNDS):
                if paid_total >= amount:
                    break
                if round_:
                    await changer.refresh_tubes()
                plan = plan_change(amount - paid_total, changer.tube_inventory())
                if plan is None:
                    break
                short = False
                for coin_type, count in sorted(plan.items(), key=lambda kv: -kv[1]):
                    got = await changer.dispense(coin_type, count)
                    paid_total += await self._record_paid({coin_type: got})
                    paid_coins[coin_type] = paid_coins.get(coin_type, 0) + got
                    if got < count:
                        short = True
                        break
                if not short:
                    break
        except MdbError as exc:
            paid_total += await self._record_paid(getattr(exc, "paid", {}))
            self._unsettled, self._open_payout = self._open_payout, None
            self.set_fault("coin", f"payout outcome unknown: {exc}")
            self._set_credit(self.credit - paid_total)
            log.error(
                "payout outcome unknown; settling when the changer reports",
                intent_id=intent_id,
                paid_so_far=paid_total,
                error=str(exc),
            )
            return paid_total
        await self.journal.append(
            "cash_out",
            {"intent_id": intent_id, "amount": 0, "reason": reason, "coins": {}, "final": True},
        )
        self._open_payout = None
        self._set_credit(self.credit - paid_total)
        self._publish(
            "payout_done",
            wanted=amount,
            paid=paid_total,
            credit=self.credit,
            coins={str(k): v for k, v in paid_coins.items()},
        )
        if paid_total < amount:
            log.warning("payout short", wanted=amount, paid=paid_total, credit=self.credit)
        return paid_total

    async def _record_paid(self, coins: Mapping[int, int], final: bool = False) -> int:
        """Journal coins that left the tubes for the open payout; return their value.

        A payout never records more than its intent's amount: coins counted beyond it are a
        miscount (or a changer paying more than asked), not the customer's money. They are
        logged as a fault and left to the reconciliation of the tube counts."""
        assert self.changer is not None
        payout = self._open_payout or self._unsettled
        assert payout is not None, "coins recorded outside a payout"
        paid = {t: n for t, n in coins.items() if n > 0}
        value = sum(n * self.changer.coin_value(t) for t, n in paid.items())
        room = payout.amount - payout.recorded
        if value > room:
            kept = _coins_within(paid, room, self.changer.coin_value)
            log.error(
                "payout counted more than its intent; recording what fits",
                intent_id=payout.intent_id,
                intent_amount=payout.amount,
                recorded=payout.recorded,
                counted={str(t): n for t, n in paid.items()},
                recording={str(t): n for t, n in kept.items()},
            )
            paid = kept
            value = sum(n * self.changer.coin_value(t) for t, n in paid.items())
        payout.recorded += value
        if paid or final:
            data: dict[str, Any] = {
                "intent_id": payout.intent_id,
                "amount": value,
                "reason": payout.reason,
                "coins": {str(t): n for t, n in paid.items()},
            }
            if final:
                data["final"] = True
            await self.journal.append("cash_out", data)
        return value

    async def _settle_payout(self) -> None:
        """Close a payout whose outcome was unknown, from the changer's report or tube counts."""
        if self._unsettled is None or self.changer is None or not self.changer.ready:
            return
        coins = await self.changer.settle_pending(SETTLE_WAIT_S)
        if coins is None:
            return  # still not known: try again at the next tick
        intent_id = self._unsettled.intent_id
        value = await self._record_paid(coins, final=True)
        self._unsettled = None
        self._set_credit(self.credit - value)
        log.warning("payout settled", intent_id=intent_id, paid=value, credit=self.credit)
        self._publish(
            "payout_done",
            wanted=value,
            paid=value,
            credit=self.credit,
            coins={str(k): v for k, v in coins.items()},
        )
        self.set_fault("coin", None)

    # --- start-up ----------------------------------------------------------------------------

    async def recover(self, facts: DeviceFacts) -> None:
        """Start-up: resolve what a crash left open, reconcile the devices' own counters with
        the journal, then take credit and stock from the journal (the single source of truth).
        Runs once, before the acceptors are enabled."""
        resolved = await resolve_open_intents(self.journal, facts)
        corrections = await reconcile_devices(self.journal, facts)
        for record in (*resolved, *corrections):
            log.warning("start-up recovery", type=record.type, **record.data)
        # Price, in-sale flag and stock: the journal's, or the configuration file's where it
        # was edited since the last start (vmc/planogram.py).
        await planogram.restore(self.journal, self.config, self.slots)
        credit = customer_credit(await self.journal.counters())
        self._restore(credit)

    def _restore(self, credit: int, stock: Mapping[str, int] | None = None) -> None:
        """Take up ``credit`` (and ``stock``, when given: tests that skip recovery)."""
        self.credit = credit
        for slot_id, count in (stock or {}).items():
            if slot_id in self.slots:
                self.slots[slot_id].stock = count
        self.started = True
        self._touch()
        stock = {s.id: s.stock for s in self.slots.values()}
        log.info("vend cycle ready", credit=credit, stock=stock)
        self._publish("credit", credit=credit)
        self._publish(
            "service", in_service=self.accepting_money(), faults=dict(self.faults.reasons)
        )
        self.update_acceptance()

    # --- device events -----------------------------------------------------------------------

    def on_device_event(self, event: DeviceEvent) -> None:
        """Called by the devices (synchronously, on the loop): queue the event for the actor."""
        if isinstance(event, CoinDeposited):
            if event.credited and not event.token and event.value > 0:
                route = "tubes" if event.route is CoinRoute.TUBES else "cashbox"
                ct, value = event.coin_type, event.value
                self.post(lambda: self.coin_in(ct, value, route))
        elif isinstance(event, ReturnLeverPressed):
            self.post(self._lever)
        elif isinstance(event, CoinsDispensedManually):
            ev = event
            self.post(lambda: self._manual_dispense(ev.coin_type, ev.count, ev.value))
        elif isinstance(event, BillInEscrow):
            bt, value = event.bill_type, event.value
            self.post(lambda: self.bill_in_escrow(bt, value))
        elif isinstance(event, BillStacked):
            bt, value = event.bill_type, event.value
            self.post(lambda: self.bill_stacked(bt, value))
        elif isinstance(event, BillReturned):
            bt = event.bill_type
            self.post(lambda: self.bill_returned(bt))
        elif isinstance(event, StateChanged):
            state_event = event
            self.post(lambda: self._device_state(state_event))

    async def _lever(self) -> dict[str, Any]:
        return await self._pay_back("lever")

    async def _manual_dispense(self, coin_type: int, count: int, value: int) -> None:
        """A technician pressed the changer's own dispense button: not customer money."""
        await self.journal.append(
            "cash_out",
            {"amount": value, "reason": "manual", "coins": {str(coin_type): count}},
        )

    async def _device_state(self, event: StateChanged) -> None:
        state = event.state
        self.device_states[event.device] = state.value
        self._publish("device", device=event.device, state=state.value, detail=event.detail)
        if state is DeviceState.STARTING:
            return
        was_down = event.device in self._devices_down
        if state is DeviceState.READY:
            self._devices_down.discard(event.device)
            journal_state = "recovered" if was_down else "online"
        else:
            self._devices_down.add(event.device)
            journal_state = "offline" if state is DeviceState.OFFLINE else "fault"
        if self.started or state is not DeviceState.OFFLINE:
            await self.journal.append(
                "device",
                {"device": event.device, "state": journal_state, "detail": event.detail[:200]},
            )
        if event.device == "coin":
            # Without the changer no change can be paid: take no money at all. A payout whose
            # outcome is unknown keeps the fault until it is settled.
            if state is DeviceState.READY and self._unsettled is not None:
                await self._settle_payout()
            elif state is DeviceState.READY:
                self.set_fault("coin", None)
            else:
                self.set_fault("coin", f"coin changer {state.value}")
        else:
            self.update_acceptance()


@dataclass
class _OpenPayout:
    """A payout intent journaled and not yet closed: what it may still record."""

    intent_id: str
    reason: str
    amount: int
    recorded: int = 0


def _coins_within(
    coins: Mapping[int, int], limit: int, value_of: Callable[[int], int]
) -> dict[int, int]:
    """The coins of ``coins`` worth at most ``limit``, dropping the largest first."""
    kept = dict(coins)
    for coin_type in sorted(kept, key=value_of, reverse=True):
        while kept[coin_type] > 0 and sum(value_of(t) * n for t, n in kept.items()) > limit:
            kept[coin_type] -= 1
    return {t: n for t, n in kept.items() if n > 0}


def _new_id() -> str:
    return uuid.uuid4().hex
