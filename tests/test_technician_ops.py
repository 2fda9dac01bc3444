"""The technician's control ops (vmc/technician.py) end to end: the daemon as a subprocess with
the simulated coin changer, bill validator and motor board answering real MDB and VMC96 bytes
(hil/harness.py), requests on the control socket as the console, the rig or a screen sends
them. One daemon serves the module's tests, in order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hil.harness import Daemon, journal_records, wait_until, write_config
from vmc.console.auth import hash_pin

pytestmark = pytest.mark.slow

# The simulators' coins and bills (hil/sim/coin.py DEFAULT_COINS, hil/sim/bill.py).
COIN_50, COIN_100 = 3, 4
BILL_500 = 0
CONSOLE = {"user": "tech7"}
#: ``console.idle_logout_s`` here: fill mode ends by itself after this long without a coin.
FILL_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("technician")
    state = tmp / "state"
    extra = f'[console]\npin_hash = "{hash_pin("4711")}"\nidle_logout_s = {FILL_TIMEOUT_S}'
    with Daemon(write_config(tmp / "vmc.toml", state, extra=extra), state).running() as d:
        yield d


def op(d: Daemon, name: str, **fields: Any) -> dict[str, Any]:
    return d.control({"op": name, **CONSOLE, **fields})


def console_records(d: Daemon, kind: str) -> list[dict[str, Any]]:
    return [
        r
        for r in journal_records(d.state_dir)
        if r["type"] == kind and r["source"] == {"kind": "console", "user": "tech7"}
    ]


def tubes(d: Daemon) -> dict[int, int]:
    answer = op(d, "coins")
    assert answer["ok"], answer
    return {t["coin_type"]: t["count"] for t in answer["tubes"]}


def test_devices_show_identity_level_and_details(daemon: Daemon) -> None:
    answer = op(daemon, "devices")
    assert answer["ok"], answer
    by_name = {d["device"]: d for d in answer["devices"]}
    assert set(by_name) == {"coin", "bill"}
    coin = by_name["coin"]
    assert coin["state"] == "ready" and coin["level"] == 3
    assert coin["manufacturer"] and coin["serial"] and coin["model"]
    assert "features" in coin["details"] and coin["details"]["coin_values"]
    assert by_name["bill"]["details"]["bill_values"]
    assert answer["motor"]["present"] is True


def test_fill_mode_puts_coins_in_the_tubes_without_credit(daemon: Daemon) -> None:
    before = tubes(daemon)
    assert op(daemon, "coin_fill", on=True) == {"ok": True, "fill_mode": True}
    refused = daemon.control({"op": "select", "slot": "A1"})
    assert refused["error"] == "busy"
    daemon.insert_coins(COIN_50, COIN_50)
    daemon.wait_state(lambda s: tubes(daemon)[COIN_50] == before[COIN_50] + 2, "two coins in")
    # Turned off at once: coins the changer took are fill coins even if not yet reported.
    assert op(daemon, "coin_fill", on=False)["fill_mode"] is False
    assert daemon.state()["state"]["credit"] == 0
    assert daemon.control({"op": "select", "slot": "A1"})["error"] == "insufficient_credit"
    fills = [r for r in journal_records(daemon.state_dir) if r["type"] == "cash_in"]
    assert [(r["data"]["coin_type"], r["data"].get("fill")) for r in fills] == [
        (COIN_50, True),
        (COIN_50, True),
    ]


def test_fill_mode_left_on_ends_by_itself_and_at_logout(daemon: Daemon) -> None:
    # The technician walked away (a dropped line, a killed terminal): customer coins must not
    # go on into the tubes uncredited.
    assert op(daemon, "coin_fill", on=True)["fill_mode"] is True
    # Watched in the log, not with the coins op: ops run on the vend cycle's actor, whose
    # timer ticks only when no job came for its tick interval.
    ended = "fill mode ended: no fill coin for the console's idle time"
    wait_until(
        lambda: any(line.get("event") == ended for line in daemon.log_lines()),
        FILL_TIMEOUT_S + 10.0,
        "fill mode off after the idle time",
    )
    assert op(daemon, "coins")["fill_mode"] is False
    assert op(daemon, "coin_fill", on=True)["fill_mode"] is True
    assert op(daemon, "console_logout", reason="logout", line="rig")["ok"]
    assert op(daemon, "coins")["fill_mode"] is False


def test_payout_of_a_tube_is_journaled_as_manual_and_refused_with_credit(daemon: Daemon) -> None:
    daemon.insert_coins(COIN_100)
    daemon.wait_state(lambda s: s["credit"] == 100, "credit 100")
    refused = op(daemon, "coin_payout", coin_type=COIN_50, count=1)
    assert refused["error"] == "credit", refused
    assert op(daemon, "device_reset", device="coin")["error"] == "credit"
    assert daemon.control({"op": "cancel"})["ok"]
    before = tubes(daemon)
    answer = op(daemon, "coin_payout", coin_type=COIN_50, count=2)
    assert answer == {
        "ok": True,
        "coin_type": COIN_50,
        "wanted": 2,
        "paid": 2,
        "value": 100,
    }
    assert tubes(daemon)[COIN_50] == before[COIN_50] - 2
    outs = console_records(daemon, "cash_out")
    assert [(r["data"]["reason"], r["data"]["coins"]) for r in outs] == [
        ("manual", {str(COIN_50): 2})
    ]
    assert daemon.state()["state"]["credit"] == 0
    bad = op(daemon, "coin_payout", coin_type=COIN_50, count="two")
    assert bad["error"] == "bad_request"


def test_bills_stacker_count_and_emptying(daemon: Daemon) -> None:
    daemon.insert_bill(BILL_500)
    daemon.wait_state(lambda s: s["credit"] == 500, "the bill stacked")
    assert daemon.control({"op": "cancel"})["ok"]
    daemon.wait_state(lambda s: s["credit"] == 0, "paid back")
    bills = op(daemon, "bills")
    assert (bills["device_count"], bills["journal_count"], bills["value"]) == (1, 1, 500)
    daemon.mdb_sim("bill", "remove_cashbox")
    daemon.mdb_sim("bill", "replace_cashbox")
    emptied = op(daemon, "bills_emptied")
    assert emptied == {"ok": True, "device": "bill", "count": 1, "value": 500, "device_count": 0}
    after = op(daemon, "bills")
    assert (after["device_count"], after["journal_count"], after["value"]) == (0, 0, 0)
    assert [r["data"]["count"] for r in console_records(daemon, "cash_removed")] == [1]


def test_motor_test_turns_the_slot_and_takes_the_product_off_the_stock(daemon: Daemon) -> None:
    stock = {s["slot"]: s["stock"] for s in daemon.state()["state"]["slots"]}
    answer = op(daemon, "motor_test", slot="A3")
    assert answer["ok"] and answer["dropped"] is True, answer
    assert answer["stock"] == stock["A3"] - 1
    assert daemon.motor_sim("ledger")["dropped"]
    tests = console_records(daemon, "motor_test")
    assert [(r["data"]["slot"], r["data"]["dropped"]) for r in tests] == [("A3", True)]
    inventory = console_records(daemon, "inventory_changed")
    assert [(r["data"]["old"], r["data"]["new"]) for r in inventory] == [
        (stock["A3"], stock["A3"] - 1)
    ]
    assert op(daemon, "motor_test", slot="Z9")["error"] == "unknown_slot"


def test_reset_a_device_brings_it_up_again(daemon: Daemon) -> None:
    answer = op(daemon, "device_reset", device="bill")
    assert answer == {"ok": True, "device": "bill", "state": "starting"}
    daemon.wait_state(
        lambda s: s["devices"]["bill"] == "ready" and s["accepting"]["bill"], "bill ready again"
    )
    resets = console_records(daemon, "device")
    assert [r["data"]["detail"] for r in resets] == ["reset from the console"]
    assert op(daemon, "device_reset", device="hopper")["error"] == "unknown_device"


def test_slot_out_of_sale_sync_config_journal(daemon: Daemon) -> None:
    answer = op(daemon, "set_slot", slot="B1", enabled=False)
    assert answer["ok"] and answer["enabled"] is False
    assert daemon.control({"op": "select", "slot": "B1"})["error"] == "slot_disabled"
    assert op(daemon, "set_slot", slot="B1", enabled=True)["enabled"] is True
    sync = op(daemon, "sync")
    assert sync["cloud_link"] is None and sync["backlog"] == sync["last_seq"]
    assert op(daemon, "sync_force")["error"] == "unavailable"
    config = op(daemon, "config")["config"]
    assert config["console"]["pin_hash"] == "***"
    tail = op(daemon, "journal_tail", n=2)["records"]
    assert [r["type"] for r in tail] == ["slot_changed", "slot_changed"]
    report = op(daemon, "journal_report")
    assert "A3" in report["text"] and report["report"]["last_seq"] >= tail[-1]["seq"]


def test_dex_report_and_its_reset_are_the_consoles(daemon: Daemon) -> None:
    read = op(daemon, "dex")
    assert read["ok"] and read["report"].startswith("DXS*"), read
    assert "\r\nDXE*" in read["report"]
    assert not console_records(daemon, "audit_read")
    assert op(daemon, "dex", reset=True)["reset"] is True
    reads = console_records(daemon, "audit_read")
    assert [r["data"]["via"] for r in reads] == ["console"]


def test_after_a_restart_fill_coins_and_manual_payouts_are_no_credit(daemon: Daemon) -> None:
    # The credit is rebuilt from the journal's counters at start (vmc/journal/recovery.py):
    # the fill coins and the technician's payout above must not count as customer money.
    code, _elapsed = daemon.stop()
    assert code == 0
    daemon.start()
    state = daemon.state()["state"]
    assert state["credit"] == 0 and state["in_service"]
