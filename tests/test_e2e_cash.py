"""End to end: the daemon as a subprocess, the simulated coin changer, bill validator and motor
board as real processes on ptys, driven through their own controls and the daemon's control
interface; results checked against the simulators' ledgers and the journal."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hil.harness import Daemon, ExternalSims, journal_records, wait_until, write_config

pytestmark = pytest.mark.slow

# The simulators' default coins: type -> value (hil/sim/coin.py DEFAULT_COINS); bills: type 0 is
# 5.00, type 1 10.00 (hil/sim/bill.py).
COIN_10, COIN_20, COIN_50, COIN_100, COIN_200 = 1, 2, 3, 4, 5
BILL_500 = 0


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    state = tmp_path / "state"
    config = write_config(tmp_path / "vmc.toml", state)
    with Daemon(config, state).running() as d:
        yield d


def coins_paid(ledger: dict[str, Any]) -> int:
    return int(ledger["coin"]["value_out"])


def records_of(state: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in journal_records(state) if r["type"] == kind]


def test_daemon_brings_up_devices_and_stops_within_two_seconds(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "vmc.toml", state, devices=("coin", "bill", "cashless"))
    d = Daemon(config, state)
    d.start()
    d.wait_state(
        lambda s: all(s["devices"].get(n) == "ready" for n in ("coin", "bill", "cashless")),
        "all three devices ready",
    )
    code, elapsed = d.stop(signal.SIGTERM)
    assert code == 0
    assert elapsed < 2.0, f"took {elapsed:.2f} s to stop"
    assert not (state / "control.sock").exists()
    # The simulators it started are gone with it.
    events = [line.get("event") for line in d.log_lines()]
    assert "vmc stopped" in events


def test_cash_sale_with_a_bill_and_a_coin_pays_exact_change(daemon: Daemon) -> None:
    before = daemon.mdb_ledger()
    daemon.insert_bill(BILL_500)
    daemon.wait_state(lambda s: s["credit"] == 500, "the bill stacked")
    daemon.insert_coins(COIN_50)
    daemon.wait_state(lambda s: s["credit"] == 550, "the coin credited")

    result = daemon.control({"op": "select", "slot": "A3"})  # 1.50

    assert result == {"ok": True, "slot": "A3", "price": 150, "change": 400, "credit": 0}
    after = daemon.mdb_ledger()
    assert coins_paid(after) - coins_paid(before) == 400
    assert after["bill"]["stacked"]["0"] == 1
    motor = daemon.motor_sim("ledger")
    assert motor["dropped"] == [[0, 2, 1]]
    state = daemon.state()["state"]
    assert {s["slot"]: s["stock"] for s in state["slots"]}["A3"] == 9
    sales = records_of(daemon.state_dir, "sale")
    assert [(s["data"]["slot"], s["data"]["price"], s["data"]["change"]) for s in sales] == [
        ("A3", 150, 400)
    ]
    cash_in = sum(r["data"]["amount"] for r in records_of(daemon.state_dir, "cash_in"))
    cash_out = sum(r["data"]["amount"] for r in records_of(daemon.state_dir, "cash_out"))
    assert (cash_in, cash_out) == (550, 400)


def test_jammed_motor_keeps_the_credit_and_takes_the_slot_out(daemon: Daemon) -> None:
    daemon.motor_sim("fault", row=0, col=0, jam=True)
    daemon.insert_coins(COIN_100)
    daemon.wait_state(lambda s: s["credit"] == 100, "credit")

    result = daemon.control({"op": "select", "slot": "A1"})

    assert result["ok"] is False and result["error"] == "vend_failed"
    state = daemon.state()["state"]
    assert state["credit"] == 100
    assert {s["slot"]: s["enabled"] for s in state["slots"]}["A1"] is False
    assert daemon.control({"op": "select", "slot": "A1"})["error"] == "slot_disabled"
    assert daemon.motor_sim("ledger")["dropped"] == []
    # The customer gets the money back.
    assert daemon.control({"op": "cancel"}) == {"ok": True, "paid": 100, "credit": 0}
    failed = records_of(daemon.state_dir, "vend_failed")
    assert len(failed) == 1 and failed[0]["data"]["slot"] == "A1"


def test_missed_drop_turns_once_more_then_fails(daemon: Daemon) -> None:
    daemon.motor_sim("fault", row=0, col=1, missed_drops=1)
    daemon.insert_coins(COIN_100, COIN_20)
    daemon.wait_state(lambda s: s["credit"] == 120, "credit")
    assert daemon.control({"op": "select", "slot": "A2"})["ok"] is True
    ledger = daemon.motor_sim("ledger")
    assert ledger["turns"] == [[0, 1, 2]] and ledger["dropped"] == [[0, 1, 1]]

    daemon.motor_sim("fault", row=0, col=1, missed_drops=2)
    daemon.insert_coins(COIN_100, COIN_20)
    daemon.wait_state(lambda s: s["credit"] == 120, "credit")
    result = daemon.control({"op": "select", "slot": "A2"})
    assert result["ok"] is False and result["error"] == "vend_failed"
    assert daemon.state()["state"]["credit"] == 120  # kept for another choice
    ledger = daemon.motor_sim("ledger")
    assert ledger["turns"] == [[0, 1, 4]] and ledger["dropped"] == [[0, 1, 1]]


def test_no_change_refuses_the_selection_and_returns_a_bill(daemon: Daemon) -> None:
    for coin_type in range(5):
        daemon.mdb_sim("coin", "set_tube", coin_type=coin_type, count=0)
    daemon.insert_coins(COIN_200)  # 2.00 goes to the cashbox: not a tube coin
    daemon.wait_state(lambda s: s["credit"] == 200, "credit")

    refused = daemon.control({"op": "select", "slot": "A2"})  # 1.20: 0.80 change impossible
    assert refused["ok"] is False and refused["error"] == "no_change"

    daemon.insert_bill(BILL_500)
    wait_until(lambda: daemon.mdb_ledger()["bill"]["returned"]["0"] == 1, 20, "bill returned")
    assert daemon.mdb_ledger()["bill"]["stacked"]["0"] == 0
    assert daemon.state()["state"]["credit"] == 200
    decisions = records_of(daemon.state_dir, "escrow_decision")
    assert [d["data"]["decision"] for d in decisions] == ["return"]

    assert daemon.control({"op": "select", "slot": "B1"})["error"] == "insufficient_credit"
    assert daemon.control({"op": "select", "slot": "A1"})["error"] == "no_change"
    assert daemon.state()["state"]["exact_change_only"] is True
    assert daemon.motor_sim("ledger")["turns"] == []


def test_tube_running_empty_mid_payout_keeps_the_rest_as_credit(daemon: Daemon) -> None:
    # The 1.00 tube jams after one coin: the rest is planned again from the other tubes.
    daemon.mdb_sim("coin", "jam", kind="tube", after=1)
    daemon.insert_bill(BILL_500)
    daemon.wait_state(lambda s: s["credit"] == 500, "the bill stacked")
    before = coins_paid(daemon.mdb_ledger())

    result = daemon.control({"op": "cancel"})

    paid = coins_paid(daemon.mdb_ledger()) - before
    assert result["paid"] == paid
    assert result["credit"] == 500 - paid
    cash_out = sum(r["data"]["amount"] for r in records_of(daemon.state_dir, "cash_out"))
    assert cash_out == paid
    assert daemon.state()["state"]["credit"] == 500 - paid


def test_changer_unplugged_mid_sale_stops_taking_money_and_comes_back(daemon: Daemon) -> None:
    daemon.insert_coins(COIN_100)
    daemon.wait_state(lambda s: s["credit"] == 100, "credit")
    daemon.mdb_sim("coin", "fault", unplugged=True)
    daemon.wait_state(
        lambda s: not s["in_service"] and "coin" in s["faults"], "coin fault", timeout_s=15
    )
    daemon.mdb_sim("coin", "fault", unplugged=False)
    daemon.wait_state(lambda s: s["in_service"], "changer back", timeout_s=20)
    assert daemon.state()["state"]["credit"] == 100
    assert daemon.control({"op": "select", "slot": "A1"})["ok"] is True
    states = [
        r["data"]["state"]
        for r in records_of(daemon.state_dir, "device")
        if r["data"]["device"] == "coin"
    ]
    assert "offline" in states and "recovered" in states


def test_return_lever_pays_the_credit_back(daemon: Daemon) -> None:
    daemon.insert_coins(COIN_50, COIN_20, COIN_10)
    daemon.wait_state(lambda s: s["credit"] == 80, "credit")
    before = coins_paid(daemon.mdb_ledger())
    daemon.mdb_sim("coin", "lever")
    daemon.wait_state(lambda s: s["credit"] == 0 and s["phase"] == "idle", "paid back")
    assert coins_paid(daemon.mdb_ledger()) - before == 80
    reasons = {r["data"]["reason"] for r in records_of(daemon.state_dir, "cash_out")}
    assert reasons == {"lever"}


def test_validator_jam_holds_the_bill_decision_until_the_bill_is_found(daemon: Daemon) -> None:
    daemon.mdb_sim("bill", "jam")  # the next bill jams on its way to the stacker
    daemon.insert_bill(BILL_500)
    wait_until(lambda: daemon.mdb_ledger()["bill"]["jammed_bill"] is not None, 20, "bill jammed")
    daemon.wait_state(lambda s: s["devices"].get("bill") == "fault", "validator fault")
    assert daemon.state()["state"]["credit"] == 0  # not credited while its fate is unknown
    decisions = records_of(daemon.state_dir, "escrow_decision")
    assert [d["data"]["decision"] for d in decisions] == ["stack"]

    daemon.mdb_sim("bill", "clear_jam", bill="stacked")  # the technician clears it into the box
    daemon.wait_state(lambda s: s["credit"] == 500, "bill credited once found in the stacker")
    cash_in = [r["data"] for r in records_of(daemon.state_dir, "cash_in")]
    assert [(c["device"], c["amount"], c.get("intent_id")) for c in cash_in] == [
        ("bill", 500, decisions[0]["data"]["intent_id"])
    ]
    daemon.wait_state(lambda s: s["devices"].get("bill") == "ready", "validator ready again")


def test_sold_out_slot_refuses_and_stock_runs_down_to_sold_out(tmp_path: Path) -> None:
    state = tmp_path / "state"
    slots = [("A1", 0, 0, 100, 1), ("A2", 0, 1, 120, 0)]
    d = Daemon(write_config(tmp_path / "vmc.toml", state, slots=slots), state)
    d.start()
    try:
        d.insert_coins(COIN_100, COIN_100, COIN_50)
        d.wait_state(lambda s: s["credit"] == 250, "credit")
        assert d.control({"op": "select", "slot": "A2"})["error"] == "sold_out"
        assert d.control({"op": "select", "slot": "A1"})["ok"] is True  # the last one
        assert d.control({"op": "select", "slot": "A1"})["error"] == "sold_out"
        assert d.control({"op": "select", "slot": "Z9"})["error"] == "unknown_slot"
        slots_now = {s["slot"]: s for s in d.state()["state"]["slots"]}
        assert slots_now["A1"]["stock"] == 0 and slots_now["A1"]["sellable"] is False
    finally:
        assert d.stop()[0] == 0


def test_changer_unplugged_mid_payout_is_settled_from_its_counts(daemon: Daemon) -> None:
    daemon.mdb_sim("coin", "set_payout_time", seconds=1.5)
    daemon.insert_bill(BILL_500)
    daemon.wait_state(lambda s: s["credit"] == 500, "the bill stacked")
    before = coins_paid(daemon.mdb_ledger())

    answers: list[dict[str, Any]] = []
    customer = threading.Thread(target=lambda: answers.append(daemon.control({"op": "cancel"})))
    customer.start()
    daemon.wait_state(lambda s: s["phase"] == "paying", "payout under way")
    time.sleep(0.3)
    daemon.mdb_sim("coin", "fault", unplugged=True)  # the changer drops off the bus mid-payout
    customer.join(60)
    state = daemon.wait_state(lambda s: "coin" in s["faults"], "coin fault", timeout_s=30)
    assert state["in_service"] is False
    assert daemon.control({"op": "select", "slot": "A1"})["ok"] is False

    daemon.mdb_sim("coin", "fault", unplugged=False)
    daemon.wait_state(lambda s: s["in_service"], "payout settled, back in service", timeout_s=40)
    paid = coins_paid(daemon.mdb_ledger()) - before
    assert daemon.state()["state"]["credit"] == 500 - paid
    cash_out = sum(r["data"]["amount"] for r in records_of(daemon.state_dir, "cash_out"))
    assert cash_out == paid  # every coin that left is on record, none twice
    intents = {r["data"]["intent_id"] for r in records_of(daemon.state_dir, "payout_intent")}
    finals = {
        r["data"]["intent_id"]
        for r in records_of(daemon.state_dir, "cash_out")
        if r["data"].get("final")
    }
    assert intents == finals  # the payout was closed


def test_kill_mid_payout_pays_no_coin_twice_and_keeps_the_rest_as_credit(tmp_path: Path) -> None:
    # Simulators that outlive the daemon, as the machine's peripherals outlive a crash.
    sims = ExternalSims(tmp_path / "sims")
    try:
        state = tmp_path / "state"
        config = write_config(
            tmp_path / "vmc.toml", state, mdb_port=sims.mdb_port, motor_port=sims.motor_port
        )
        daemon = Daemon(config, state, sims)
        daemon.start()
        daemon.mdb_sim("coin", "set_payout_time", seconds=2.0)
        daemon.insert_bill(BILL_500)
        daemon.wait_state(lambda s: s["credit"] == 500, "the bill stacked")
        before = coins_paid(daemon.mdb_ledger())

        def cancel() -> None:
            with contextlib.suppress(OSError, ValueError):  # the daemon dies under it
                daemon.control({"op": "cancel"})

        customer = threading.Thread(target=cancel)
        customer.start()
        wait_until(lambda: coins_paid(daemon.mdb_ledger()) > before, 20, "the first coin paid out")
        daemon.kill()  # SIGKILL with coins still on their way out
        customer.join(10)
        paid_at_kill = coins_paid(daemon.mdb_ledger()) - before
        assert 0 < paid_at_kill < 500
        # The changer finishes the payout it was given by itself, as a real one does.
        wait_until(lambda: not daemon.mdb_ledger()["coin"]["busy"], 20, "the payout to end")

        daemon.start()
        paid = coins_paid(daemon.mdb_ledger()) - before
        state_now = daemon.wait_state(lambda s: s["in_service"], "back in service", timeout_s=40)
        assert state_now["credit"] == 500 - paid  # what did not come out is still the customer's
        cash_out = sum(r["data"]["amount"] for r in records_of(state, "cash_out"))
        assert cash_out == paid  # every coin that left is on record, none twice
        intents = {r["data"]["intent_id"] for r in records_of(state, "payout_intent")}
        closed = {
            r["data"]["intent_id"] for r in records_of(state, "cash_out") if r["data"].get("final")
        } | {r["data"]["intent_id"] for r in records_of(state, "recovery")}
        assert intents and intents <= closed  # the interrupted payout was resolved
        # Nothing more is paid afterwards: the payout is not repeated.
        assert coins_paid(daemon.mdb_ledger()) - before == paid
        assert daemon.stop()[0] == 0
    finally:
        sims.stop()


def test_maximum_credit_returns_a_bill_over_it_and_stops_taking_money_at_it(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "vmc.toml", state, extra="[vend]\nmax_credit = 600")
    d = Daemon(config, state)
    d.start()
    try:
        d.insert_bill(BILL_500)
        d.wait_state(lambda s: s["credit"] == 500, "the first bill stacked")
        d.insert_bill(BILL_500)  # 10.00 would be over the 6.00 maximum
        wait_until(lambda: d.mdb_ledger()["bill"]["returned"]["0"] == 1, 20, "bill returned")
        assert d.state()["state"]["credit"] == 500
        d.insert_coins(COIN_100)
        at_max = d.wait_state(
            lambda s: s["credit"] == 600 and not any(s["accepting"].values()),
            "credit at the maximum, acceptors off",
        )
        assert at_max["max_credit"] == 600
        decisions = [r["data"]["decision"] for r in records_of(state, "escrow_decision")]
        assert decisions == ["stack", "return"]
    finally:
        assert d.stop()[0] == 0


def test_credit_timeout_pays_the_credit_back(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "vmc.toml", state, extra="[vend]\ncredit_timeout_s = 1")
    d = Daemon(config, state)
    d.start()
    try:
        before = coins_paid(d.mdb_ledger())
        d.insert_coins(COIN_50, COIN_20)
        d.wait_state(lambda s: s["credit"] == 70, "credit")
        # Nobody chooses anything: after the timeout the credit comes back by itself.
        d.wait_state(lambda s: s["credit"] == 0 and s["phase"] == "idle", "credit paid back")
        assert coins_paid(d.mdb_ledger()) - before == 70
        cash_out = records_of(state, "cash_out")
        assert sum(r["data"]["amount"] for r in cash_out) == 70
        assert {r["data"]["reason"] for r in cash_out} == {"refund"}
    finally:
        assert d.stop()[0] == 0


def test_a_slot_disabled_in_the_planogram_refuses(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "vmc.toml", state)
    with config.open("a") as f:
        f.write('[[slot]]\nid = "C1"\nrow = 2\ncol = 0\nprice = 100\nstock = 5\nenabled = false\n')
    d = Daemon(config, state)
    d.start()
    try:
        d.insert_coins(COIN_100)
        d.wait_state(lambda s: s["credit"] == 100, "credit")
        assert d.control({"op": "select", "slot": "C1"})["error"] == "slot_disabled"
        slots = {s["slot"]: s for s in d.state()["state"]["slots"]}
        assert slots["C1"]["sellable"] is False
        assert d.state()["state"]["credit"] == 100  # the refusal keeps the credit
        assert d.motor_sim("ledger")["turns"] == []
    finally:
        assert d.stop()[0] == 0


def test_a_coin_reported_during_a_vend_is_journaled_before_the_change_is_paid(
    daemon: Daemon,
) -> None:
    """Found by the 300-kill campaign's per-record check (seed 20261202): a coin the changer
    reported while the vend ran was journaled after the change it helped pay (the payout read
    the tubes with it inside), so by the records a tube went below zero."""
    daemon.insert_coins(COIN_100, COIN_50)
    daemon.wait_state(lambda s: s["credit"] == 150, "credit")
    daemon.motor_sim("fault", row=0, col=0, missed_drops=1)  # two turns: a longer vend
    daemon.mdb_sim("coin", "fault", batch_items=2)  # the next report is held back ...
    daemon.insert_coins(COIN_50)
    answers: list[dict[str, Any]] = []
    customer = threading.Thread(
        target=lambda: answers.append(daemon.control({"op": "select", "slot": "A1"}))
    )
    customer.start()
    daemon.wait_state(lambda s: s["phase"] == "vending", "the vend under way")
    daemon.mdb_sim("coin", "flush")  # ... and reaches the machine in the middle of the vend
    daemon.mdb_sim("coin", "fault", batch_items=0)
    customer.join(20)
    assert answers and answers[0]["ok"] is True, answers
    daemon.wait_state(lambda s: s["credit"] == 50 and s["phase"] == "idle", "the coin credited")
    records = [
        r for r in journal_records(daemon.state_dir) if r["type"] in ("cash_in", "payout_intent")
    ]
    kinds = [(r["type"], r["data"].get("amount")) for r in records]
    assert kinds == [("cash_in", 100), ("cash_in", 50), ("cash_in", 50), ("payout_intent", 50)]


#: After the vend started: its RUN is out, its 2.5 s turn far from over.
RUN_UNDER_WAY_S = 1.0


def test_a_motor_board_lost_mid_turn_counts_the_vend_as_interrupted(tmp_path: Path) -> None:
    """The board stops answering after the RUN: the product may have fallen. The vend is
    journaled as interrupted (not as certainly failed), the customer keeps the credit, and the
    machine stops selling until the board answers again."""
    sims = ExternalSims(tmp_path / "sims", motor_args=("--turn-time", "2.5"))
    try:
        state = tmp_path / "state"
        config = write_config(
            tmp_path / "vmc.toml", state, mdb_port=sims.mdb_port, motor_port=sims.motor_port
        )
        d = Daemon(config, state, sims)
        with d.running():
            d.insert_coins(COIN_100)
            d.wait_state(lambda s: s["credit"] == 100, "credit")
            selection = d.select_until_vending("A1")
            # The RUN follows within milliseconds (one drop sensor read); the turn takes 2.5 s.
            # The simulator tells no "running" to wait for, so: into the middle of the turn.
            time.sleep(RUN_UNDER_WAY_S)
            d.motor_sim("fault", unplugged=True)
            answer = selection.answer()
            assert answer["ok"] is False and answer["error"] == "vend_failed", answer
            failed = records_of(state, "vend_failed")
            assert [(f["data"]["slot"], f["data"]["reason"]) for f in failed] == [
                ("A1", "interrupted")
            ]
            assert "motor board" in failed[0]["data"]["detail"]
            assert not records_of(state, "sale")
            state_now = d.state()["state"]
            assert state_now["credit"] == 100
            assert "motor" in state_now["faults"]
            d.motor_sim("fault", unplugged=False)
    finally:
        sims.stop()
