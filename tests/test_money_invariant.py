"""The money invariant under random customers and a misbehaving bus (hypothesis state machine).

The whole money path runs in-process on real parts: the coin changer and bill validator
simulators on a real pty (real MDB bytes in the PARMRK encoding), the bus master's line thread,
the drivers' device classes, the vend cycle and a real SQLite journal. Hypothesis drives
customer actions (coins to tubes or the cashbox, several coins in one POLL reply, bills, money
back), a technician's (filling the tubes by hand in fill mode, paying a tube out) and bus
faults (late replies past the response window, garbled checksums, dropped
replies, NAKs, line noise, a device resetting itself) in random order. After every step, once
the machine is quiet:

* every coin and bill whose report the VMC ACKed (the simulators count those) is on the journal
  exactly once as ``cash_in``, and nothing else is: no money from a reply the VMC did not ACK;
* every coin the changer paid out is on the journal as ``cash_out``, and no more;
* the customer's credit is what customers put in less what was paid back to them (a fill is not
  customer money, nor is a tube paid out by hand), and never below zero.

Lost ACKs are not among the faults: a cashbox coin reported again after the changer missed our
ACK is byte-identical to a second coin, and the standard leaves such a repeat to reconciliation
of the device counters (mdb.md "Wire"); tests/test_coin.py covers the repeats a device fact can
prove.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from drivers.mdb.bill import BillValidator
from drivers.mdb.coin import CoinChanger
from drivers.mdb.device import DeviceEvent, DeviceState
from drivers.mdb.link import open_link
from drivers.mdb.master import BusMaster, Timing
from hil.sim.bill import BillValidatorSim
from hil.sim.bus import SimBus
from hil.sim.coin import CoinChangerSim
from vmc.cash import MdbBills, MdbChanger
from vmc.config import parse_config
from vmc.journal import LOCAL, Journal
from vmc.machine import Phase, VendMachine
from vmc.payments.base import Refusal
from vmc.payments.manual import pay_out_tube

pytestmark = pytest.mark.slow

#: Coin values the simulated changer accepts (minor units); 200 goes to the cashbox.
COIN_VALUES = (5, 10, 20, 50, 100, 200)
BILL_TYPES = (0, 1)  # 5.00 and 10.00
#: Scheduling slack for the master's response window on a loaded CI machine.
SLACK_S = 0.03
#: Longest a step waits for the machine to fall quiet (devices report, vend cycle idle).
QUIET_WAIT_S = 20.0
#: A late reply misses the response window (5 ms + slack) by this much.
LATE_BY_S = 0.06
FAULTS = ("late_replies", "bad_checksum", "drop_replies", "nak_replies", "garbage")

CONFIG: dict[str, Any] = {
    "machine": {"id": "PROP-1", "currency": "EUR", "currency_numeric": 978, "state_dir": "."},
    "mdb": {"link": "stream", "simulate": True},
    "motor": {"simulate": True},
    "vend": {"max_credit": 5000, "credit_timeout_s": 0, "accept_bills": True},
    "slot": [{"id": "A1", "row": 0, "col": 0, "price": 100, "stock": 5, "capacity": 5}],
}


class MoneyPath(RuleBasedStateMachine):
    """One machine per example; the rules act on it and the invariant checks the ledger."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory(prefix="vmc-money-")
        self.coin_sim = CoinChangerSim()
        self.bill_sim = BillValidatorSim()
        self.bus = SimBus.on_pty([self.coin_sim, self.bill_sim])
        self.bus.start()
        self.tasks: list[asyncio.Task[None]] = []

    @initialize()
    def start(self) -> None:
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        state = Path(self.tmp.name)
        self.master = BusMaster(open_link("stream", self.bus.port), timing=Timing(slack_s=SLACK_S))
        self.master.start()
        self.journal = await Journal.open(state)
        config = parse_config(CONFIG, state)
        self.coin = CoinChanger(self.master, poll_interval_s=0.03, on_event=self._on_event)
        self.bill = BillValidator(self.master, poll_interval_s=0.03, on_event=self._on_event)
        self.machine = VendMachine(
            config,
            self.journal,
            changer=MdbChanger(self.coin, dispense_wait_s=5.0),
            bills=MdbBills(self.bill),
            motor=None,
        )
        for runner in (self.coin.run(), self.bill.run(), self.machine.run()):
            self.tasks.append(asyncio.create_task(runner))
        await self._until(
            lambda: self.coin.state is DeviceState.READY and self.bill.state is DeviceState.READY,
            "both devices ready",
        )
        self.machine._restore(0, {"A1": 5})  # a first boot: nothing owed, stock as configured
        await self._until(lambda: self.coin.accepting and self.bill.accepting, "acceptors on")

    def _on_event(self, event: DeviceEvent) -> None:
        self.machine.on_device_event(event)

    async def _until(self, condition: Any, what: str) -> None:
        deadline = self.loop.time() + QUIET_WAIT_S
        while not condition():
            if self.loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)

    def _quiet(self) -> bool:
        sims_quiet = all(
            not sim.poll_items and not sim.faults.late_replies for sim in (self.coin_sim,)
        )
        bill_ledger = self.bill_sim.ledger()
        return (
            sims_quiet
            and not self.bill_sim.poll_items
            and bill_ledger["in_escrow"] is None
            and bill_ledger["bills_waiting"] == 0
            and self.coin_sim.ledger()["coins_waiting"] == 0
            and not self.coin_sim.ledger()["busy"]
            and self.machine._jobs.empty()
            and self.machine.phase is Phase.IDLE
            and self.machine._escrow_intent is None
            and self.coin.state is DeviceState.READY
            and self.bill.state is DeviceState.READY
        )

    def _settle(self) -> None:
        async def settle() -> None:
            await self._until(self._quiet, "the machine to fall quiet")
            await asyncio.sleep(0.1)  # a few more POLLs: nothing else may turn up
            await self._until(self._quiet, "the machine to stay quiet")

        self.loop.run_until_complete(settle())

    # --- customer actions ------------------------------------------------------------------

    @rule(value=st.sampled_from(COIN_VALUES), cashbox=st.booleans())
    def insert_coin(self, value: int, cashbox: bool) -> None:
        request: dict[str, Any] = {"cmd": "insert", "value": value}
        if cashbox:
            request["route"] = "cashbox"
        self.coin_sim.control(request)
        self._settle()

    @rule(values=st.lists(st.sampled_from(COIN_VALUES), min_size=2, max_size=4))
    def insert_coins_between_two_polls(self, values: list[int]) -> None:
        with self.coin_sim.lock:  # queued together: one POLL reply carries them all
            for value in values:
                self.coin_sim.control({"cmd": "insert", "value": value, "route": "cashbox"})
        self._settle()

    @rule(bill_type=st.sampled_from(BILL_TYPES))
    def insert_bill(self, bill_type: int) -> None:
        self.bill_sim.control({"cmd": "insert", "bill_type": bill_type})
        self._settle()

    @rule()
    def money_back(self) -> None:
        self.loop.run_until_complete(self.machine.cancel())
        self._settle()

    # --- the technician (the console's coin_fill and coin_payout ops) -------------------------

    @rule(values=st.lists(st.sampled_from(COIN_VALUES), min_size=1, max_size=3))
    def technician_fills_tubes(self, values: list[int]) -> None:
        """Coins put in while filling are journaled as fills: cash in, never credit."""
        if self.machine.credit > 0:
            return  # the console refuses fill mode while a customer has credit
        cash = self.machine.cash

        async def fill_mode(on: bool) -> None:
            await self.machine.submit(lambda: cash.set_fill_mode(on))

        self.loop.run_until_complete(fill_mode(True))
        for value in values:
            self.coin_sim.control({"cmd": "insert", "value": value})
        self._settle()
        self.loop.run_until_complete(fill_mode(False))
        self._settle()

    @rule(coin_type=st.integers(0, 3), count=st.integers(1, 3))
    def technician_pays_out_a_tube(self, coin_type: int, count: int) -> None:
        """A tube emptied by hand: cash out, never taken from a customer's credit."""
        changer = self.machine.changer
        if self.machine.credit > 0 or changer is None:
            return  # refused by the console while a customer has credit

        async def pay() -> None:
            with contextlib.suppress(Refusal):  # the tube holds fewer: nothing paid
                await self.machine.submit(
                    lambda: pay_out_tube(self.machine, changer, coin_type, count, LOCAL)
                )

        self.loop.run_until_complete(pay())
        self._settle()

    # --- the bus misbehaving ---------------------------------------------------------------

    @rule(
        device=st.sampled_from(("coin", "bill")),
        fault=st.sampled_from(FAULTS),
        count=st.integers(1, 2),
    )
    def fault(self, device: str, fault: str, count: int) -> None:
        sim = self.coin_sim if device == "coin" else self.bill_sim
        with sim.lock:
            if fault == "garbage":
                sim.faults.garbage = bytes((0xFF, 0x05, 0x42))
            else:
                setattr(sim.faults, fault, count)
                sim.faults.late_by_s = LATE_BY_S

    @rule(device=st.sampled_from(("coin", "bill")))
    def device_resets_itself(self, device: str) -> None:
        (self.coin_sim if device == "coin" else self.bill_sim).reset_itself()
        self._settle()

    # --- the invariant ---------------------------------------------------------------------

    @invariant()
    def money_in_equals_money_journaled(self) -> None:
        if not hasattr(self, "machine"):
            return
        records = self.loop.run_until_complete(self.journal.records(limit=100_000))
        coin_in = sum(
            r.data["amount"]
            for r in records
            if r.type == "cash_in" and r.data.get("device") == "coin"
        )
        bill_in = sum(
            r.data["amount"]
            for r in records
            if r.type == "cash_in" and r.data.get("device") == "bill"
        )
        cash_out = sum(r.data["amount"] for r in records if r.type == "cash_out")
        filled = sum(
            r.data["amount"] for r in records if r.type == "cash_in" and r.data.get("fill")
        )
        paid_by_hand = sum(
            r.data["amount"]
            for r in records
            if r.type == "cash_out" and r.data.get("reason") == "manual"
        )
        coin_ledger, bill_ledger = self.coin_sim.ledger(), self.bill_sim.ledger()
        assert coin_in == coin_ledger["acked_deposited"]["value"], (coin_in, coin_ledger)
        assert bill_in == bill_ledger["acked_stacked"]["value"], (bill_in, bill_ledger)
        assert cash_out == coin_ledger["value_out"], (cash_out, coin_ledger)
        customer_in = coin_in - filled + bill_in
        assert self.machine.credit == customer_in - (cash_out - paid_by_hand)
        assert self.machine.credit >= 0

    def teardown(self) -> None:
        async def stop() -> None:
            for task in self.tasks:
                task.cancel()
            for task in self.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if hasattr(self, "master"):
                await self.master.close()
            if hasattr(self, "journal"):
                await self.journal.close()

        try:
            self.loop.run_until_complete(stop())
        finally:
            self.bus.stop()
            self.loop.close()
            self.tmp.cleanup()


MoneyPath.TestCase.settings = settings(
    max_examples=6,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.timeout(900)
class TestMoneyPath(MoneyPath.TestCase):  # type: ignore[misc,valid-type]
    pass
