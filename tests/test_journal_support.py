"""Shared helpers for the journal tests: a controllable clock, valid record data, strategies.

(Named test_journal_* so it belongs with the journal tests; it holds no tests itself.)
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


class FakeClock:
    """Wall and monotonic time under the test's control; the wall clock may jump either way."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 22, 22, 40, tzinfo=UTC)
        self.mono = 1_000_000_000

    def wall(self) -> datetime:
        return self.now

    def monotonic_ns(self) -> int:
        self.mono += 1_000  # strictly increasing, as the real one is between appends
        return self.mono

    def advance(self, **delta: float) -> None:
        step = timedelta(**delta)
        self.now += step
        self.mono += int(step.total_seconds() * 1e9) if step > timedelta(0) else 0


def subprocess_env() -> dict[str, str]:
    """Environment for a child Python that imports the project from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def coin_in(amount: int = 100, coin_type: int = 3, route: str = "tubes") -> dict[str, Any]:
    return {"amount": amount, "device": "coin", "route": route, "coin_type": coin_type}


def bill_in(amount: int = 500, bill_type: int = 1, **extra: Any) -> dict[str, Any]:
    return {"amount": amount, "device": "bill", "route": "stacker", "bill_type": bill_type, **extra}


def vend_intent(
    intent_id: str, slot: str = "A1", price: int = 150, method: str = "cash"
) -> dict[str, Any]:
    return {"intent_id": intent_id, "slot": slot, "price": price, "method": method}


def sale(
    intent_id: str, slot: str = "A1", price: int = 150, method: str = "cash"
) -> dict[str, Any]:
    return {
        "intent_id": intent_id,
        "slot": slot,
        "price": price,
        "method": method,
        "paid": price,
    }


# -- hypothesis strategies for valid data of the record types that need no intent -----------

money = st.integers(0, 100_000)
slots = st.sampled_from(["A1", "A2", "B7", "C10"])
ids = st.uuids().map(lambda u: u.hex)
texts = st.text(max_size=40)
coin_types = st.integers(0, 15)

FREE_RECORDS = st.one_of(
    st.builds(
        lambda a, t, r: ("cash_in", coin_in(a, t, r)),
        money,
        coin_types,
        st.sampled_from(["tubes", "cashbox"]),
    ),
    st.builds(lambda a, t: ("cash_in", bill_in(a, t)), money, coin_types),
    st.builds(
        lambda a, r, c: ("cash_out", {"amount": a, "reason": r, "coins": c}),
        money,
        st.sampled_from(["change", "refund", "manual", "lever"]),
        st.dictionaries(coin_types, st.integers(0, 20), max_size=3),
    ),
    st.builds(
        lambda o, a, m, r: ("refund", {"order_id": o, "amount": a, "method": m, "reason": r}),
        ids,
        money,
        st.sampled_from(["cash", "card", "qr"]),
        texts,
    ),
    st.builds(lambda a, r: ("credit", {"amount": a, "reason": r}), money, texts),
    st.builds(
        lambda d, f, e, n, a: (
            "correction",
            {"device": d, "field": f, "expected": e, "found": n, "amount": a},
        ),
        st.sampled_from(["coin", "bill"]),
        st.sampled_from(["tubes.3.count", "stacker.count", "tubes.0.count", "other"]),
        st.integers(0, 500),
        st.integers(0, 500),
        st.one_of(st.none(), st.integers(-9999, 9999)),
    ),
    st.builds(
        lambda o, s, p, state: ("order", {"order_id": o, "slot": s, "price": p, "state": state}),
        ids,
        slots,
        money,
        st.sampled_from(["created", "cancelled", "expired"]),
    ),
    st.builds(
        lambda s, o, n: ("price_changed", {"slot": s, "old": o, "new": n}), slots, money, money
    ),
    st.builds(
        lambda s, o, n: ("inventory_changed", {"slot": s, "old": o, "new": n}),
        slots,
        st.integers(0, 50),
        st.integers(0, 50),
    ),
    st.builds(lambda s, e: ("slot_changed", {"slot": s, "enabled": e}), slots, st.booleans()),
    st.builds(
        lambda d, s, t: ("device", {"device": d, "state": s, "detail": t}),
        st.sampled_from(["coin", "bill", "cashless", "motor"]),
        st.sampled_from(["online", "offline", "fault", "recovered"]),
        texts,
    ),
    st.builds(lambda o: ("door", {"open": o}), st.booleans()),
    st.builds(lambda w, d: ("security", {"what": w, "detail": d}), texts, texts),
)


def vend_cycle(
    intent_id: str, slot: str, price: int, method: str, ok: bool
) -> list[tuple[str, dict[str, Any]]]:
    """A complete vend: intent, then sale or vend_failed."""
    items: list[tuple[str, dict[str, Any]]] = [
        ("vend_intent", vend_intent(intent_id, slot, price, method))
    ]
    if ok:
        items.append(("sale", sale(intent_id, slot, price, method)))
    else:
        items.append(
            ("vend_failed", {**vend_intent(intent_id, slot, price, method), "reason": "no drop"})
        )
    return items


VEND_CYCLES = st.builds(
    vend_cycle, ids, slots, money, st.sampled_from(["cash", "card", "qr"]), st.booleans()
)
