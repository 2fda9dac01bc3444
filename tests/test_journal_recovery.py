"""Start-up recovery in-process: write intents, close without outcomes (as a crash would leave
them), reopen, resolve with the devices' facts, check the records, counters and levels."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_journal_support import bill_in, coin_in, sale, vend_intent
from vmc.journal import (
    DeviceFacts,
    Journal,
    Record,
    customer_credit,
    reconcile_devices,
    resolve_open_intents,
    stock_levels,
)

COIN_VALUES = {0: 5, 1: 10, 2: 20, 3: 50}


async def _crash_after(state: Path, items: list[tuple[str, dict[str, Any]]]) -> None:
    """Append ``items`` and stop without writing any outcome (close is as good as a crash here:
    the records are durable either way; the SIGKILL test covers the crash itself)."""
    journal = await Journal.open(state)
    try:
        for rtype, data in items:
            await journal.append(rtype, data)
    finally:
        await journal.close()


def _types(records: list[Record]) -> list[str]:
    return [r.type for r in records]


async def _resolve(state: Path, facts: DeviceFacts) -> tuple[Journal, list[Record]]:
    journal = await Journal.open(state)
    return journal, await resolve_open_intents(journal, facts)


async def test_interrupted_cash_vend_offers_the_credit_again_and_never_vends(
    tmp_path: Path,
) -> None:
    await _crash_after(
        tmp_path,
        [
            ("cash_in", coin_in(100, 3)),
            ("cash_in", coin_in(100, 3)),
            ("vend_intent", vend_intent("v1", "A1", 150, "cash")),
        ],
    )
    journal, written = await _resolve(tmp_path, DeviceFacts())
    try:
        assert _types(written) == ["vend_failed", "credit", "recovery"]
        failed, credit, recovery = written
        assert failed.data == {
            "intent_id": "v1",
            "slot": "A1",
            "price": 150,
            "method": "cash",
            "reason": "interrupted",
        }
        assert credit.data["amount"] == 150
        assert recovery.data["intent_id"] == "v1" and recovery.data["resolution"] == "credit"
        assert [r.seq for r in written] == [6, 7, 8]  # one atomic append_many after boot 5
        assert await journal.open_intents() == []
        counters = await journal.counters()
        assert "sales.count" not in counters and counters["vend_failed.count"] == 1
        assert customer_credit(counters) == 200  # the customer's money is still theirs
        assert await journal.verify_counters() == []
        assert await resolve_open_intents(journal, DeviceFacts()) == []  # nothing left to do
    finally:
        await journal.close()


async def test_interrupted_card_and_qr_vends_are_refunded(tmp_path: Path) -> None:
    card = {**vend_intent("v-card", "B2", 120, "card"), "session_id": "s-9"}
    qr = {**vend_intent("v-qr", "C3", 300, "qr"), "order_id": "o-7"}
    await _crash_after(tmp_path, [("vend_intent", card), ("vend_intent", qr)])
    journal, written = await _resolve(tmp_path, DeviceFacts())
    try:
        assert _types(written) == ["vend_failed", "refund", "recovery"] * 2
        refunds = [r.data for r in written if r.type == "refund"]
        assert refunds == [
            {
                "intent_id": "v-card",
                "amount": 120,
                "method": "card",
                "reason": "vend interrupted",
                "session_id": "s-9",
            },
            {
                "intent_id": "v-qr",
                "amount": 300,
                "method": "qr",
                "reason": "vend interrupted",
                "order_id": "o-7",
            },
        ]
        counters = await journal.counters()
        assert counters["refund.value"] == 420 and counters["refund.method.qr.value"] == 300
        assert customer_credit(counters) == 0  # card and QR money is not cash credit
    finally:
        await journal.close()


async def _tubes(journal: Journal) -> dict[str, int]:
    return {k: v for k, v in (await journal.levels()).items() if k.startswith("tubes.")}


async def test_interrupted_payout_is_derived_from_tube_counts(tmp_path: Path) -> None:
    await _crash_after(
        tmp_path,
        [
            *[("cash_in", coin_in(50, 3)) for _ in range(10)],  # 10 coins of 50 in tube 3
            *[("cash_in", coin_in(10, 1)) for _ in range(5)],  # 5 coins of 10 in tube 1
            ("vend_intent", vend_intent("v", "A1", 380)),
            ("sale", {**sale("v", "A1", 380), "change": 170}),
            ("payout_intent", {"intent_id": "p", "amount": 170, "reason": "change"}),
            ("cash_out", {"intent_id": "p", "amount": 50, "reason": "change", "coins": {"3": 1}}),
        ],
    )
    # The changer says: tube 3 lost one more coin than recorded, tube 1 two (unrecorded).
    facts = DeviceFacts(tube_counts={3: 8, 1: 3}, coin_values=COIN_VALUES, stacker_count=0)
    journal, written = await _resolve(tmp_path, facts)
    try:
        assert _types(written) == ["cash_out", "credit", "recovery"]
        cash_out, credit, recovery = written
        assert cash_out.data == {
            "amount": 70,
            "reason": "change",
            "intent_id": "p",
            "coins": {"1": 2, "3": 1},
            "final": True,
        }
        assert credit.data["amount"] == 50  # 170 owed - 50 recorded - 70 found paid
        assert recovery.data["resolution"] == "paid_from_tube_counts"
        assert await _tubes(journal) == {"tubes.3.count": 8, "tubes.1.count": 3}
        assert await reconcile_devices(journal, facts) == []  # levels now match the devices
        counters = await journal.counters()
        # 550 in, 380 sold, 120 of the change paid: the 50 offered as credit is still owed.
        assert customer_credit(counters) == 550 - 380 - 120 == credit.data["amount"]
        assert await journal.verify_counters() == []
    finally:
        await journal.close()


async def test_payout_is_measured_against_the_counts_in_its_intent(tmp_path: Path) -> None:
    """A coin of 20 went into tube 2 and its report was lost (crash before its cash_in), then a
    payout of 40 took two coins of 20 from the same tube before the next crash: by the records'
    levels the tube lost only one coin. The intent's own counts (read with acceptance off) tell
    the payout's two coins apart from the deposit, which reconciliation then finds."""
    await _crash_after(
        tmp_path,
        [
            *[("cash_in", coin_in(20, 2)) for _ in range(5)],  # the records: 5 coins in tube 2
            # ... the unrecorded coin makes it 6, as the intent's counts show:
            (
                "payout_intent",
                {"intent_id": "p", "amount": 40, "reason": "refund", "tubes": {"2": 6}},
            ),
        ],
    )
    facts = DeviceFacts(tube_counts={2: 4}, coin_values=COIN_VALUES)
    journal, written = await _resolve(tmp_path, facts)
    try:
        assert _types(written) == ["cash_out", "recovery"]
        assert written[0].data["coins"] == {"2": 2} and written[0].data["amount"] == 40
        (deposit,) = await reconcile_devices(journal, facts)
        assert (deposit.data["expected"], deposit.data["found"], deposit.data["amount"]) == (
            3,
            4,
            20,
        )
        # The found coin is a correction, not credit (docs/journal.md: surplus policy).
        assert customer_credit(await journal.counters()) == 100 - 40
    finally:
        await journal.close()


async def test_counts_in_the_intent_exclude_coins_already_recorded(tmp_path: Path) -> None:
    await _crash_after(
        tmp_path,
        [
            *[("cash_in", coin_in(50, 3)) for _ in range(4)],
            (
                "payout_intent",
                {"intent_id": "p", "amount": 150, "reason": "change", "tubes": {"3": 4}},
            ),
            ("cash_out", {"intent_id": "p", "amount": 50, "reason": "change", "coins": {"3": 1}}),
        ],
    )
    # Two coins left in all: one is on record, the other is this payout's; 50 stays owed.
    journal, written = await _resolve(
        tmp_path, DeviceFacts(tube_counts={3: 2}, coin_values=COIN_VALUES)
    )
    try:
        assert _types(written) == ["cash_out", "credit", "recovery"]
        assert written[0].data["coins"] == {"3": 1} and written[1].data["amount"] == 50
    finally:
        await journal.close()


async def test_payout_never_claims_more_than_was_owed(tmp_path: Path) -> None:
    await _crash_after(
        tmp_path,
        [
            *[("cash_in", coin_in(50, 3)) for _ in range(10)],
            ("payout_intent", {"intent_id": "p", "amount": 60, "reason": "lever"}),
        ],
    )
    # Tube 3 lost 4 coins (200), but only 60 was owed: one coin (50) is attributed to the
    # payout, 10 stays credit, and the other three coins are reconciliation's business.
    facts = DeviceFacts(tube_counts={3: 6}, coin_values=COIN_VALUES)
    journal, written = await _resolve(tmp_path, facts)
    try:
        assert _types(written) == ["cash_out", "credit", "recovery"]
        assert written[0].data["coins"] == {"3": 1} and written[1].data["amount"] == 10
        (correction,) = await reconcile_devices(journal, facts)
        assert correction.data == {
            "device": "coin",
            "field": "tubes.3.count",
            "expected": 9,
            "found": 6,
            "amount": -150,
        }
        assert (await journal.counters())["correction.shortfall.value"] == 150
    finally:
        await journal.close()


async def test_payout_with_unknown_tubes_is_credited_and_corrected_later(tmp_path: Path) -> None:
    await _crash_after(
        tmp_path,
        [
            *[("cash_in", coin_in(20, 2)) for _ in range(5)],
            ("payout_intent", {"intent_id": "p", "amount": 60, "reason": "refund"}),
        ],
    )
    journal, written = await _resolve(tmp_path, DeviceFacts())  # changer did not answer
    try:
        assert _types(written) == ["credit", "recovery"]
        assert written[0].data["amount"] == 60 and written[1].data["resolution"] == "credit"
        assert customer_credit(await journal.counters()) == 100  # nothing assumed paid
        # Later the changer answers: 3 coins of 20 had gone out.
        (fix,) = await reconcile_devices(
            journal, DeviceFacts(tube_counts={2: 2}, coin_values=COIN_VALUES)
        )
        assert (fix.data["expected"], fix.data["found"], fix.data["amount"]) == (5, 2, -60)
    finally:
        await journal.close()


async def test_interrupted_manual_payout_gives_no_customer_credit(tmp_path: Path) -> None:
    await _crash_after(
        tmp_path,
        [
            ("cash_in", coin_in(50, 3)),
            ("payout_intent", {"intent_id": "p", "amount": 100, "reason": "manual"}),
        ],
    )
    journal, written = await _resolve(
        tmp_path, DeviceFacts(tube_counts={3: 0}, coin_values=COIN_VALUES)
    )
    try:
        assert _types(written) == ["cash_out", "recovery"]
        assert "operator payout" in written[-1].data["detail"]
    finally:
        await journal.close()


async def test_escrow_decisions_are_settled_by_the_stacker_count(tmp_path: Path) -> None:
    stack = {"bill_type": 1, "amount": 500, "decision": "stack"}
    await _crash_after(
        tmp_path,
        [
            ("cash_in", bill_in(500, 1)),  # one bill already in the stacker
            ("escrow_decision", {"intent_id": "e1", **stack}),
            ("escrow_decision", {"intent_id": "e2", **stack}),
        ],
    )
    # The stacker holds 2: one more than recorded, so e1 was stacked and e2 was not.
    journal, written = await _resolve(tmp_path, DeviceFacts(stacker_count=2))
    try:
        assert _types(written) == ["cash_in", "recovery", "escrow_returned", "recovery"]
        assert written[0].data == {**bill_in(500, 1), "intent_id": "e1"}
        assert [r.data["resolution"] for r in written if r.type == "recovery"] == [
            "stacked",
            "returned",
        ]
        assert (await journal.levels())["stacker.count"] == 2
        assert await reconcile_devices(journal, DeviceFacts(stacker_count=2)) == []
        assert customer_credit(await journal.counters()) == 1000  # the stacked bill is credit
    finally:
        await journal.close()


async def test_escrow_with_unknown_stacker_count_favours_the_customer(tmp_path: Path) -> None:
    await _crash_after(
        tmp_path,
        [
            (
                "escrow_decision",
                {"intent_id": "s", "bill_type": 2, "amount": 1000, "decision": "stack"},
            ),
            (
                "escrow_decision",
                {"intent_id": "r", "bill_type": 2, "amount": 1000, "decision": "return"},
            ),
        ],
    )
    journal, written = await _resolve(tmp_path, DeviceFacts())
    try:
        assert _types(written) == ["cash_in", "recovery", "escrow_returned", "recovery"]
        assert [r.data["resolution"] for r in written if r.type == "recovery"] == [
            "assumed_stacked",
            "assumed_returned",
        ]
        # Once the count is known, reconciliation records whatever the assumption got wrong.
        (fix,) = await reconcile_devices(journal, DeviceFacts(stacker_count=0))
        assert fix.data == {
            "device": "bill",
            "field": "stacker.count",
            "expected": 1,
            "found": 0,
            "amount": None,
        }
    finally:
        await journal.close()


async def test_reconcile_records_coins_taken_but_never_journaled(tmp_path: Path) -> None:
    # The changer ACKs a coin before we can journal it: a crash in that window leaves a coin in
    # the tube without a record. Start-up finds it as a surplus.
    await _crash_after(tmp_path, [("cash_in", coin_in(50, 3))])
    facts = DeviceFacts(tube_counts={3: 2, 1: 0}, coin_values=COIN_VALUES, stacker_count=4)
    journal = await Journal.open(tmp_path)
    try:
        fixes = await reconcile_devices(journal, facts)
        assert [f.data for f in fixes] == [
            {"device": "coin", "field": "tubes.3.count", "expected": 1, "found": 2, "amount": 50},
            {"device": "bill", "field": "stacker.count", "expected": 0, "found": 4, "amount": None},
        ]
        assert fixes[1].seq == fixes[0].seq + 1
        levels = await journal.levels()
        assert levels["tubes.3.count"] == 2 and levels["stacker.count"] == 4
        assert await reconcile_devices(journal, facts) == []
        counters = await journal.counters()
        assert counters["correction.surplus.value"] == 50 and counters["correction.count"] == 2
        assert await journal.verify_counters() == []
    finally:
        await journal.close()


async def test_stock_levels_follow_inventory_and_sales(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    try:
        await journal.append("inventory_changed", {"slot": "A1", "old": 0, "new": 10})
        await journal.append("inventory_changed", {"slot": "B2", "old": 0, "new": 3})
        await journal.append_many(
            [("vend_intent", vend_intent("v", "A1")), ("sale", sale("v", "A1"))]
        )
        assert stock_levels(await journal.levels()) == {"A1": 9, "B2": 3}
    finally:
        await journal.close()


# -- property: whatever was left open, recovery closes it and keeps every customer's money ----

INTENT_SCENARIO = st.lists(
    st.one_of(
        st.tuples(
            st.just("vend"),
            st.sampled_from(["cash", "card", "qr"]),
            st.integers(0, 400),
            st.sampled_from(["open", "sale", "failed"]),
        ),
        st.tuples(
            st.just("payout"),
            st.sampled_from(["change", "refund", "lever", "manual"]),
            st.integers(0, 300),
            st.integers(0, 3),
        ),  # partial cash_outs of 20 recorded
        st.tuples(
            st.just("escrow"),
            st.sampled_from(["stack", "return"]),
            st.integers(1, 5),
            st.booleans(),
        ),  # closed before the crash?
    ),
    max_size=6,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scenario=INTENT_SCENARIO,
    tube_drop=st.dictionaries(st.sampled_from([1, 2, 3]), st.integers(0, 4), max_size=3),
    stacker_extra=st.one_of(st.none(), st.integers(0, 3)),
)
def test_recovery_closes_everything_and_never_keeps_customer_money(
    scenario: list[tuple[Any, ...]], tube_drop: dict[int, int], stacker_extra: int | None
) -> None:
    state = Path(tempfile.mkdtemp(prefix="vmc-recovery-"))
    try:
        asyncio.run(_recovery_property(state, scenario, tube_drop, stacker_extra))
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def _recovery_property(
    state: Path,
    scenario: list[tuple[Any, ...]],
    tube_drop: dict[int, int],
    stacker_extra: int | None,
) -> None:
    items: list[tuple[str, dict[str, Any]]] = [("cash_in", coin_in(20, 2)) for _ in range(12)]
    items += [("cash_in", coin_in(50, 3)) for _ in range(6)]
    for n, (kind, a, b, c) in enumerate(scenario):
        intent_id = f"{kind}-{n}"
        if kind == "vend":
            items.append(("vend_intent", vend_intent(intent_id, "A1", b, a)))
            if c == "sale":
                items.append(("sale", sale(intent_id, "A1", b, a)))
            elif c == "failed":
                items.append(
                    ("vend_failed", {**vend_intent(intent_id, "A1", b, a), "reason": "jam"})
                )
        elif kind == "payout":
            items.append(("payout_intent", {"intent_id": intent_id, "amount": b, "reason": a}))
            for _ in range(min(c, b // 20)):
                items.append(
                    (
                        "cash_out",
                        {"intent_id": intent_id, "amount": 20, "reason": a, "coins": {"2": 1}},
                    )
                )
        else:
            items.append(
                (
                    "escrow_decision",
                    {"intent_id": intent_id, "bill_type": 1, "amount": b * 100, "decision": a},
                )
            )
            if c:
                items.append(("escrow_returned", {"intent_id": intent_id}))
    await _crash_after(state, items)
    journal = await Journal.open(state)
    try:
        before = await journal.counters()
        levels = await journal.levels()
        tubes = {
            t: max(levels.get(f"tubes.{t}.count", 0) - tube_drop.get(t, 0), 0) for t in (1, 2, 3)
        }
        stacker = None if stacker_extra is None else levels.get("stacker.count", 0) + stacker_extra
        facts = DeviceFacts(tube_counts=tubes, coin_values=COIN_VALUES, stacker_count=stacker)
        written = await resolve_open_intents(journal, facts)
        await reconcile_devices(journal, facts)
        assert await journal.open_intents() == []
        assert await journal.verify_counters() == []
        after = await journal.counters()
        # Every customer payout recovery found paid left the machine; everything else is still
        # the customer's credit. Bills found stacked add to it.
        paid = sum(
            r.data["amount"]
            for r in written
            if r.type == "cash_out" and r.data["reason"] != "manual"
        )
        stacked = sum(r.data["amount"] for r in written if r.type == "cash_in")
        assert customer_credit(after) == customer_credit(before) - paid + stacked
        # Never a second vend: each vend intent has exactly one outcome.
        for n, (kind, *_rest) in enumerate(scenario):
            if kind == "vend":
                outcomes = [
                    r.type
                    for r in await journal.records_for_intent(f"vend-{n}")
                    if r.type in ("sale", "vend_failed")
                ]
                assert len(outcomes) == 1
        assert await resolve_open_intents(journal, facts) == []
        assert await reconcile_devices(journal, facts) == []
    finally:
        await journal.close()
