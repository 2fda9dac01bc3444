"""The planogram: changes while running go through the vend-cycle actor, are journaled and
survive restarts; the configuration file's edits are applied at start with source ``config``;
a vend in progress keeps its price. Real journal (SQLite in tmp_path), real VendMachine; the
motor is a stand-in whose turn the test can hold."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from drivers.motor.base import MotorBoard, MotorOutcome, TurnResult
from vmc.config import Config, parse_config
from vmc.journal import DeviceFacts, Journal, Record, remote_source
from vmc.journal.records import CONFIG
from vmc.machine import VendMachine
from vmc.planogram import FILE_BASELINE, SlotChange

MACHINE_ID = "M1"

SLOTS: list[dict[str, Any]] = [
    {"id": "A1", "row": 0, "col": 0, "price": 150, "stock": 5, "capacity": 10},
    {"id": "B2", "row": 1, "col": 1, "price": 200, "stock": 3, "capacity": 6},
]


def make_config(
    state_dir: Path, *, slots: list[dict[str, Any]] | None = None, public_key: str = ""
) -> Config:
    return parse_config(
        {
            "machine": {
                "id": MACHINE_ID,
                "currency": "EUR",
                "currency_numeric": 978,
                "state_dir": str(state_dir),
            },
            "mdb": {"simulate": True},
            "motor": {"simulate": True},
            "vend": {"credit_timeout_s": 0},
            "cloud": {"command_public_key": public_key},
            "slot": slots if slots is not None else SLOTS,
        },
        state_dir,
    )


class HeldMotor(MotorBoard):
    """Every turn drops a product; with ``hold`` set, a turn waits until it is released."""

    def __init__(self) -> None:
        self.hold = False
        self.turning = asyncio.Event()
        self.release = asyncio.Event()
        self.turns: list[tuple[int, int]] = []

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> bool:
        return True

    async def run_slot(
        self, row: int, col: int, *, turn_timeout_s: float, drop_timeout_s: float
    ) -> TurnResult:
        self.turns.append((row, col))
        self.turning.set()
        if self.hold:
            await self.release.wait()
        return TurnResult(MotorOutcome.TURNED, True, "dropped")

    async def drop_sensor_blocked(self) -> bool:
        return False

    async def stop_all(self) -> None:
        pass


class Rig:
    """A journal and a running vend cycle in one state directory; ``restart`` stops both and
    starts them again on the same files (with another configuration, if given)."""

    def __init__(self, state_dir: Path, config: Config) -> None:
        self.state_dir = state_dir
        self.config = config
        self.motor = HeldMotor()
        self.journal: Journal
        self.machine: VendMachine
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Rig:
        self.journal = await Journal.open(self.state_dir)
        self.machine = VendMachine(
            self.config, self.journal, changer=None, bills=None, motor=self.motor
        )
        self._task = asyncio.create_task(self.machine.run())
        await self.machine.submit(lambda: self.machine.recover(DeviceFacts()))
        assert self.machine.started
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.journal.close()

    async def restart(self, config: Config | None = None) -> None:
        await self.stop()
        if config is not None:
            self.config = config
        await self.start()

    async def records(self, *types: str) -> list[Record]:
        found = await self.journal.records(limit=100_000)
        return [r for r in found if not types or r.type in types]

    def slot(self, slot_id: str) -> dict[str, Any]:
        state = self.machine.snapshot()
        return next(s for s in state["slots"] if s["slot"] == slot_id)

    async def insert(self, *values: int) -> None:
        for value in values:
            await self.machine.submit(lambda v=value: self.machine.coin_in(3, v, "cashbox"))


@pytest.fixture
async def rig(tmp_path: Path) -> Any:
    rig = await Rig(tmp_path, make_config(tmp_path)).start()
    try:
        yield rig
    finally:
        await rig.stop()


# --- first start ------------------------------------------------------------------------------


async def test_first_start_journals_the_file_planogram_with_source_config(rig: Rig) -> None:
    prices = await rig.records("price_changed")
    assert [(r.data["slot"], r.data["old"], r.data["new"]) for r in prices] == [
        ("A1", 0, 150),
        ("B2", 0, 200),
    ]
    stock = await rig.records("inventory_changed")
    assert [(r.data["slot"], r.data["new"]) for r in stock] == [("A1", 5), ("B2", 3)]
    assert all(r.source == dict(CONFIG) for r in prices + stock)
    baseline = json.loads((rig.state_dir / FILE_BASELINE).read_text())
    assert baseline["journal"] == rig.journal.journal_id
    assert baseline["slots"]["A1"] == {"price": 150, "enabled": True, "capacity": 10}
    # A second start with the same file writes nothing.
    before = rig.journal.last_seq
    await rig.restart()
    assert [r.type for r in await rig.journal.records(since_seq=before + 1)] == ["boot"]


# --- changes while running --------------------------------------------------------------------


async def test_changes_apply_at_once_are_journaled_and_survive_restarts(rig: Rig) -> None:
    source = remote_source("cmd-1")
    answer = await rig.machine.change_slot(SlotChange("A1", price=180), source)
    assert answer["ok"] and answer["price"] == 180
    assert rig.slot("A1")["price"] == 180  # STATE shows it at once
    await rig.machine.change_slot(SlotChange("A1", stock=9), source)
    await rig.machine.change_slot(SlotChange("B2", enabled=False), source)
    assert rig.slot("A1")["stock"] == 9
    assert not rig.slot("B2")["enabled"] and not rig.slot("B2")["sellable"]
    price = (await rig.records("price_changed"))[-1]
    assert price.data == {"slot": "A1", "old": 150, "new": 180}
    assert price.source == {"kind": "remote", "cmd_id": "cmd-1"}
    assert (await rig.records("inventory_changed"))[-1].data == {"slot": "A1", "old": 5, "new": 9}
    assert (await rig.records("slot_changed"))[-1].data == {
        "slot": "B2",
        "enabled": False,
        "old": True,
    }
    await rig.restart()
    assert rig.slot("A1")["price"] == 180
    assert rig.slot("A1")["stock"] == 9
    assert not rig.slot("B2")["enabled"]
    await rig.machine.change_slot(SlotChange("B2", enabled=True), source)
    await rig.restart()
    assert rig.slot("B2")["enabled"]
    assert await rig.journal.verify_counters() == []


async def test_a_change_is_refused_for_an_unknown_slot_or_a_count_over_capacity(rig: Rig) -> None:
    source = remote_source("cmd-2")
    assert (await rig.machine.change_slot(SlotChange("Z9", price=100), source))["error"] == (
        "unknown_slot"
    )
    answer = await rig.machine.change_slot(SlotChange("A1", stock=11), source)
    assert answer == {"ok": False, "error": "invalid", "message": answer["message"]}
    assert rig.slot("A1")["stock"] == 5


async def test_a_lane_the_machine_took_out_comes_back_at_restart_or_by_set_slot(rig: Rig) -> None:
    slot = rig.machine.slots["A1"]
    await rig.machine.submit(lambda: rig.machine._take_slot_out(slot, "jammed"))
    assert not rig.slot("A1")["enabled"]
    taken = (await rig.records("slot_changed"))[-1]
    assert taken.data == {"slot": "A1", "enabled": False, "reason": "jammed"}
    await rig.restart()
    assert rig.slot("A1")["enabled"]  # the planogram never said otherwise
    slot = rig.machine.slots["A1"]
    await rig.machine.submit(lambda: rig.machine._take_slot_out(slot, "jammed"))
    await rig.machine.change_slot(SlotChange("A1", enabled=True), remote_source("cmd-3"))
    assert rig.slot("A1")["enabled"]


# --- precedence between the file and changes made while running -------------------------------


async def test_a_remote_price_is_not_undone_by_a_restart_with_the_same_file(rig: Rig) -> None:
    await rig.machine.change_slot(SlotChange("A1", price=180), remote_source("cmd-4"))
    await rig.machine.change_slot(SlotChange("A1", enabled=False), remote_source("cmd-4"))
    await rig.restart(make_config(rig.state_dir))
    assert rig.slot("A1")["price"] == 180
    assert not rig.slot("A1")["enabled"]


async def test_an_edited_file_wins_and_is_journaled_with_source_config(rig: Rig) -> None:
    await rig.machine.change_slot(SlotChange("A1", price=180), remote_source("cmd-5"))
    await rig.machine.change_slot(SlotChange("B2", price=210), remote_source("cmd-5"))
    edited = [dict(SLOTS[0], price=120, enabled=False, capacity=8), dict(SLOTS[1])]
    before = rig.journal.last_seq
    await rig.restart(make_config(rig.state_dir, slots=edited))
    assert rig.slot("A1")["price"] == 120  # the file's edit wins over the remote price
    assert not rig.slot("A1")["enabled"]
    assert rig.slot("A1")["capacity"] == 8
    assert rig.slot("B2")["price"] == 210  # B2 was not edited in the file: the remote price stays
    new = [r for r in await rig.journal.records(since_seq=before + 1) if r.type != "boot"]
    assert [(r.type, r.data, r.source) for r in new] == [
        ("price_changed", {"slot": "A1", "old": 180, "new": 120}, {"kind": "config"}),
        (
            "slot_changed",
            {"slot": "A1", "enabled": False, "old": True, "capacity": 8},
            {"kind": "config"},
        ),
    ]
    # A later remote change wins again, until the file is edited again.
    await rig.machine.change_slot(SlotChange("A1", price=130), remote_source("cmd-6"))
    await rig.restart(make_config(rig.state_dir, slots=edited))
    assert rig.slot("A1")["price"] == 130


async def test_a_file_edited_to_the_remote_value_writes_no_record(rig: Rig) -> None:
    await rig.machine.change_slot(SlotChange("A1", price=180), remote_source("cmd-7"))
    before = rig.journal.last_seq
    await rig.restart(make_config(rig.state_dir, slots=[dict(SLOTS[0], price=180), SLOTS[1]]))
    assert rig.slot("A1")["price"] == 180
    assert [r.type for r in await rig.journal.records(since_seq=before + 1)] == ["boot"]


async def test_without_its_record_of_the_last_start_the_file_wins(rig: Rig) -> None:
    await rig.machine.change_slot(SlotChange("A1", price=180), remote_source("cmd-8"))
    (rig.state_dir / FILE_BASELINE).unlink()
    await rig.restart()
    assert rig.slot("A1")["price"] == 150
    assert (await rig.records("price_changed"))[-1].source == {"kind": "config"}


async def test_a_new_slot_in_the_file_starts_from_the_file(rig: Rig) -> None:
    more = [*SLOTS, {"id": "C3", "row": 2, "col": 2, "price": 90, "stock": 2, "enabled": False}]
    await rig.restart(make_config(rig.state_dir, slots=more))
    assert rig.slot("C3") == {
        "slot": "C3",
        "name": "",
        "price": 90,
        "stock": 2,
        "capacity": 10,
        "enabled": False,
        "sellable": False,
    }
    await rig.restart(make_config(rig.state_dir, slots=more))
    assert not rig.slot("C3")["enabled"]


# --- the price of a sale ----------------------------------------------------------------------


async def test_a_price_change_during_a_vend_leaves_that_vend_at_its_price(rig: Rig) -> None:
    await rig.insert(100, 50)
    rig.motor.hold = True
    vend = asyncio.create_task(rig.machine.select("A1"))
    await asyncio.wait_for(rig.motor.turning.wait(), 5)
    change = asyncio.create_task(
        rig.machine.change_slot(SlotChange("A1", price=300), remote_source("cmd-9"))
    )
    await asyncio.sleep(0.05)
    assert not change.done()  # the actor finishes the vend first
    rig.motor.release.set()
    result = await asyncio.wait_for(vend, 5)
    assert result["ok"] and result["price"] == 150
    assert (await asyncio.wait_for(change, 5))["price"] == 300
    sale = (await rig.records("sale"))[-1]
    assert sale.data["price"] == 150
    changed = (await rig.records("price_changed"))[-1]
    assert changed.seq > sale.seq
    assert rig.machine.credit == 0


async def test_a_price_change_during_a_session_applies_to_the_next_selection(rig: Rig) -> None:
    await rig.insert(100, 50)
    await rig.machine.change_slot(SlotChange("A1", price=200), remote_source("cmd-10"))
    refused = await rig.machine.select("A1")
    assert refused["error"] == "insufficient_credit"
    assert rig.machine.credit == 150  # the customer's money stays
    await rig.insert(50)
    sold = await rig.machine.select("A1")
    assert sold["ok"] and sold["price"] == 200
    assert rig.machine.credit == 0
