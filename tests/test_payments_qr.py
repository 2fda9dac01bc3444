"""QR e-wallet payments (vmc/payments/qr.py) through the one vend cycle.

Real parts: a real journal in tmp_path, a real VendMachine, the real VMC96 motor driver against
the VMC96 simulator on a pty (hil/sim/vmc96.py), and, for the cash rules, the real coin changer
driver against the coin changer simulator on a pty (as tests/test_money_invariant.py builds
them). Commands are signed with a real Ed25519 key and go through the real CommandProcessor, so
the result is the one the backend would receive. Time (order expiry, command validity) is the
test's clock; the link state is a flag the test sets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from drivers.mdb.coin import CoinChanger
from drivers.mdb.device import DeviceEvent, DeviceState
from drivers.mdb.link import open_link
from drivers.mdb.master import BusMaster, Timing
from drivers.motor.vmc96 import Vmc96Board
from hil.backend.commands import CommandSigner
from hil.sim.bus import SimBus
from hil.sim.coin import CoinChangerSim
from hil.sim.vmc96 import Vmc96Simulator
from vmc.cash import MdbChanger
from vmc.cloud.commands import CommandProcessor
from vmc.config import Config, parse_config
from vmc.journal import DeviceFacts, Journal, Record
from vmc.journal.records import OPEN_ORDERS_LEVEL
from vmc.machine import VendMachine
from vmc.payments.qr import QrPayments

MACHINE_ID = "QR-1"
START = datetime(2026, 11, 22, 22, 40, tzinfo=UTC)
SIGNER = CommandSigner.generate()
TTL_S = 90
TEMPLATE = (
    "https://pay.example.com/{machine}/{order_id}?amount={amount}&currency={currency}&slot={slot}"
)
SLOTS: list[dict[str, Any]] = [
    {"id": "A1", "row": 0, "col": 0, "price": 150, "stock": 5, "capacity": 10},
    {"id": "A2", "row": 0, "col": 1, "price": 120, "stock": 5, "capacity": 10},
]
WAIT_S = 20.0


def make_config(state_dir: Path) -> Config:
    return parse_config(
        {
            "machine": {
                "id": MACHINE_ID,
                "currency": "EUR",
                "currency_numeric": 978,
                "state_dir": str(state_dir),
            },
            "mdb": {"link": "stream", "simulate": True},
            "motor": {"simulate": True, "drop_timeout_s": 0.4, "turn_timeout_s": 2.0},
            "vend": {"credit_timeout_s": 0, "max_credit": 5000},
            "cloud": {
                "command_public_key": SIGNER.public_key_b64,
                "qr_url_template": TEMPLATE,
                "order_ttl_s": TTL_S,
            },
            "slot": SLOTS,
        },
        state_dir,
    )


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        # The condition lives in a simulator's thread: there is no event to await.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert condition(), what


class Rig:
    """A running machine with its QR method and command processor on one state directory."""

    def __init__(self, state_dir: Path, *, cash: bool, turn_time_s: float = 0.05) -> None:
        self.state_dir = state_dir
        self.config = make_config(state_dir)
        self.clock = Clock()
        self.link = True
        self.published: list[dict[str, Any]] = []
        self.cash = cash
        self.motor_sim = Vmc96Simulator(turn_time_s=turn_time_s, stock={(0, 0): 5, (0, 1): 5})
        self.coin_sim = CoinChangerSim()
        self.bus: SimBus | None = None
        self.master: BusMaster | None = None
        self.coin: CoinChanger | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.journal: Journal
        self.machine: VendMachine
        self.qr: QrPayments
        self.commands: CommandProcessor
        self.board: Vmc96Board

    async def start(self) -> Rig:
        self.motor_sim.start()
        self.board = Vmc96Board(self.motor_sim.port, reply_timeout_s=0.2)
        await self.board.open()
        changer = None
        if self.cash:
            self.bus = SimBus.on_pty([self.coin_sim])
            self.bus.start()
            self.master = BusMaster(open_link("stream", self.bus.port), timing=Timing(slack_s=0.03))
            self.master.start()
            self.coin = CoinChanger(self.master, poll_interval_s=0.03, on_event=self._on_event)
            changer = MdbChanger(self.coin, dispense_wait_s=5.0)
        await self.open_machine(changer)
        if self.coin is not None:
            coin = self.coin
            self.tasks.append(asyncio.create_task(coin.run()))
            await until(lambda: coin.state is DeviceState.READY, "changer ready")
            await until(lambda: coin.accepting, "coins accepted")
        return self

    async def open_machine(self, changer: MdbChanger | None) -> None:
        self.journal = await Journal.open(self.state_dir)
        self.machine = VendMachine(
            self.config, self.journal, changer=changer, bills=None, motor=self.board
        )
        self.machine_task = asyncio.create_task(self.machine.run())
        await self.machine.submit(lambda: self.machine.recover(DeviceFacts()))
        self.qr = QrPayments(
            self.machine, link_up=lambda: self.link, publish_order=self._publish, clock=self.clock
        )
        self.commands = await CommandProcessor.open(
            self.config, self.journal, self.machine, qr=self.qr, clock=self.clock
        )

    async def close_machine(self) -> None:
        self.machine_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.machine_task
        await self.qr.close()
        await self.commands.close()
        await self.journal.close()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.close_machine()
        await self.board.close()
        if self.master is not None:
            await self.master.close()
        if self.bus is not None:
            self.bus.stop()
        self.motor_sim.stop()

    def _on_event(self, event: DeviceEvent) -> None:
        self.machine.on_device_event(event)

    async def _publish(self, payload: Any) -> bool:
        self.published.append(dict(payload))
        return self.link

    # --- acting ----------------------------------------------------------------------------

    async def command(self, type: str, **fields: Any) -> dict[str, Any]:
        """Sign and hand over one command; its result."""
        payload = SIGNER.payload(MACHINE_ID, type, fields, now=self.clock.now)
        await self.commands.handle(payload)
        result = self.commands.unpublished_results()[-1]
        await self.commands.mark_published(result["cmd_id"])
        return result

    async def vend(self, order: dict[str, Any], origin: str = "machine") -> dict[str, Any]:
        return await self.command(
            "vend",
            order_id=order["order_id"],
            slot=order["slot"],
            price=order["price"],
            currency=order["currency"],
            origin=origin,
        )

    async def records(self, *types: str) -> list[Record]:
        found = await self.journal.records(limit=100_000)
        return [r for r in found if not types or r.type in types]

    def stock(self, slot: str) -> int:
        return self.machine.slots[slot].stock

    def dropped(self) -> dict[tuple[int, int], int]:
        """(row, col) → products that fell."""
        return dict(self.motor_sim.ledger().dropped)

    def turns(self) -> int:
        return sum(self.motor_sim.ledger().turns.values())


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = await Rig(tmp_path, cash=False).start()
    try:
        yield rig
    finally:
        await rig.stop()


@pytest.fixture
async def cash_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = await Rig(tmp_path, cash=True).start()
    try:
        yield rig
    finally:
        await rig.stop()


async def test_a_complete_qr_sale(rig: Rig) -> None:
    answer = await rig.qr.create_order("A1")

    assert answer["ok"] is True
    order = answer["order"]
    assert set(order) == {"order_id", "slot", "price", "currency", "qr", "expires_at", "ts"}
    assert (order["slot"], order["price"], order["currency"]) == ("A1", 150, "EUR")
    assert order["qr"] == (
        f"https://pay.example.com/{MACHINE_ID}/{order['order_id']}?amount=150&currency=EUR&slot=A1"
    )
    assert order["ts"] == "2026-11-22T22:40:00.000Z"
    assert order["expires_at"] == "2026-11-22T22:41:30.000Z"
    assert base64.b64decode(answer["png"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert len(answer["text"].splitlines()) > 10
    await until(lambda: rig.published == [order], "the order published on orders")
    assert rig.machine.snapshot()["qr"] == {"available": True, "order": order}
    created = await rig.records("order")
    assert [(r.data["state"], r.data["order_id"], r.data["qr"]) for r in created] == [
        ("created", order["order_id"], order["qr"])
    ]
    assert created[0].source == {"kind": "local"}

    result = await rig.vend(order)

    assert result["ok"] is True and result["error"] is None
    (sale,) = await rig.records("sale")
    assert sale.data["method"] == "qr" and sale.data["order_id"] == order["order_id"]
    assert (sale.data["slot"], sale.data["price"], sale.data["paid"]) == ("A1", 150, 150)
    assert sale.source == {"kind": "remote", "cmd_id": result["cmd_id"]}
    assert rig.stock("A1") == 4
    assert rig.dropped() == {(0, 0): 1}
    assert rig.machine.snapshot()["qr"]["order"] is None
    assert (await rig.journal.levels()).get(OPEN_ORDERS_LEVEL, 0) == 0
    assert await rig.records("refund") == []
    # The same order cannot be vended twice.
    assert (await rig.vend(order))["error"] == "order_expired"
    assert rig.dropped() == {(0, 0): 1}


async def test_a_qr_vend_failure_journals_a_refund(rig: Rig) -> None:
    rig.motor_sim.set_fault(0, 1, missed_drops=2)
    order = (await rig.qr.create_order("A2"))["order"]

    result = await rig.vend(order)

    assert result["ok"] is False and result["error"] == "vend_failed"
    (failed,) = await rig.records("vend_failed")
    assert failed.data["method"] == "qr" and failed.data["order_id"] == order["order_id"]
    (refund,) = await rig.records("refund")
    assert refund.data == {
        "intent_id": failed.data["intent_id"],
        "order_id": order["order_id"],
        "amount": 120,
        "currency": "EUR",
        "method": "qr",
        "reason": "no product dropped after two turns",
    }
    assert refund.seq == failed.seq + 1  # one transaction
    assert rig.stock("A2") == 5
    assert rig.dropped() == {}
    assert rig.machine.snapshot()["qr"]["order"] is None
    assert (await rig.journal.levels()).get(OPEN_ORDERS_LEVEL, 0) == 0


async def test_a_vend_for_an_expired_order_is_refused_and_nothing_vended(rig: Rig) -> None:
    order = (await rig.qr.create_order("A1"))["order"]
    rig.clock.advance(TTL_S + 1)

    result = await rig.vend(order)

    assert result["error"] == "order_expired"
    assert rig.turns() == 0 and rig.stock("A1") == 5
    states = [(r.data["state"], r.data.get("reason")) for r in await rig.records("order")]
    assert states == [("created", None), ("expired", "timeout")]
    assert await rig.records("vend_intent", "sale", "vend_failed", "refund") == []


async def test_an_order_expires_on_the_tick_and_the_acceptors_come_back(cash_rig: Rig) -> None:
    rig = cash_rig
    order = (await rig.qr.create_order("A1"))["order"]
    coin = rig.coin
    assert coin is not None
    await until(lambda: not coin.accepting, "acceptors off while the QR is shown")
    rig.clock.advance(TTL_S)
    await rig.machine.submit(rig.qr.tick)
    assert rig.machine.snapshot()["qr"]["order"] is None
    await until(lambda: coin.accepting, "acceptors on again")
    (expired,) = [r for r in await rig.records("order") if r.data["state"] == "expired"]
    assert expired.data["order_id"] == order["order_id"]
    assert (await rig.journal.levels()).get(OPEN_ORDERS_LEVEL, 0) == 0


async def test_an_order_expires_while_the_actor_is_kept_busy(cash_rig: Rig) -> None:
    """The tick keeps its pace however busy the actor's queue is: a client sending ops more
    often than TICK_S (a screen, a console) does not hold back an order's expiry."""
    from vmc.machine import TICK_S

    rig = cash_rig
    await rig.qr.create_order("A1")
    rig.clock.advance(TTL_S)

    async def nothing() -> None:
        return None

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 4 * TICK_S
    while rig.machine.snapshot()["qr"]["order"] is not None:
        assert loop.time() < deadline, "the order did not expire while jobs kept coming"
        await rig.machine.submit(nothing)  # a job every TICK_S / 5
        await asyncio.sleep(TICK_S / 5)
    states = [r.data["state"] for r in await rig.records("order")]
    assert states == ["created", "expired"]


async def test_cancel_on_the_screen_and_by_the_backend(rig: Rig) -> None:
    order = (await rig.qr.create_order("A1"))["order"]
    assert await rig.qr.cancel_pending() == {
        "ok": True,
        "order_id": order["order_id"],
        "state": "cancelled",
    }
    assert (await rig.vend(order))["error"] == "order_expired"
    assert (await rig.qr.cancel_pending())["error"] == "no_order"

    second = (await rig.qr.create_order("A2"))["order"]
    cancel = await rig.command("cancel_order", order_id=second["order_id"])
    assert cancel["ok"] is True
    assert (await rig.vend(second))["error"] == "order_expired"
    assert (await rig.command("cancel_order", order_id="nope"))["error"] == "unknown_order"
    assert (await rig.vend({**second, "order_id": "nope"}))["error"] == "unknown_order"

    records = await rig.records("order")
    assert [(r.data["state"], r.data.get("reason"), r.source["kind"]) for r in records] == [
        ("created", None, "local"),
        ("cancelled", "customer", "local"),
        ("created", None, "local"),
        ("cancelled", "backend", "remote"),
    ]
    assert records[3].source["cmd_id"] == cancel["cmd_id"]
    assert rig.turns() == 0


async def test_a_vend_that_does_not_match_its_order_is_refused_and_the_order_stays(
    rig: Rig,
) -> None:
    order = (await rig.qr.create_order("A1"))["order"]
    assert (await rig.vend({**order, "price": 100}))["error"] == "invalid"
    assert (await rig.vend({**order, "slot": "A2", "price": 120}))["error"] == "invalid"
    assert rig.turns() == 0
    assert (await rig.vend(order))["ok"] is True


async def test_qr_is_refused_while_the_link_is_down(rig: Rig) -> None:
    rig.link = False
    assert rig.machine.snapshot()["qr"] == {"available": False, "order": None}

    answer = await rig.qr.create_order("A1")

    assert answer["ok"] is False and answer["error"] == "qr_unavailable"
    assert "offline" in answer["message"]
    assert await rig.records("order") == []
    assert rig.published == []
    rig.link = True
    assert (await rig.qr.create_order("A1"))["ok"] is True


async def test_a_remote_vend_is_accepted_when_idle(rig: Rig) -> None:
    result = await rig.vend(
        {"order_id": "shop-1", "slot": "A2", "price": 120, "currency": "EUR"}, origin="remote"
    )

    assert result["ok"] is True
    (order,) = await rig.records("order")
    assert order.data == {
        "order_id": "shop-1",
        "slot": "A2",
        "price": 120,
        "state": "created",
        "currency": "EUR",
        "origin": "remote",
    }
    assert order.source == {"kind": "remote", "cmd_id": result["cmd_id"]}
    (sale,) = await rig.records("sale")
    assert (sale.data["order_id"], sale.data["method"]) == ("shop-1", "qr")
    assert rig.stock("A2") == 4 and rig.dropped() == {(0, 1): 1}
    assert (await rig.journal.levels()).get(OPEN_ORDERS_LEVEL, 0) == 0


async def test_a_remote_vend_is_refused_with_credit_a_shown_order_or_a_wrong_price(
    cash_rig: Rig,
) -> None:
    rig = cash_rig
    shop = {"order_id": "shop-2", "slot": "A1", "price": 150, "currency": "EUR"}
    assert (await rig.vend({**shop, "price": 140}, origin="remote"))["error"] == "invalid"

    rig.coin_sim.control({"cmd": "insert", "value": 100})
    await until(lambda: rig.machine.credit == 100, "credit")
    assert (await rig.vend(shop, origin="remote"))["error"] == "invalid"
    assert (await rig.machine.cancel())["paid"] == 100

    await rig.qr.create_order("A2")
    assert (await rig.vend(shop, origin="remote"))["error"] == "invalid"
    await rig.qr.cancel_pending()

    assert rig.turns() == 0
    assert [r.data["state"] for r in await rig.records("order")] == ["created", "cancelled"]
    # Idle again: the same command content (a new cmd_id) is accepted.
    assert (await rig.vend(shop, origin="remote"))["ok"] is True


async def test_cash_inserted_while_an_order_is_pending_is_never_lost(cash_rig: Rig) -> None:
    rig = cash_rig
    coin = rig.coin
    assert coin is not None
    order = (await rig.qr.create_order("A1"))["order"]
    await until(lambda: not coin.accepting, "acceptors off while the QR is shown")

    # A coin inserted now is not taken: the changer returns it.
    assert rig.coin_sim.control({"cmd": "insert", "value": 100})["result"] != "accepted"
    await asyncio.sleep(0.2)
    assert rig.machine.credit == 0
    assert await rig.records("cash_in") == []
    # A coin the changer took just before the disable, reported now: credited as always.
    await rig.machine.submit(lambda: rig.machine.coin_in(4, 100, "tubes"))
    assert rig.machine.credit == 100
    # The order is still shown; a cash selection waits until it is cancelled.
    assert rig.machine.snapshot()["qr"]["order"] == order
    assert (await rig.machine.select("A2"))["error"] == "order_pending"

    # The wallet pays: the product is vended; the credit stays the customer's.
    assert (await rig.vend(order))["ok"] is True
    assert rig.machine.credit == 100
    assert rig.dropped() == {(0, 0): 1}
    await until(lambda: coin.accepting, "acceptors on again")
    before = rig.coin_sim.ledger()["value_out"]
    assert (await rig.machine.cancel())["paid"] == 100
    assert rig.coin_sim.ledger()["value_out"] - before == 100
    cash_in = sum(r.data["amount"] for r in await rig.records("cash_in"))
    cash_out = sum(r.data["amount"] for r in await rig.records("cash_out"))
    assert (cash_in, cash_out, rig.machine.credit) == (100, 100, 0)


async def test_a_qr_pick_with_cash_credit_on_the_machine_is_refused(cash_rig: Rig) -> None:
    rig = cash_rig
    rig.coin_sim.control({"cmd": "insert", "value": 100})
    await until(lambda: rig.machine.credit == 100, "credit")

    answer = await rig.qr.create_order("A1")

    assert answer["ok"] is False and answer["error"] == "cash_credit"
    assert await rig.records("order") == []
    assert rig.machine.credit == 100  # the customer's money stays, shown on the screen
    assert (await rig.machine.cancel())["paid"] == 100
    assert (await rig.qr.create_order("A1"))["ok"] is True


async def test_an_interrupted_qr_vend_is_refunded_at_start_and_not_vended_again(
    tmp_path: Path,
) -> None:
    rig = await Rig(tmp_path, cash=False, turn_time_s=1.5).start()
    try:
        order = (await rig.qr.create_order("A1"))["order"]
        vend = asyncio.create_task(rig.vend(order))
        await until(lambda: rig.machine.phase.value == "vending", "the vend under way")
        # The daemon dies between the vend intent and its outcome.
        await rig.close_machine()
        vend.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await vend
        turns = rig.turns()
        await rig.open_machine(None)

        (failed,) = await rig.records("vend_failed")
        assert (failed.data["reason"], failed.data["order_id"]) == (
            "interrupted",
            order["order_id"],
        )
        (refund,) = await rig.records("refund")
        assert refund.data["order_id"] == order["order_id"]
        assert (refund.data["amount"], refund.data["currency"]) == (150, "EUR")
        assert [r.type for r in await rig.records("recovery")] == ["recovery"]
        # The command cut by the crash is answered "interrupted"; it is never run again.
        results = rig.commands.unpublished_results()
        assert [r["error"] for r in results] == ["interrupted"]
        assert (await rig.vend(order))["ok"] is False
        assert rig.turns() == turns
        assert (await rig.journal.levels()).get(OPEN_ORDERS_LEVEL, 0) == 0
    finally:
        await rig.stop()


async def test_an_order_shown_at_a_restart_is_expired_at_start(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, cash=False).start()
    try:
        order = (await rig.qr.create_order("A1"))["order"]
        await rig.close_machine()
        await rig.open_machine(None)
        states = [(r.data["state"], r.data.get("reason")) for r in await rig.records("order")]
        assert states == [("created", None), ("expired", "restart")]
        assert (await rig.journal.levels()).get(OPEN_ORDERS_LEVEL, 0) == 0
        assert rig.machine.snapshot()["qr"]["order"] is None
        assert (await rig.vend(order))["ok"] is False
        assert rig.turns() == 0
    finally:
        await rig.stop()
