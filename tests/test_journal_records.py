"""Record types, validation, intent rules and counter deltas (pure functions, no I/O)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_journal_support import FREE_RECORDS, VEND_CYCLES, coin_in, vend_intent
from vmc.journal.records import (
    RECORD_TYPES,
    IntentError,
    Record,
    RecordInvalid,
    check_intent_step,
    console_source,
    counter_deltas,
    format_ts,
    level_deltas,
    parse_ts,
    remote_source,
    validate,
    validate_source,
)


def _record(rtype: str, data: dict[str, Any], seq: int = 1) -> Record:
    return Record(
        seq,
        "id",
        "boot",
        "2026-11-22T22:40:00.000Z",
        0,
        rtype,
        validate(rtype, data),
        {"kind": "local"},
    )


def test_format_ts_is_the_contract_shape_and_round_trips() -> None:
    moment = datetime(2026, 11, 22, 22, 40, 0, 123456, tzinfo=UTC)
    assert format_ts(moment) == "2026-11-22T22:40:00.123Z"
    assert parse_ts(format_ts(moment)) == moment.replace(microsecond=123000)
    # Other offsets are converted to UTC.
    plus_two = moment.astimezone(timezone(timedelta(hours=2)))
    assert format_ts(plus_two) == "2026-11-22T22:40:00.123Z"
    with pytest.raises(ValueError):
        format_ts(datetime(2026, 1, 1))


@given(
    st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)
    ),
    st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)
    ),
)
def test_formatted_times_sort_like_times(a: datetime, b: datetime) -> None:
    # Retention compares ts as strings; that is only right if string order is time order.
    ta, tb = format_ts(a), format_ts(b)
    ma, mb = (
        a.replace(microsecond=a.microsecond // 1000 * 1000),
        b.replace(microsecond=b.microsecond // 1000 * 1000),
    )
    assert (ta < tb) == (ma < mb)


def test_unknown_type_and_unknown_field_are_refused() -> None:
    with pytest.raises(RecordInvalid, match="unknown record type"):
        validate("cash_inn", coin_in())
    with pytest.raises(RecordInvalid, match="amout"):
        validate("cash_in", {**coin_in(), "amout": 1})
    with pytest.raises(RecordInvalid, match=r"cash_in\.amount: missing"):
        validate("cash_in", {"device": "coin", "route": "tubes", "coin_type": 1})


@pytest.mark.parametrize(
    ("rtype", "data", "field"),
    [
        ("cash_in", {**coin_in(), "amount": -1}, "amount"),
        ("cash_in", {**coin_in(), "amount": True}, "amount"),
        ("cash_in", {**coin_in(), "amount": 1.5}, "amount"),
        ("cash_in", {**coin_in(), "coin_type": 16}, "coin_type"),
        ("cash_in", {**coin_in(), "route": "stacker"}, "route"),
        (
            "cash_in",
            {"amount": 5, "device": "bill", "route": "stacker", "coin_type": 1},
            "bill_type",
        ),
        ("vend_intent", {**vend_intent("x"), "slot": "A-1"}, "slot"),
        ("vend_intent", {**vend_intent("x"), "method": "bitcoin"}, "method"),
        ("vend_intent", {**vend_intent("x"), "intent_id": ""}, "intent_id"),
        ("cash_out", {"amount": 5, "reason": "change", "coins": {"x": 1}}, "coins"),
        ("cash_out", {"amount": 5, "reason": "change", "coins": {"3": -1}}, "coins.3"),
        ("refund", {"amount": 5, "method": "card", "reason": "r"}, ""),
        ("door", {"open": "yes"}, "open"),
        ("credit", {"amount": 5, "reason": "x" * 201}, "reason"),
    ],
)
def test_bad_data_names_the_field(rtype: str, data: dict[str, Any], field: str) -> None:
    with pytest.raises(RecordInvalid) as caught:
        validate(rtype, data)
    assert caught.value.record_type == rtype
    assert caught.value.field == field


def test_coins_keys_are_normalised_to_decimal_strings() -> None:
    data = validate("cash_out", {"amount": 70, "reason": "change", "coins": {5: 1, "2": 2, 7: 0}})
    assert data["coins"] == {"2": 2, "5": 1}
    with pytest.raises(RecordInvalid, match="given twice"):
        validate("cash_out", {"amount": 1, "reason": "change", "coins": {5: 1, "5": 1}})


def test_sources() -> None:
    assert validate_source({"kind": "local"}) == {"kind": "local"}
    assert validate_source(console_source("ann")) == {"kind": "console", "user": "ann"}
    assert validate_source(remote_source("c-1")) == {"kind": "remote", "cmd_id": "c-1"}
    for bad in (
        {"kind": "cloud"},
        {"kind": "console"},
        {"kind": "local", "user": "x"},
        {"kind": "remote", "cmd_id": ""},
    ):
        with pytest.raises(RecordInvalid):
            validate_source(bad)


@given(FREE_RECORDS)
def test_valid_data_survives_json_round_trip(item: tuple[str, dict[str, Any]]) -> None:
    rtype, data = item
    clean = validate(rtype, data)
    assert validate(rtype, json.loads(json.dumps(clean))) == clean


@given(st.one_of(FREE_RECORDS, VEND_CYCLES.map(lambda c: c[-1]), VEND_CYCLES.map(lambda c: c[0])))
def test_counter_deltas_never_negative(item: tuple[str, dict[str, Any]]) -> None:
    rtype, data = item
    deltas = counter_deltas(_record(rtype, data))
    assert all(value > 0 for value in deltas.values())


def test_counter_and_level_deltas_of_a_sale_and_cash() -> None:
    sale = _record(
        "sale",
        {"intent_id": "i", "slot": "A1", "price": 150, "method": "cash", "paid": 200, "change": 50},
    )
    assert counter_deltas(sale) == {
        "sales.count": 1,
        "sales.value": 150,
        "sales.slot.A1.count": 1,
        "sales.slot.A1.value": 150,
        "sales.method.cash.count": 1,
        "sales.method.cash.value": 150,
    }
    assert level_deltas(sale) == {"stock.A1.count": -1}
    coin = _record("cash_in", coin_in(100, 3))
    assert counter_deltas(coin)["cash_in.coin.tubes.value"] == 100
    assert level_deltas(coin) == {"tubes.3.count": 1}
    out = _record("cash_out", {"amount": 70, "reason": "change", "coins": {"3": 1, "1": 2}})
    assert counter_deltas(out) == {
        "cash_out.count": 1,
        "cash_out.value": 70,
        "cash_out.change.value": 70,
    }
    assert level_deltas(out) == {"tubes.1.count": -2, "tubes.3.count": -1}
    fix = _record(
        "correction",
        {"device": "coin", "field": "tubes.3.count", "expected": 10, "found": 7, "amount": -300},
    )
    assert level_deltas(fix) == {"tubes.3.count": -3}
    assert counter_deltas(fix) == {"correction.count": 1, "correction.shortfall.value": 300}
    other = _record(
        "correction",
        {"device": "x", "field": "odometer", "expected": 1, "found": 2, "amount": None},
    )
    assert level_deltas(other) == {}


def test_every_record_type_has_a_schema_and_known_deltas() -> None:
    assert {
        "boot",
        "cash_in",
        "cash_out",
        "payout_intent",
        "escrow_decision",
        "escrow_returned",
        "vend_intent",
        "sale",
        "vend_failed",
        "refund",
        "credit",
        "correction",
        "order",
        "price_changed",
        "inventory_changed",
        "slot_changed",
        "device",
        "door",
        "security",
        "recovery",
        "audit_read",
    } == set(RECORD_TYPES)


def test_intent_steps() -> None:
    open_: dict[str, str] = {}
    check_intent_step("vend_intent", vend_intent("v"), open_)
    assert open_ == {"v": "vend_intent"}
    with pytest.raises(IntentError, match="already open"):
        check_intent_step("vend_intent", vend_intent("v"), open_)
    with pytest.raises(IntentError, match="not closed by this"):
        check_intent_step("escrow_returned", {"intent_id": "v"}, open_)
    check_intent_step("sale", {"intent_id": "v"}, open_)
    assert open_ == {}
    with pytest.raises(IntentError, match="no open intent"):
        check_intent_step("vend_failed", {"intent_id": "v"}, open_)
    # A payout stays open through partial cash_outs and closes on the final one.
    check_intent_step("payout_intent", {"intent_id": "p"}, open_)
    check_intent_step("cash_out", {"intent_id": "p"}, open_)
    assert "p" in open_
    check_intent_step("cash_out", {"intent_id": "p", "final": True}, open_)
    assert open_ == {}
    # recovery closes whatever is open and tolerates a closed intent.
    check_intent_step("escrow_decision", {"intent_id": "e"}, open_)
    check_intent_step("recovery", {"intent_id": "e"}, open_)
    check_intent_step("recovery", {"intent_id": "e"}, open_)
    assert open_ == {}
    # Records without intent_id are not intent steps; a refund only refers to one.
    check_intent_step("cash_in", coin_in(), open_)
    check_intent_step("refund", {"intent_id": "gone"}, open_)
    assert open_ == {}
