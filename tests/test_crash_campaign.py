"""The crash campaign, small: under the default CPU load, SIGKILL the daemon at random instants
while customers vend, then check every journal record and the totals against the simulators'
ledgers (hil/crash_campaign.py has the invariants; `python -m hil.crash_campaign --kills 300` is
the large run). One seed runs with the cloud (``--cloud``): a real mosquitto broker, the
stand-in backend, QR purchases and kills during sync; the backend's store must hold the journal
exactly, every command must have its results and every paid order one outcome. A failed run's
work directory (journal, daemon, simulator, broker and backend logs, the backend's store) is
copied where it stays ($VMC_CRASH_KEEP_DIR, else the temp folder) and named in the failure.

The per-record and cloud checks themselves are tested on hand-made records, fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hil.crash_campaign import (
    CloudFacts,
    Sent,
    check_cloud,
    check_records,
    keep_workdir,
    run_campaign,
)
from tests.mqtt_broker import mosquitto_binary

KILLS = 12
#: The cloud seed's run: fewer kills, one of them after a round that outlives an order (~13 s).
CLOUD_KILLS = 10
#: (seed, cloud)
RUNS = [
    (20261122, False),
    (20261130, False),
    pytest.param(
        1124,
        True,
        marks=pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed"),
    ),
]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("seed", "cloud"), RUNS)
def test_kills_lose_no_money_and_never_vend_twice(tmp_path: Path, seed: int, cloud: bool) -> None:
    workdir = tmp_path / "campaign"
    name = f"vmc-crash-seed{seed}{'-cloud' if cloud else ''}"
    try:
        kills = CLOUD_KILLS if cloud else KILLS
        outcome = run_campaign(workdir, kills=kills, seed=seed, log=lambda _msg: None, cloud=cloud)
    except BaseException as exc:  # an error, or pytest-timeout's failure: keep the evidence
        if workdir.exists():
            kept = keep_workdir(workdir, name)
            exc.add_note(f"seed {seed}: workdir kept at {kept}")
        raise
    if outcome.failures:
        kept = keep_workdir(workdir, name)
        lines = [f"seed {seed}: {len(outcome.failures)} failures; workdir kept at {kept}"]
        lines += outcome.failures
        lines += [f"{name}: {value}" for name, value in outcome.figures.items()]
        pytest.fail("\n".join(lines), pytrace=False)
    assert outcome.figures["kills"] == kills
    # The campaign did real work between kills: money moved.
    assert outcome.figures["money_in"] != "0.00", outcome.figures
    assert outcome.figures["customer_actions"] > kills, outcome.figures
    if cloud:
        # The cloud did real work too: records synced, QR orders shown and vends sent.
        figures = outcome.figures
        assert figures["records_synced"] == figures["records"] > 0, figures
        assert figures["qr_orders_shown"] > 0, figures
        assert figures["commands"].get("vend", 0) > 0, figures


# --- the per-record checks on hand-made records ------------------------------------------------

_seq = 0


def _r(kind: str, **data: Any) -> dict[str, Any]:
    global _seq
    _seq += 1
    return {
        "seq": _seq,
        "id": f"r{_seq}",
        "boot_id": "b",
        "ts": "2026-11-30T10:00:00.000Z",
        "type": kind,
        "data": data,
        "source": {"kind": "local"},
    }


def _start() -> list[dict[str, Any]]:
    global _seq
    _seq = 0
    return [
        _r("boot", version="t"),
        _r("correction", device="coin", field="tubes.3.count", expected=0, found=20, amount=1000),
    ]


def _coin(value: int = 50, coin_type: int = 3) -> dict[str, Any]:
    return _r("cash_in", amount=value, device="coin", route="tubes", coin_type=coin_type)


def test_records_of_a_refund_paid_with_its_coins_pass() -> None:
    records = [
        *_start(),
        _coin(),
        _coin(),
        _r("payout_intent", intent_id="p1", amount=100, reason="refund", tubes={"3": 22}),
        _r("cash_out", amount=100, reason="refund", coins={"3": 2}, intent_id="p1", final=True),
    ]
    walk = check_records(records)
    assert walk.failures == []
    assert walk.credit == 0
    assert (walk.payouts, walk.payouts_settled) == (1, 1)


def test_the_late_coin_counted_as_paid_is_named_by_its_seq() -> None:
    """The failure of 2026-11-30: 1.00 credited, a refund of 1.00, a late 'coin deposited' item
    counted as paid: cash_out 1.50 and the credit at -0.50."""
    records = [
        *_start(),
        _coin(),
        _coin(),
        _r("payout_intent", intent_id="p1", amount=100, reason="refund", tubes={"3": 22}),
        _r("cash_out", amount=150, reason="refund", coins={"3": 3}, intent_id="p1", final=True),
    ]
    failures = check_records(records).failures
    assert len(failures) == 2, failures
    assert failures[0].startswith("seq 6 cash_out: 1.50")
    assert "above its intent's 1.00" in failures[0]
    assert failures[1].startswith("seq 6 cash_out: customer credit -0.50")


def test_a_payout_above_the_credit_and_coins_worth_another_amount_fail() -> None:
    records = [
        *_start(),
        _coin(),
        _r("payout_intent", intent_id="p1", amount=100, reason="refund", tubes={"3": 1}),
        _r("cash_out", amount=50, reason="refund", coins={"3": 2}, intent_id="p1"),
        _r("cash_out", amount=50, reason="refund", coins={"3": 1}, intent_id="p1", final=True),
    ]
    failures = check_records(records).failures
    assert any(f.startswith("seq 4 payout_intent p1: refund of 1.00") for f in failures), failures
    assert any(f.startswith("seq 5 cash_out: amount 0.50 but its coins") for f in failures)
    assert any("has paid 2 coins of type 3, its tube held 1" in f for f in failures)
    assert any(f.startswith("seq 6 cash_out: customer credit -0.50") for f in failures)


def test_a_cash_vend_above_the_credit_and_an_unopened_outcome_fail() -> None:
    records = [
        *_start(),
        _coin(),
        _r("vend_intent", intent_id="v1", slot="A1", price=100, method="cash"),
        _r("vend_failed", intent_id="v2", slot="A1", price=100, method="cash", reason="x"),
    ]
    walk = check_records(records)
    assert walk.failures[0].startswith("seq 4 vend_intent v1: slot A1 at 1.00 with a credit")
    assert walk.failures[1].startswith("seq 5 vend_failed: ")
    assert walk.open_intents == {"v1": "vend_intent"}


def test_a_payout_resolved_by_recovery_counts_as_settled_and_recovered() -> None:
    records = [
        *_start(),
        _coin(100, 4),
        _r("payout_intent", intent_id="p1", amount=100, reason="refund", tubes={"3": 20}),
        _r("boot", version="t"),
        _r("cash_out", amount=50, reason="refund", coins={"3": 1}, intent_id="p1", final=True),
        _r("credit", amount=50, reason="refund payout interrupted"),
        _r("recovery", intent_id="p1", resolution="paid_from_tube_counts", detail="d"),
    ]
    walk = check_records(records)
    assert walk.failures == []
    assert (walk.payouts, walk.payouts_settled, walk.payouts_recovered) == (1, 1, 1)
    assert walk.credit == 50
    assert walk.open_intents == {}


# --- the cloud checks on hand-made records -----------------------------------------------------

J = "j1"


def _facts(
    records: list[dict[str, Any]],
    commands: list[Sent],
    results: list[dict[str, Any]],
    stored: list[dict[str, Any]] | None = None,
    acked: int | None = None,
) -> CloudFacts:
    last = max(r["seq"] for r in records)
    if stored is None:
        stored = [{"machine": "TEST-0001", "journal": J, **r} for r in records]
    return CloudFacts(
        journal=J,
        last_seq=last,
        acked_upto=last if acked is None else acked,
        stored=stored,
        journals=[{"journal": J, "duplicates": 0}],
        results=results,
        commands=commands,
    )


def _vend(cmd_id: str, order_id: str, how: str = "prompt") -> Sent:
    return Sent(cmd_id, "vend", b"{}", how, order_id=order_id, slot="A1", price=100, sends=1)


def _remote(cmd_id: str) -> dict[str, str]:
    return {"kind": "remote", "cmd_id": cmd_id}


def _qr_sale(order_id: str, cmd_id: str, intent: str) -> list[dict[str, Any]]:
    about = {"intent_id": intent, "slot": "A1", "price": 100, "method": "qr", "order_id": order_id}
    intent_record = _r("vend_intent", **about)
    intent_record["source"] = _remote(cmd_id)
    sale = _r("sale", **about)
    sale["source"] = _remote(cmd_id)
    return [intent_record, sale]


def _order(order_id: str) -> dict[str, Any]:
    return _r("order", order_id=order_id, slot="A1", price=100, state="created", origin="machine")


def test_a_synced_qr_sale_with_a_redelivered_command_passes() -> None:
    records = [*_start(), _order("o1"), *_qr_sale("o1", "c1", "v1")]
    command = _vend("c1", "o1")
    command.sends = 2
    ok = {"cmd_id": "c1", "ok": True, "error": None}
    failures, figures = check_cloud(records, _facts(records, [command], [ok, ok]))
    assert failures == []
    assert figures["records_synced"] == len(records)
    assert figures["qr_sales"] == 1 and figures["redeliveries"] == 1
    assert check_records(records).failures == []  # a QR sale leaves the cash credit alone


def test_missing_doubled_changed_and_unacked_records_are_named_by_seq() -> None:
    records = [*_start(), _order("o1"), *_qr_sale("o1", "c1", "v1")]
    stored = [{"machine": "TEST-0001", "journal": J, **r} for r in records]
    changed = {**stored[3], "data": {**stored[3]["data"], "price": 1}}
    stored = [stored[0], stored[1], stored[1], changed]  # seq 2 twice, 3 missing, 4 altered
    ok = {"cmd_id": "c1", "ok": True, "error": None}
    failures, _ = check_cloud(
        records, _facts(records, [_vend("c1", "o1")], [ok], stored=stored, acked=3)
    )
    text = "\n".join(failures)
    assert "acked_upto 3 after the last clean stop, last seq 5: seqs 4-5 unacknowledged" in text
    assert "seqs 2 of journal j1 more than once" in text
    assert "lacks seqs 3, 5 of journal j1" in text
    assert "seq 4 vend_intent: data" in text


def test_two_sales_for_one_order_and_a_refused_vend_that_vended_fail() -> None:
    records = [
        *_start(),
        _order("o1"),
        *_qr_sale("o1", "c1", "v1"),
        *_qr_sale("o1", "c2", "v2"),
    ]
    results = [
        {"cmd_id": "c1", "ok": True, "error": None},
        {"cmd_id": "c2", "ok": False, "error": "order_expired"},
    ]
    failures, _ = check_cloud(
        records, _facts(records, [_vend("c1", "o1"), _vend("c2", "o1")], results)
    )
    assert any(f.startswith("order o1: 2 sales (seqs 5, 7)") for f in failures), failures
    assert any("cmd c2 (vend prompt, order o1): refused (order_expired) yet" in f for f in failures)


def test_a_command_without_a_result_or_with_two_different_ones_fails() -> None:
    records = [*_start(), _order("o1"), _order("o2")]
    results = [
        {"cmd_id": "c2", "ok": True, "error": None},
        {"cmd_id": "c2", "ok": False, "error": "interrupted"},
    ]
    commands = [_vend("c1", "o1"), _vend("c2", "o2", how="late")]
    failures, _ = check_cloud(records, _facts(records, commands, results))
    assert any(
        f.startswith("cmd c1 (vend prompt, order o1, sent 1x): no cmd/result") for f in failures
    )
    assert any("cmd c2 (vend late, order o2, sent 1x): results disagree" in f for f in failures)
    # ... and its first result (ok) names no sale, and was sent after the order expired.
    assert any("result ok, 0 sale(s) name it" in f for f in failures), failures
    assert any("sold although sent after the order expired" in f for f in failures), failures


def test_an_interrupted_qr_vend_resolved_by_recovery_passes() -> None:
    records = [*_start(), _order("o1")]
    intent = _r("vend_intent", intent_id="v1", slot="A1", price=100, method="qr", order_id="o1")
    intent["source"] = _remote("c1")
    records += [
        intent,
        _r("boot", version="t"),
        _r(
            "vend_failed",
            intent_id="v1",
            slot="A1",
            price=100,
            method="qr",
            order_id="o1",
            reason="interrupted",
        ),
        _r(
            "refund",
            intent_id="v1",
            amount=100,
            method="qr",
            order_id="o1",
            reason="vend interrupted",
            currency="EUR",
        ),
        _r("recovery", intent_id="v1", resolution="refund", detail="d"),
    ]
    results = [{"cmd_id": "c1", "ok": False, "error": "interrupted"}]
    failures, figures = check_cloud(records, _facts(records, [_vend("c1", "o1")], results))
    assert failures == []
    assert figures["qr_vends_interrupted"] == 1 and figures["qr_refunds"] == 1
    assert check_records(records).failures == []
