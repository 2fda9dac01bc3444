"""Cash: credit from coins and bills, change paid after the sale (docs/vend-cycle.md).

:class:`CashPayments` owns the customer's credit and every cash movement; the vend cycle
(vmc/machine.py) hands it the device events and asks it to authorise a selection. Every money
movement is journaled before the machine acts on it (an intent) and after (the outcome):

* a coin reported by the changer: ``cash_in`` (the changer took it before we could record it;
  start-up reconciles tube counts against the journal for exactly this window);
* a bill in escrow: ``escrow_decision`` before ESCROW, then ``cash_in`` (stacked) or
  ``escrow_returned``;
* change or a refund: ``payout_intent`` before the first DISPENSE, a ``cash_out`` per coin type
  paid, the last one ``final``.

Policies:

* a bill is stacked only if, with it, some sellable item can be bought and its change paid, and
  the credit stays within ``vend.max_credit``; otherwise it is returned (also while a QR order
  is pending: the customer chose to pay by phone);
* a selection needs enough credit and exact change for the rest (the tubes are read again
  first when change is due);
* change is planned exactly from the tube contents (``drivers.mdb.change.plan_change``), never
  greedily; if a tube runs short mid-payout the rest is planned again from what is left, and
  what cannot be paid stays as credit on the display, journaled;
* a failed vend keeps the credit for another choice or the return button (cash's "refund");
* credit timeout: after ``vend.credit_timeout_s`` without customer activity the credit is paid
  back as if the return button had been pressed (0 disables it). Credit that cannot be paid
  back exactly stays as credit.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from drivers.errors import MdbError
from drivers.mdb.change import can_pay_all_up_to, coins_within, plan_change
from vmc.cash import BillPort, ChangerPort
from vmc.log import bind_ids
from vmc.payments.base import Payment, Phase, Refusal

if TYPE_CHECKING:
    from vmc.machine import VendMachine
    from vmc.planogram import Slot

log = structlog.get_logger("vmc.machine")

#: Rounds of planning a payout again after a tube paid short.
MAX_PAYOUT_ROUNDS = 4
#: How long one settlement attempt waits for the changer to report a pending payout's end.
SETTLE_WAIT_S = 2.0


@dataclass
class OpenPayout:
    """A payout intent journaled and not yet closed: what it may still record."""

    intent_id: str
    reason: str
    amount: int
    recorded: int = 0


class CashPayment(Payment):
    """A vend paid from the customer's credit."""

    method = "cash"

    def __init__(self, cash: CashPayments, price: int) -> None:
        super().__init__(price)
        self.cash = cash

    def sale_fields(self) -> dict[str, Any]:
        return {"paid": self.price, "change": self.cash.credit - self.price}

    async def settle(self) -> dict[str, Any]:
        cash = self.cash
        change = cash.credit - self.price
        cash.set_credit(change)
        paid = 0
        if change:
            cash.machine.set_phase(Phase.PAYING)
            paid = await cash.payout(change, "change")
        return {"change": paid, "credit": cash.credit}

    async def refund(self, reason: str) -> dict[str, Any]:
        # The price was never taken from the credit: it stays for another choice or the
        # return button.
        return {"credit": self.cash.credit}


class CashPayments:
    """The cash payment method: the customer's credit, coins in, bills through escrow, change
    and refunds out. An :class:`~vmc.payments.base.Authoriser` for the vend cycle."""

    name = "cash"

    def __init__(
        self, machine: VendMachine, changer: ChangerPort | None, bills: BillPort | None
    ) -> None:
        self.machine = machine
        self.journal = machine.journal
        self.config = machine.config
        self.changer = changer
        self.bills = bills
        self.credit = 0
        self.escrow_intent: tuple[str, int, int] | None = None  # (intent_id, bill_type, value)
        self.unsettled: OpenPayout | None = None  # a payout whose outcome is not known yet
        self.open_payout: OpenPayout | None = None  # the payout being paid now
        #: The customer's cash session: from the first coin or bill until the credit is back to
        #: zero with nothing pending. Bound as ``session_id`` on the log lines of the session.
        self.session_id: str | None = None

    # --- state -------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A bill is being decided or a payout's outcome is still unknown."""
        return self.escrow_intent is not None or self.unsettled is not None

    def exact_change_only(self) -> bool:
        """True when the tubes cannot pay every amount of change a sale could need: any amount
        up to ``max_credit`` less the cheapest sellable price."""
        if self.changer is None or not self.changer.ready:
            return True
        sellable = [s.price for s in self.machine.slots.values() if s.sellable]
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
            for s in self.machine.slots.values()
        )

    def accepting(self) -> dict[str, bool]:
        return {
            name: port.accepting
            for name, port in (("coin", self.changer), ("bill", self.bills))
            if port is not None
        }

    def set_accepting(self, may_take: bool) -> None:
        """Enable the acceptors when the machine may take money (``may_take``), no bill is
        being decided and the credit is below ``vend.max_credit``."""
        may_take = (
            may_take and self.escrow_intent is None and self.credit < self.config.vend.max_credit
        )
        if self.changer is not None:
            self.changer.set_accepting(may_take)
        if self.bills is not None:
            self.bills.set_accepting(may_take and self.config.vend.accept_bills)

    def set_credit(self, credit: int) -> None:
        if credit < 0:
            # Never below zero: the customer cannot owe the machine. A ledger that says so has
            # counted money out that did not leave (or missed money in): reconciliation of the
            # device counters settles the difference.
            log.error("credit would go below zero; kept at zero", credit=credit)
            credit = 0
        if credit != self.credit:
            self.credit = credit
            self.machine.publish("credit", credit=credit)

    # --- the session (for the log) -----------------------------------------------------------

    def begin_session(self) -> None:
        """Money comes in: a session begins unless one is on."""
        if self.session_id is None:
            self.session_id = _new_id()
            bind_ids(session_id=self.session_id)
            log.info("cash session started")

    def end_session_if_done(self) -> None:
        """After each step of the actor: the session ends when the credit is back to zero and
        no bill, payout or vend is pending."""
        if (
            self.session_id is not None
            and self.credit == 0
            and not self.busy
            and self.machine.phase is Phase.IDLE
        ):
            log.info("cash session ended")
            self.session_id = None

    # --- authorise ---------------------------------------------------------------------------

    def _check_credit(self, slot: Slot) -> None:
        if self.credit < slot.price:
            raise Refusal("insufficient_credit", f"insert {slot.price - self.credit} more")
        if not self.can_pay(self.credit - slot.price):
            raise Refusal("no_change", "change cannot be paid: use exact money or choose again")

    async def authorise(self, slot: Slot) -> Payment:
        machine = self.machine
        if machine.sessions:
            raise Refusal(
                "order_pending", "a QR order is shown: cancel it first to pay with the credit"
            )
        self._check_credit(slot)
        if self.credit > slot.price and self.changer is not None and self.changer.ready:
            # Decide on the tubes as they are now, not as the last deposit left them.
            await self.changer.refresh_tubes()
            slot = machine.check_selection(slot.id)
            self._check_credit(slot)
        return CashPayment(self, slot.price)

    # --- cash in -----------------------------------------------------------------------------

    async def coin_in(self, coin_type: int, value: int, route: str) -> None:
        """A coin the changer took (it is already in a tube or the cashbox)."""
        self.begin_session()
        await self.journal.append(
            "cash_in",
            {"amount": value, "device": "coin", "route": route, "coin_type": coin_type},
        )
        self.machine.touch()
        self.set_credit(self.credit + value)
        self.machine.publish("cash_in", device="coin", amount=value, route=route)
        self.machine.update_acceptance()

    async def bill_in_escrow(self, bill_type: int, value: int) -> None:
        """Decide, journal the decision, then tell the validator to stack or return."""
        self.begin_session()
        machine = self.machine
        machine.touch()
        with_bill = self.credit + value
        stack = (
            machine.accepting_money()
            and machine.phase is Phase.IDLE
            and not machine.sessions
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
        self.escrow_intent = (intent_id, bill_type, value)
        machine.update_acceptance()
        machine.publish("escrow", amount=value, decision="stack" if stack else "return")
        assert self.bills is not None
        await self.bills.escrow(stack)

    async def bill_stacked(self, bill_type: int, value: int) -> None:
        self.begin_session()
        pending = self.escrow_intent
        data: dict[str, Any] = {
            "amount": value,
            "device": "bill",
            "route": "stacker",
            "bill_type": bill_type,
        }
        if pending is not None and pending[1] == bill_type:
            data["intent_id"] = pending[0]
        await self.journal.append("cash_in", data)
        self.escrow_intent = None
        self.machine.touch()
        self.set_credit(self.credit + value)
        self.machine.publish("cash_in", device="bill", amount=value, route="stacker")
        self.machine.update_acceptance()

    async def bill_returned(self, bill_type: int) -> None:
        pending = self.escrow_intent
        if pending is not None and pending[1] == bill_type:
            await self.journal.append("escrow_returned", {"intent_id": pending[0]})
            self.escrow_intent = None
            self.machine.publish("bill_returned", amount=pending[2])
        self.machine.update_acceptance()

    async def manual_dispense(self, coin_type: int, count: int, value: int) -> None:
        """A technician pressed the changer's own dispense button: not customer money."""
        await self.journal.append(
            "cash_out",
            {"amount": value, "reason": "manual", "coins": {str(coin_type): count}},
        )

    # --- cash out ----------------------------------------------------------------------------

    async def pay_back(self, reason: str) -> dict[str, Any]:
        """The return button, the lever, the credit timeout: pay the whole credit back."""
        machine = self.machine
        machine.touch()
        if machine.phase is not Phase.IDLE or self.unsettled is not None:
            raise Refusal("busy", "a vend or payout is in progress")
        machine.set_phase(Phase.PAYING)
        try:
            if self.changer is not None and self.changer.ready:
                # Coins the changer took before acceptance went off are reported now; credit
                # them first, so the customer gets back everything they put in.
                await self.changer.stop_accepting()
                await machine.absorb_device_events()
            if self.credit == 0:
                return {"ok": True, "paid": 0, "credit": 0}
            paid = await self.payout(self.credit, reason)
        finally:
            machine.set_phase(Phase.IDLE)
        return {"ok": paid > 0 or self.credit == 0, "paid": paid, "credit": self.credit}

    async def tick(self, idle_s: float) -> None:
        """From the actor's tick: settle a payout whose outcome was unknown; the credit
        timeout (``idle_s``: seconds since the last customer activity)."""
        if self.unsettled is not None:
            await self.settle_payout()
        timeout = self.config.vend.credit_timeout_s
        if (
            timeout
            and self.credit > 0
            and self.machine.phase is Phase.IDLE
            and self.escrow_intent is None
            and idle_s > timeout
        ):
            log.info("credit timeout: paying the credit back", credit=self.credit)
            await self.pay_back("refund")
            self.machine.touch()

    async def payout(self, amount: int, reason: str) -> int:
        """Pay ``amount`` of the customer's credit in coins; return what was paid.

        What cannot be paid stays as credit. If the changer cannot say what a DISPENSE paid
        (it went away, or never reported the end), the payout stays open as ``unsettled``:
        money is neither taken nor sold against until the changer's own report or tube counts
        settle it (``settle_payout``)."""
        machine = self.machine
        changer = self.changer
        if changer is None or not changer.ready:
            machine.publish("payout_short", wanted=amount, paid=0, credit=self.credit)
            return 0
        # Acceptance off on the wire first, then the tube counts: a coin that entered a tube
        # during the payout would hide a coin that left it from a recovery that has only the
        # counts to go by. With the counts in the intent, recovery measures the payout alone;
        # coins that went in before (and whose report a crash lost) show up as a surplus.
        await changer.stop_accepting()
        # Coins the changer reported before it fell quiet are journaled before the intent, so
        # no record pays a coin out of a tube before the record that put it there (a coin slipped
        # in during a vend, paid as change: found by the crash campaign's per-record check).
        await machine.absorb_device_events()
        tubes = {str(t): n for t, n in (await changer.tube_counts_now()).items()}
        intent_id = _new_id()
        await self.journal.append(
            "payout_intent",
            {"intent_id": intent_id, "amount": amount, "reason": reason, "tubes": tubes},
        )
        machine.publish("payout_started", amount=amount, reason=reason)
        self.open_payout = OpenPayout(intent_id, reason, amount)
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
            self.unsettled, self.open_payout = self.open_payout, None
            machine.set_fault("coin", f"payout outcome unknown: {exc}")
            self.set_credit(self.credit - paid_total)
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
        self.open_payout = None
        self.set_credit(self.credit - paid_total)
        machine.publish(
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
        payout = self.open_payout or self.unsettled
        assert payout is not None, "coins recorded outside a payout"
        paid = {t: n for t, n in coins.items() if n > 0}
        value = sum(n * self.changer.coin_value(t) for t, n in paid.items())
        room = payout.amount - payout.recorded
        if value > room:
            kept = coins_within(paid, room, self.changer.coin_value)
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

    async def settle_payout(self) -> None:
        """Close a payout whose outcome was unknown, from the changer's report or tube counts."""
        if self.unsettled is None or self.changer is None or not self.changer.ready:
            return
        coins = await self.changer.settle_pending(SETTLE_WAIT_S)
        if coins is None:
            return  # still not known: try again at the next tick
        intent_id = self.unsettled.intent_id
        value = await self._record_paid(coins, final=True)
        self.unsettled = None
        self.set_credit(self.credit - value)
        log.warning("payout settled", intent_id=intent_id, paid=value, credit=self.credit)
        self.machine.publish(
            "payout_done",
            wanted=value,
            paid=value,
            credit=self.credit,
            coins={str(k): v for k, v in coins.items()},
        )
        self.machine.set_fault("coin", None)

    async def changer_state(self, ready: bool, state: str) -> None:
        """The coin changer's state changed. Without it no change can be paid: take no money
        at all. A payout whose outcome is unknown keeps the fault until it is settled."""
        if ready and self.unsettled is not None:
            await self.settle_payout()
        elif ready:
            self.machine.set_fault("coin", None)
        else:
            self.machine.set_fault("coin", f"coin changer {state}")


def _new_id() -> str:
    return uuid.uuid4().hex
