"""The vend cycle: select → authorise → vend → drop check → settle or refund.

One actor task owns the machine's state. Device events (coins, bills, the return lever, device
states), customer requests (select, cancel, a QR order), signed commands (a QR vend, planogram
changes) and timers all enter through one queue and are handled one at a time, so credit, stock
and orders are never changed by two things at once.

A sale is the same few steps whatever pays for it (``vend_cycle``): the slot is checked, the
payment method authorises it (vmc/payments/: cash from the customer's credit, QR from a paid
e-wallet order; a card reader next), ``vend_intent`` is durable before the motor turns, the
motor turns once, the drop sensor is watched, one more turn if nothing dropped; then ``sale`` and
the payment is settled (cash pays the change), or ``vend_failed`` and the payment is refunded
its way (cash keeps the credit, QR journals a ``refund`` for the backend). A jammed or missing
motor takes the slot out of sale.

The cash method (vmc/payments/cash.py) holds the credit and every coin and bill; its policies
are documented there and for operators in docs/vend-cycle.md and docs/payments.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from drivers.errors import MdbError, MotorError
from drivers.mdb.bill import BillInEscrow, BillReturned, BillStacked
from drivers.mdb.coin import CoinDeposited, CoinRoute, CoinsDispensedManually, ReturnLeverPressed
from drivers.mdb.device import DeviceEvent, DeviceInfo, DeviceState, StateChanged
from drivers.motor.base import MotorBoard, MotorOutcome, TurnOutcomeUnknown
from vmc import planogram
from vmc.cash import BillPort, ChangerPort
from vmc.config import Config
from vmc.journal import Journal, JournalError, Source
from vmc.journal.recovery import (
    VEND_INTERRUPTED,
    DeviceFacts,
    customer_credit,
    expire_open_orders,
    reconcile_devices,
    resolve_open_intents,
)
from vmc.log import bound_ids, current_ids
from vmc.payments.base import Authoriser, Payment, PaymentMethod, Phase, Refusal
from vmc.payments.cash import CashPayments
from vmc.planogram import Slot, SlotChange

__all__ = [
    "MDB_LINK_FAULT",
    "SELLING_FAULTS",
    "STOPPING_FAULT",
    "EventHub",
    "MachineFaults",
    "Phase",
    "Refusal",
    "VendMachine",
]

log = structlog.get_logger("vmc.machine")

#: How often a motor board that failed is pinged to see whether it is back.
MOTOR_RECHECK_S = 5.0
#: How often the actor checks the credit timeout and orders' expiry, busy with jobs or not.
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
    #: A fact the devices already made true (a coin in a tube, coins out by hand, a bill
    #: stacked or returned): journaling it decides nothing, so a payout may run it first.
    fact: bool = False
    #: The flow ids of whoever submitted it (a command's ``cmd_id``): its lines carry them.
    log_ids: dict[str, Any] = field(default_factory=current_ids)


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
    """The vend cycle. ``run()`` is its actor task."""

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
        self.motor = motor
        self._clock = clock
        self.slots: dict[str, Slot] = planogram.slots_from_config(config)
        self.phase = Phase.IDLE
        self.faults = MachineFaults()
        self.hub = EventHub()
        self.started = False
        #: The cash payment method: the customer's credit, coins, bills, change.
        self.cash = CashPayments(self, changer, bills)
        #: Other payment methods (``attach``): name → method (``qr``).
        self.methods: dict[str, PaymentMethod] = {}
        #: Customer sessions of other methods in progress (a QR order shown): method → what.
        #: While one is open the acceptors are off and a cash selection waits.
        self.sessions: dict[str, str] = {}
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._last_activity = clock()
        self._devices_down: set[str] = set()
        self.device_states: dict[str, str] = {}
        self._next_motor_check = 0.0
        #: Called with ``idle()`` whenever it changes (checked after each step of the actor).
        self.idle_listeners: list[Callable[[bool], None]] = []
        self._was_idle: bool | None = None

    # --- what the cash method holds, as the machine shows it ---------------------------------

    @property
    def changer(self) -> ChangerPort | None:
        return self.cash.changer

    @property
    def bills(self) -> BillPort | None:
        return self.cash.bills

    @property
    def credit(self) -> int:
        """The customer's cash credit (minor units)."""
        return self.cash.credit

    @property
    def _escrow_intent(self) -> tuple[str, int, int] | None:
        return self.cash.escrow_intent

    def exact_change_only(self) -> bool:
        return self.cash.exact_change_only()

    def can_pay(self, amount: int) -> bool:
        return self.cash.can_pay(amount)

    def attach(self, method: PaymentMethod) -> None:
        """Add a payment method beside cash (its ``tick`` runs from the actor, its
        ``snapshot`` is in STATE under its name)."""
        self.methods[method.name] = method

    # --- inputs ------------------------------------------------------------------------------

    def submit(self, work: Work) -> asyncio.Future[Any]:
        """Queue work for the actor; the future resolves with its result."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(_Job(work, future))
        return future

    def post(self, work: Work, *, fact: bool = False) -> None:
        """Queue work whose result nobody awaits (device events); ``fact``: see ``_Job``."""
        # A device event is the machine's, not the flow of whatever polled when it came (a
        # payout inside a vend): it runs with the session's ids only.
        self._jobs.put_nowait(_Job(work, fact=fact, log_ids={}))

    async def select(self, slot_id: str) -> dict[str, Any]:
        """A customer's selection: vend it for cash credit, or say why not."""
        result: dict[str, Any] = await self.submit(lambda: self.vend_cycle(slot_id, self.cash))
        return result

    async def cancel(self) -> dict[str, Any]:
        """The customer asks for their money back (the screen's return button)."""
        result: dict[str, Any] = await self.submit(lambda: self.cash.pay_back("refund"))
        return result

    async def change_slot(self, change: SlotChange, source: Source) -> dict[str, Any]:
        """A planogram change (a cloud command, the console), made by the actor between two
        steps of the vend cycle, so it never races a vend; a vend in progress keeps the price
        its intent carries (vmc/planogram.py)."""
        result: dict[str, Any] = await self.submit(lambda: self._change_slot(change, source))
        return result

    async def coin_in(self, coin_type: int, value: int, route: str) -> None:
        """A coin the changer took (run by the actor)."""
        await self.cash.coin_in(coin_type, value, route)

    # --- the actor ---------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + TICK_S
        while True:
            # The tick keeps its pace however busy the queue is: a client sending ops (or a
            # device sending events) more often than TICK_S must not hold back the credit
            # time-out or the expiry of a QR order.
            if loop.time() >= next_tick:
                next_tick = loop.time() + TICK_S
                with self._flow_ids({}):
                    await self._tick()
                continue
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancellation
                # that arrives as a job does, and the daemon could not stop this loop.
                async with asyncio.timeout(next_tick - loop.time()):
                    job = await self._jobs.get()
            except TimeoutError:
                continue
            with self._flow_ids(job.log_ids):
                await self._run_job(job)

    @contextlib.contextmanager
    def _flow_ids(self, queued: Mapping[str, Any]) -> Iterator[None]:
        """One step of the actor logs with the ids of its flow (the cash session on, those of
        whoever queued it); none is left bound for the next step."""
        with bound_ids(**{"session_id": self.cash.session_id, **queued}):
            try:
                yield
            finally:
                self.cash.end_session_if_done()
                self._tell_idle()

    def _tell_idle(self) -> None:
        idle = self.idle()
        if idle is not self._was_idle:
            self._was_idle = idle
            for listener in self.idle_listeners:
                listener(idle)

    async def _run_job(self, job: _Job) -> None:
        try:
            result = await job.work()
        except Refusal as exc:
            if job.done is not None and not job.done.done():
                job.done.set_result({"ok": False, "error": exc.code, "message": str(exc)})
            return
        except (JournalError, MdbError, MotorError) as exc:
            log.error("vend cycle step failed", error=str(exc))
            if job.done is not None and not job.done.done():
                job.done.set_result({"ok": False, "error": "fault", "message": str(exc)})
            return
        except Exception as exc:
            if job.done is not None and not job.done.done():
                job.done.set_exception(exc)
            raise
        if job.done is not None and not job.done.done():
            job.done.set_result(result)

    async def _tick(self) -> None:
        if "motor" in self.faults.reasons and self.motor is not None:
            now = self._clock()
            if now >= self._next_motor_check:
                self._next_motor_check = now + MOTOR_RECHECK_S
                if await self.motor.ping():
                    self.set_fault("motor", None)
        await self.cash.tick(self._clock() - self._last_activity)
        for method in list(self.methods.values()):
            await method.tick()

    async def absorb_device_events(self) -> None:
        """Journal the device facts already queued for the actor (coins reported while it was
        busy) now, before a payout reads the tubes: the records then show every coin in a tube
        before one paid from it. Everything else (customer work, a lever, a bill to decide on)
        keeps its place and order."""
        others: list[_Job] = []
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            if job.fact:
                await job.work()
            else:
                others.append(job)
        for job in others:
            self._jobs.put_nowait(job)

    # --- state for the screen and telemetry --------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        state = {
            "credit": self.credit,
            "currency": self.config.machine.currency,
            "decimal_places": self.config.machine.decimal_places,
            "phase": self.phase.value,
            "in_service": self.accepting_money(),
            "faults": dict(self.faults.reasons),
            "exact_change_only": self.exact_change_only(),
            "max_credit": self.config.vend.max_credit,
            "devices": dict(self.device_states),
            "accepting": self.cash.accepting(),
            "slots": [s.as_dict() for s in self.slots.values()],
        }
        for name, method in self.methods.items():
            state[name] = dict(method.snapshot())
        return state

    def publish(self, event: str, **fields: Any) -> None:
        self.hub.publish({"event": event, **fields})

    def touch(self) -> None:
        """Customer activity now (restarts the credit timeout)."""
        self._last_activity = self._clock()

    # --- service state -----------------------------------------------------------------------

    def accepting_money(self) -> bool:
        return self.started and not self.faults.reasons

    def idle(self) -> bool:
        """Nobody is using the machine: no credit, no bill being decided, no payout to settle,
        no vend, no session of another method (a QR order shown)."""
        return (
            self.phase is Phase.IDLE
            and self.credit == 0
            and not self.cash.busy
            and not self.sessions
        )

    def update_acceptance(self) -> None:
        """Enable the acceptors exactly when the machine may take money now."""
        self.cash.set_accepting(
            self.accepting_money() and self.phase is Phase.IDLE and not self.sessions
        )

    def set_session(self, method: str, what: str | None) -> None:
        """A session of ``method`` begins (``what``) or ends (None)."""
        if what is None:
            self.sessions.pop(method, None)
        else:
            self.sessions[method] = what
        self.update_acceptance()

    def set_fault(self, key: str, reason: str | None) -> None:
        """A reason to stop taking money appears (text) or goes away (None)."""
        if self.faults.set(key, reason):
            log.warning(
                "machine fault" if reason else "machine fault cleared", key=key, reason=reason or ""
            )
            self.publish(
                "service", in_service=self.accepting_money(), faults=dict(self.faults.reasons)
            )
        self.update_acceptance()

    def set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self.publish("phase", phase=phase.value)
        self.update_acceptance()

    # --- the vend cycle ----------------------------------------------------------------------

    def check_selection(self, slot_id: str) -> Slot:
        """Whether ``slot_id`` can be vended now, whatever pays for it."""
        slot = self.slots.get(slot_id)
        if slot is None:
            raise Refusal("unknown_slot", f"no slot {slot_id!r}")
        if not self.started or not SELLING_FAULTS.isdisjoint(self.faults.reasons):
            raise Refusal("out_of_service", "the machine is out of service")
        if self.phase is not Phase.IDLE or self.cash.escrow_intent is not None:
            raise Refusal("busy", "a vend or payout is in progress")
        if self.cash.unsettled is not None:
            raise Refusal("busy", "the last payout is being checked; please wait")
        if self.cash.fill_mode:
            raise Refusal("busy", "a technician is filling the coin tubes")
        if not slot.in_sale:
            raise Refusal("slot_disabled", f"slot {slot_id} is out of sale")
        if slot.stock <= 0:
            raise Refusal("sold_out", f"slot {slot_id} is sold out")
        if self.motor is None or "motor" in self.faults.reasons:
            raise Refusal("out_of_service", "the dispenser is out of service")
        return slot

    async def vend_cycle(self, slot_id: str, method: Authoriser) -> dict[str, Any]:
        """Sell one product of ``slot_id``, paid by ``method``: check, authorise, vend, drop
        check, then settle or refund. Runs inside the actor (a job, or a method's job)."""
        self.touch()
        slot = self.check_selection(slot_id)
        payment = await method.authorise(slot)
        price = payment.price  # a price change from now on waits for this vend
        intent_id = _new_id()
        about: dict[str, Any] = {"intent_id": intent_id, "slot": slot.id, "price": price}
        about.update(method=payment.method, **payment.refs)
        # vend_id is the journal's intent_id: the vend's log lines join its records.
        with bound_ids(vend_id=intent_id):
            await self.journal.append("vend_intent", about, source=payment.source)
            self.set_phase(Phase.VENDING)
            self.publish("vend_started", slot=slot.id, price=price)
            log.info("vend started", slot=slot.id, price=price, method=payment.method)
            try:
                dropped, reason, detail = await self._dispense_product(slot)
                if dropped:
                    return await self._settle(slot, payment, about)
                return await self._refund(slot, payment, about, reason, detail=detail)
            finally:
                # Also when a step failed (journal, bug) or the daemon is stopping: the machine
                # must not stay "busy". An intent left open is resolved by start-up recovery
                # (credit kept or a refund record, never a second vend).
                if self.phase is not Phase.IDLE:
                    self.set_phase(Phase.IDLE)

    async def _settle(self, slot: Slot, payment: Payment, about: dict[str, Any]) -> dict[str, Any]:
        fields = payment.sale_fields()
        await self.journal.append("sale", {**about, **fields}, source=payment.source)
        slot.stock -= 1
        price = about["price"]
        change = fields.get("change", 0)
        self.publish("sale", slot=slot.id, price=price, change=change, stock=slot.stock)
        log.info("sold", slot=slot.id, price=price, change=change, stock=slot.stock)
        answer = await payment.settle()
        return {"ok": True, "slot": slot.id, "price": price, **answer}

    async def _refund(
        self,
        slot: Slot,
        payment: Payment,
        about: dict[str, Any],
        reason: str,
        *,
        detail: str = "",
    ) -> dict[str, Any]:
        log.warning("vend failed", slot=slot.id, reason=reason, detail=detail)
        failed = {**about, "reason": reason, **({"detail": detail} if detail else {})}
        records: list[tuple[str, dict[str, Any]]] = [("vend_failed", failed)]
        refund_reason = f"vend {reason}: {detail}" if detail else reason
        records += payment.refund_records(about["intent_id"], refund_reason)
        await self.journal.append_many(records, source=payment.source)
        answer = await payment.refund(reason)
        self.publish("vend_failed", slot=slot.id, reason=reason, credit=self.credit)
        return {"ok": False, "error": "vend_failed", "message": reason, **answer}

    async def _dispense_product(self, slot: Slot) -> tuple[bool, str, str]:
        """One turn, the drop sensor, one more turn if nothing dropped. (dropped, reason,
        detail): the reason why not, and what failed when that is not certain."""
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
            except TurnOutcomeUnknown as exc:
                # The product may have fallen: journaled as interrupted, as a vend a crash cut
                # short, never as one that certainly failed.
                self.set_fault("motor", f"motor board: {exc.cause}")
                return False, VEND_INTERRUPTED, f"motor board: {exc.cause}"
            except MotorError as exc:
                self.set_fault("motor", f"motor board: {exc}")
                return False, f"motor board: {exc}", ""
            if result.dropped:
                return True, "", ""
            if result.outcome in (MotorOutcome.JAMMED, MotorOutcome.NO_MOTOR):
                await self._take_slot_out(slot, result.outcome.value)
                return False, f"{result.outcome.value}: {result.detail}", ""
            log.info("no drop seen", slot=slot.id, turn=turn, outcome=result.outcome.value)
        return False, "no product dropped after two turns", ""

    async def _take_slot_out(self, slot: Slot, why: str) -> None:
        """Out of sale until a restart or a ``set_slot``: not a planogram change."""
        slot.taken_out = why
        await self.journal.append(
            "slot_changed", {"slot": slot.id, "enabled": False, "reason": why}
        )
        self.publish("slot", **slot.as_dict(), reason=why)

    async def _change_slot(self, change: SlotChange, source: Source) -> dict[str, Any]:
        refused = planogram.check_change(self.slots, change)
        if refused is not None:
            raise Refusal(*refused)
        slot = self.slots[change.slot]
        await self.journal.append_many(planogram.change_records(slot, change), source=source)
        planogram.apply_change(slot, change)
        self.publish("slot", **slot.as_dict(), reason=source["kind"])
        self.update_acceptance()
        return {"ok": True, **slot.as_dict()}

    # --- start-up ----------------------------------------------------------------------------

    async def recover(self, facts: DeviceFacts) -> None:
        """Start-up: resolve what a crash left open (an interrupted vend is never retried; a QR
        order shown before the restart is expired), reconcile the devices' own counters with
        the journal, then take credit and stock from the journal (the single source of truth).
        Runs once, before the acceptors are enabled."""
        resolved = await resolve_open_intents(
            self.journal, facts, currency=self.config.machine.currency
        )
        expired = await expire_open_orders(self.journal)
        corrections = await reconcile_devices(self.journal, facts)
        for record in (*resolved, *expired, *corrections):
            log.warning("start-up recovery", type=record.type, **record.data)
        # Price, in-sale flag and stock: the journal's, or the configuration file's where it
        # was edited since the last start (vmc/planogram.py).
        await planogram.restore(self.journal, self.config, self.slots)
        credit = customer_credit(await self.journal.counters())
        self._restore(credit)

    def _restore(self, credit: int, stock: Mapping[str, int] | None = None) -> None:
        """Take up ``credit`` (and ``stock``, when given: tests that skip recovery)."""
        self.cash.credit = credit
        for slot_id, count in (stock or {}).items():
            if slot_id in self.slots:
                self.slots[slot_id].stock = count
        self.started = True
        self.touch()
        stock = {s.id: s.stock for s in self.slots.values()}
        log.info("vend cycle ready", credit=credit, stock=stock)
        self.publish("credit", credit=credit)
        self.publish("service", in_service=self.accepting_money(), faults=dict(self.faults.reasons))
        self.update_acceptance()

    # --- device events -----------------------------------------------------------------------

    def on_device_event(self, event: DeviceEvent) -> None:
        """Called by the devices (synchronously, on the loop): queue the event for the actor."""
        cash = self.cash
        if isinstance(event, CoinDeposited):
            if event.credited and not event.token and event.value > 0:
                route = "tubes" if event.route is CoinRoute.TUBES else "cashbox"
                ct, value = event.coin_type, event.value
                self.post(lambda: cash.coin_in(ct, value, route), fact=True)
        elif isinstance(event, ReturnLeverPressed):
            self.post(lambda: cash.pay_back("lever"))
        elif isinstance(event, CoinsDispensedManually):
            ev = event
            self.post(lambda: cash.manual_dispense(ev.coin_type, ev.count, ev.value), fact=True)
        elif isinstance(event, BillInEscrow):
            bt, value = event.bill_type, event.value
            self.post(lambda: cash.bill_in_escrow(bt, value))
        elif isinstance(event, BillStacked):
            bt, value = event.bill_type, event.value
            self.post(lambda: cash.bill_stacked(bt, value), fact=True)
        elif isinstance(event, BillReturned):
            bt = event.bill_type
            self.post(lambda: cash.bill_returned(bt), fact=True)
        elif isinstance(event, StateChanged):
            state_event = event
            self.post(lambda: self._device_state(state_event))

    async def _device_state(self, event: StateChanged) -> None:
        state = event.state
        self.device_states[event.device] = state.value
        self.publish("device", device=event.device, state=state.value, detail=event.detail)
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
            record = {"device": event.device, "state": journal_state, "detail": event.detail[:200]}
            if event.info is not None:
                record.update(_identity_fields(event.info))
            await self.journal.append("device", record)
        if event.device == "coin":
            await self.cash.changer_state(state is DeviceState.READY, state.value)
        else:
            self.update_acceptance()


def _identity_fields(info: DeviceInfo) -> dict[str, Any]:
    """A device's identity for its ``device`` record (the audit report's CA1, BA1, DA1, CA17)."""
    fields: dict[str, Any] = {
        "manufacturer": info.manufacturer[:200],
        "serial": info.serial[:200],
        "model": info.model[:200],
        "version": info.version,
        "level": info.level,
    }
    values = info.details.get("coin_values")
    if isinstance(values, dict):
        fields["coin_values"] = {str(t): v for t, v in values.items() if isinstance(v, int)}
    return fields


def _new_id() -> str:
    return uuid.uuid4().hex
