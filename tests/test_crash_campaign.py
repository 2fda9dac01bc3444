"""The crash campaign, small: under the default CPU load, SIGKILL the daemon at random instants
while customers vend, then check every journal record and the totals against the simulators'
ledgers (hil/crash_campaign.py has the invariants; `python -m hil.crash_campaign --kills 300` is
the large run). A failed run's work directory (journal, daemon and simulator logs) is copied
where it stays ($VMC_CRASH_KEEP_DIR, else the temp folder) and named in the failure.

The per-record checks themselves are tested on hand-made records, fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hil.crash_campaign import check_records, keep_workdir, run_campaign

KILLS = 12
SEEDS = (20261122, 20261130, 1124)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", SEEDS)
def test_kills_lose_no_money_and_never_vend_twice(tmp_path: Path, seed: int) -> None:
    workdir = tmp_path / "campaign"
    try:
        outcome = run_campaign(workdir, kills=KILLS, seed=seed, log=lambda _msg: None)
    except BaseException as exc:  # an error, or pytest-timeout's failure: keep the evidence
        if workdir.exists():
            kept = keep_workdir(workdir, f"vmc-crash-seed{seed}")
            exc.add_note(f"seed {seed}: workdir kept at {kept}")
        raise
    if outcome.failures:
        kept = keep_workdir(workdir, f"vmc-crash-seed{seed}")
        lines = [f"seed {seed}: {len(outcome.failures)} failures; workdir kept at {kept}"]
        lines += outcome.failures
        lines += [f"{name}: {value}" for name, value in outcome.figures.items()]
        pytest.fail("\n".join(lines), pytrace=False)
    assert outcome.figures["kills"] == KILLS
    # The campaign did real work between kills: money moved.
    assert outcome.figures["money_in"] != "0.00", outcome.figures
    assert outcome.figures["customer_actions"] > KILLS, outcome.figures


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
