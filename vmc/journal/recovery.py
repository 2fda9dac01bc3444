"""Start-up recovery: resolve intents left without an outcome, reconcile the devices' own
counters with what the journal says they should hold.

Run at start-up, after the devices have been read and before any money is taken:

    facts = DeviceFacts(tube_counts=..., coin_values=..., stacker_count=...)
    await resolve_open_intents(journal, facts)   # first: may record a stacked bill or coins paid
    await reconcile_devices(journal, facts)      # then: what is still different is a correction

The default policy (``docs/journal.md`` has the operator's version) never vends twice and never
silently keeps a customer's money:

- ``vend_intent`` paid in cash → ``vend_failed{reason: "interrupted"}`` + ``credit{price}``: the
  credit is offered again. The product may have dropped before the power went; the machine then
  loses one product, which is the side we choose to err on.
- ``vend_intent`` paid by card or QR → ``vend_failed`` + ``refund{amount: price}`` (with the
  order or session id, and the currency) for the backend or the reader to return the money: the
  same side as cash (the product may have fallen; the customer is not charged for it).
- a QR ``order`` created and never closed (the screen showed it when the machine stopped) →
  ``order{state: expired, reason: restart}`` (:func:`expire_open_orders`): after a restart no
  screen shows it, so a ``vend`` for it is refused (``order_expired``) and the backend refunds
  the wallet.
- ``payout_intent`` → what was paid is derived from the tube counts (the counts the intent
  carries, read with acceptance off before the first coin left, less the coins already recorded,
  less what the tubes hold now; for an intent without counts, the records' levels stand in; coins
  of the known values, never more than was still owed) and recorded as the final ``cash_out``; the
  rest is ``credit`` (not for an operator's manual payout). Tube counts unknown: ``credit`` for
  all of it; the next reconciliation records the difference as a ``correction``.
- ``escrow_decision`` → the stacker count tells whether the bill was stacked (``cash_in``) or
  not (``escrow_returned``). Count unknown: a ``stack`` decision is taken as stacked (the customer
  gets the credit), a ``return`` decision as returned.
Every resolution is one atomic ``append_many`` ending with a ``recovery`` record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vmc.journal.records import OPEN_ORDERS_LEVEL, STACKER_LEVEL, Record, tube_level_name
from vmc.journal.store import Journal

RecordSpec = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class DeviceFacts:
    """What the devices report at start-up. ``None`` means the device did not say (absent,
    offline, or a level without that command); the policy then falls back as documented."""

    tube_counts: Mapping[int, int] | None = None
    """coin type → coins in its tube (coin changer TUBE STATUS)."""
    coin_values: Mapping[int, int] | None = None
    """coin type → value in minor units (coin changer SETUP: credit × scaling)."""
    stacker_count: int | None = None
    """bills in the stacker (bill validator STACKER)."""


def customer_credit(counters: Mapping[str, int]) -> int:
    """The customer's credit the journal holds: money taken in, less cash sales, less what was
    paid back to customers (change, refunds, the return lever). Operator payouts (``manual``) are
    not customer money. ``credit`` records do not count: they state that part of this balance was
    offered again after a restart; the balance already holds it because no sale was recorded.
    Coins a technician put in to fill the tubes (``fill``) are not customer money either."""
    paid_back = sum(
        counters.get(f"cash_out.{reason}.value", 0) for reason in ("change", "refund", "lever")
    )
    taken = counters.get("cash_in.value", 0) - counters.get("cash_in.fill.value", 0)
    return taken - counters.get("sales.method.cash.value", 0) - paid_back


def stock_levels(levels: Mapping[str, int]) -> dict[str, int]:
    """slot id → products in the slot, as the records say (inventory changes less sales)."""
    stock = {}
    for name, value in levels.items():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "stock" and parts[2] == "count":
            stock[parts[1]] = value
    return stock


#: ``vend_failed.reason`` of a vend whose outcome is not known (a crash, a motor board that
#: stopped answering after RUN): the product may have fallen; the customer is refunded.
VEND_INTERRUPTED = "interrupted"


def _vend(intent: Record, currency: str | None) -> tuple[list[RecordSpec], str]:
    data = intent.data
    failed: dict[str, Any] = {
        "intent_id": data["intent_id"],
        "slot": data["slot"],
        "price": data["price"],
        "method": data["method"],
        "reason": VEND_INTERRUPTED,
    }
    for key in ("order_id", "session_id"):
        if key in data:
            failed[key] = data[key]
    if data["method"] == "cash":
        credit = {"amount": data["price"], "reason": "vend interrupted; credit offered again"}
        return [("vend_failed", failed), ("credit", credit)], "credit"
    refund: dict[str, Any] = {
        "intent_id": data["intent_id"],
        "amount": data["price"],
        "method": data["method"],
        "reason": "vend interrupted",
    }
    if currency is not None:
        refund["currency"] = currency
    for key in ("order_id", "session_id"):
        if key in data:
            refund[key] = data[key]
    return [("vend_failed", failed), ("refund", refund)], "refund"


def _choose_coins(
    owed: int, tube_drop: Mapping[int, int], coin_values: Mapping[int, int]
) -> dict[int, int]:
    """Coins that left the tubes, attributed to this payout: largest values first, never more
    than ``owed`` (a larger drop is left for reconciliation to record as a correction)."""
    chosen: dict[int, int] = {}
    left = owed
    for coin_type in sorted(tube_drop, key=lambda t: (-coin_values.get(t, 0), t)):
        value = coin_values.get(coin_type, 0)
        if value <= 0 or left <= 0:
            continue
        count = min(tube_drop[coin_type], left // value)
        if count > 0:
            chosen[coin_type] = count
            left -= count * value
    return chosen


async def _payout(
    journal: Journal, intent: Record, facts: DeviceFacts, tubes: dict[int, int]
) -> tuple[list[RecordSpec], str, str]:
    data = intent.data
    intent_id, reason = data["intent_id"], data["reason"]
    cash_outs = [r for r in await journal.records_for_intent(intent_id) if r.type == "cash_out"]
    already = sum(r.data["amount"] for r in cash_outs)
    owed = max(data["amount"] - already, 0)
    specs: list[RecordSpec] = []
    paid = 0
    if facts.tube_counts is not None and facts.coin_values is not None:
        found = facts.tube_counts
        if "tubes" in data:
            # Counts read with acceptance off just before the first coin left: what is missing
            # now, less what was recorded, left for this payout (no coin could come in).
            recorded: dict[int, int] = {}
            for r in cash_outs:
                for t, n in r.data["coins"].items():
                    recorded[int(t)] = recorded.get(int(t), 0) + n
            drop = {
                int(t): before - recorded.get(int(t), 0) - found.get(int(t), 0)
                for t, before in data["tubes"].items()
            }
        else:  # an intent written before the counts were kept: the records' levels
            drop = {t: expected - found.get(t, 0) for t, expected in tubes.items()}
        drop = {t: n for t, n in drop.items() if n > 0}
        coins = _choose_coins(owed, drop, facts.coin_values)
        paid = sum(n * facts.coin_values[t] for t, n in coins.items())
        for t, n in coins.items():
            tubes[t] = tubes.get(t, 0) - n  # the next payout intent must not claim the same coins
        if paid:
            specs.append(
                (
                    "cash_out",
                    {
                        "amount": paid,
                        "reason": reason,
                        "intent_id": intent_id,
                        "coins": {str(t): n for t, n in sorted(coins.items())},
                        "final": True,
                    },
                )
            )
        how = "paid_from_tube_counts"
        detail = f"tube counts show {paid} of {owed} still owed was paid"
    else:
        how = "credit"
        detail = f"tube counts or coin values unknown; {owed} still owed"
    rest = owed - paid
    if rest > 0 and reason != "manual":
        specs.append(("credit", {"amount": rest, "reason": f"{reason} payout interrupted"}))
        detail += f"; {rest} offered as credit"
    elif rest > 0:
        detail += f"; {rest} of an operator payout not paid"
    return specs, how, detail


def _escrow(intent: Record, stacker_surplus: int | None) -> tuple[list[RecordSpec], str, str, bool]:
    """(records, resolution, detail, consumed one bill of the surplus)."""
    data = intent.data
    stacked_record: RecordSpec = (
        "cash_in",
        {
            "amount": data["amount"],
            "device": "bill",
            "route": "stacker",
            "bill_type": data["bill_type"],
            "intent_id": data["intent_id"],
        },
    )
    returned_record: RecordSpec = ("escrow_returned", {"intent_id": data["intent_id"]})
    if stacker_surplus is None:
        if data["decision"] == "stack":
            return [stacked_record], "assumed_stacked", "stacker count unknown", False
        return [returned_record], "assumed_returned", "stacker count unknown", False
    if stacker_surplus > 0:
        return [stacked_record], "stacked", "stacker holds one more bill than recorded", True
    return [returned_record], "returned", "stacker count shows no unrecorded bill", False


async def resolve_open_intents(
    journal: Journal, facts: DeviceFacts, *, currency: str | None = None
) -> list[Record]:
    """Resolve every intent without an outcome by the default policy (module docstring), oldest
    first; returns the records written (``currency``: the machine's, named on refunds). Run
    before :func:`reconcile_devices`."""
    intents = await journal.open_intents()
    if not intents:
        return []
    levels = await journal.levels()
    tubes: dict[int, int] = {}
    for name, value in levels.items():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "tubes" and parts[2] == "count":
            tubes[int(parts[1])] = value
    if facts.tube_counts is not None:
        for coin_type in facts.tube_counts:
            tubes.setdefault(coin_type, 0)
    surplus = (
        None if facts.stacker_count is None else facts.stacker_count - levels.get(STACKER_LEVEL, 0)
    )
    written: list[Record] = []
    for intent in intents:
        intent_id = intent.data["intent_id"]
        if intent.type == "vend_intent":
            specs, how = _vend(intent, currency)
            detail = f"vend of slot {intent.data['slot']} interrupted; not vended again"
        elif intent.type == "payout_intent":
            specs, how, detail = await _payout(journal, intent, facts, tubes)
        else:
            specs, how, detail, consumed = _escrow(intent, surplus)
            if consumed and surplus is not None:
                surplus -= 1
        specs.append(("recovery", {"intent_id": intent_id, "resolution": how, "detail": detail}))
        written.extend(await journal.append_many(specs))
    return written


async def reconcile_devices(journal: Journal, facts: DeviceFacts) -> list[Record]:
    """Compare the tube and stacker levels the records imply with the devices' own counts and
    append one ``correction`` per difference (atomically); returns them. The levels then match
    the devices. Coins the changer took but that were never journaled (a crash right after the
    bus ACK) show up here as a surplus."""
    levels = await journal.levels()
    corrections: list[RecordSpec] = []
    values = facts.coin_values or {}
    for coin_type, found in sorted((facts.tube_counts or {}).items()):
        name = tube_level_name(coin_type)
        expected = levels.get(name, 0)
        if found != expected:
            value = values.get(coin_type)
            corrections.append(
                (
                    "correction",
                    {
                        "device": "coin",
                        "field": name,
                        "expected": expected,
                        "found": found,
                        "amount": None if value is None else (found - expected) * value,
                    },
                )
            )
    if facts.stacker_count is not None:
        expected = levels.get(STACKER_LEVEL, 0)
        if facts.stacker_count != expected:
            corrections.append(
                (
                    "correction",
                    {
                        "device": "bill",
                        "field": STACKER_LEVEL,
                        "expected": expected,
                        "found": facts.stacker_count,
                        "amount": None,  # the stacker count does not say which bills
                    },
                )
            )
    return await journal.append_many(corrections)


#: Records read per step when :func:`expire_open_orders` looks back for open orders.
ORDER_SCAN_CHUNK = 500


async def expire_open_orders(journal: Journal) -> list[Record]:
    """Start-up: journal every QR order still open (created, never cancelled, expired or
    vended; the level ``orders.open.count``) as ``expired`` with reason ``restart``, in one
    transaction; returns the records. Nothing is read when the level is 0 (the usual start);
    otherwise the journal is read backwards until every open order is found."""
    wanted = (await journal.levels()).get(OPEN_ORDERS_LEVEL, 0)
    if wanted <= 0:
        return []
    closed: set[str] = set()
    found: list[dict[str, Any]] = []
    high = journal.last_seq
    while high >= 1 and len(found) < wanted:
        low = max(1, high - ORDER_SCAN_CHUNK + 1)
        chunk = await journal.records(since_seq=low, limit=high - low + 1)
        for record in reversed(chunk):
            data = record.data
            order_id = data.get("order_id")
            if not isinstance(order_id, str):
                continue
            if record.type == "order" and data["state"] == "created":
                if order_id not in closed:
                    found.append(data)
                    closed.add(order_id)
            elif record.type in ("order", "sale", "vend_failed"):
                closed.add(order_id)
        high = low - 1
    specs: list[RecordSpec] = [
        (
            "order",
            {
                "order_id": data["order_id"],
                "slot": data["slot"],
                "price": data["price"],
                "state": "expired",
                "reason": "restart",
            },
        )
        for data in reversed(found[:wanted])
    ]
    return await journal.append_many(specs)
