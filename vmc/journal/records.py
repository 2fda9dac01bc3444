"""Journal record types: what each record's ``data`` holds, how it is checked, and what it adds
to the lifetime counters and device levels.

Everything here is pure (no I/O), so the writer thread, recovery, reports and the tests all share
one definition. The wire shape of a record is the one in ``shared/contracts/cloud-mqtt.md``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, Literal

from vmc.errors import VmcError

# --------------------------------------------------------------------------------------------
# Errors


class JournalError(VmcError):
    """Root of every error raised by the transaction journal."""


class JournalUnavailable(JournalError):
    """The journal cannot make a record durable right now (free-space reserve reached, disk full,
    read-only or failing storage). Nothing of the failed write is kept; retrying later may work.
    The machine must not take money while this is the case (see ``Journal.on_health``)."""


class JournalCorrupt(JournalError):
    """The database failed its integrity check at start; it was moved aside, never overwritten."""

    def __init__(self, message: str, kept: tuple[str, ...]) -> None:
        super().__init__(message)
        self.kept = kept


class JournalClosed(JournalError):
    """The journal was closed (or its writer thread stopped); nothing more can be written."""


class SchemaTooNew(JournalError):
    """The database carries migrations this version of vmc does not know (a downgrade)."""


class RecordInvalid(JournalError):
    """A record of an unknown type, or whose data does not match its type."""

    def __init__(self, record_type: str, field: str, problem: str) -> None:
        where = f"{record_type}.{field}" if field else record_type
        super().__init__(f"invalid journal record {where}: {problem}")
        self.record_type = record_type
        self.field = field
        self.problem = problem


class IntentError(RecordInvalid):
    """An outcome for an intent that is not open, or an intent id used twice."""


# --------------------------------------------------------------------------------------------
# Sources


Source = Mapping[str, str]
"""Who caused a record: ``{"kind": "local"}``, ``{"kind": "console", "user": ...}``,
``{"kind": "remote", "cmd_id": ...}`` or ``{"kind": "config"}`` (an edited configuration file
applied at start, vmc/planogram.py) (contract: each record names its source)."""

LOCAL: Final[Source] = MappingProxyType({"kind": "local"})
CONFIG: Final[Source] = MappingProxyType({"kind": "config"})


def console_source(user: str) -> Source:
    """Source of a record caused by a person at the machine's console."""
    return MappingProxyType({"kind": "console", "user": user})


def remote_source(cmd_id: str) -> Source:
    """Source of a record caused by a signed cloud command."""
    return MappingProxyType({"kind": "remote", "cmd_id": cmd_id})


_SOURCE_FIELDS: Final[dict[str, str | None]] = {
    "local": None,
    "console": "user",
    "remote": "cmd_id",
    "config": None,
}


def validate_source(source: Mapping[str, object]) -> dict[str, str]:
    """Check a source and return it as a plain dict."""
    kind = source.get("kind")
    if not isinstance(kind, str) or kind not in _SOURCE_FIELDS:
        raise RecordInvalid(
            "source", "kind", f"expected local, console, remote or config, found {kind!r}"
        )
    extra = _SOURCE_FIELDS[kind]
    allowed = {"kind"} if extra is None else {"kind", extra}
    unknown = set(source) - allowed
    if unknown:
        raise RecordInvalid("source", sorted(unknown)[0], f"not a field of a {kind} source")
    result = {"kind": kind}
    if extra is not None:
        value = source.get(extra)
        if not isinstance(value, str) or not 0 < len(value) <= 128:
            raise RecordInvalid("source", extra, "expected a string of 1 to 128 characters")
        result[extra] = value
    return result


# --------------------------------------------------------------------------------------------
# The record


def format_ts(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds, as the contract spells times: ``2026-11-22T22:40:00.123Z``.

    Strings in this shape sort in time order, which the retention query relies on.
    """
    if moment.tzinfo is None:
        raise ValueError("journal times must be timezone-aware")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_ts(text: str) -> datetime:
    """Inverse of :func:`format_ts`."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class Record:
    """One durable journal record. ``seq`` orders records (never the wall-clock ``ts``, which may
    jump); ``mono_ns`` is ``time.monotonic_ns()`` at the append, meaningful within one ``boot_id``.
    """

    seq: int
    id: str
    boot_id: str
    ts: str
    mono_ns: int
    type: str
    data: dict[str, Any]
    source: dict[str, str]

    def to_wire(self) -> dict[str, Any]:
        """The contract's JSON shape of a record (``mono_ns`` is local and not sent)."""
        return {
            "seq": self.seq,
            "id": self.id,
            "boot_id": self.boot_id,
            "ts": self.ts,
            "type": self.type,
            "data": self.data,
            "source": self.source,
        }

    @property
    def intent_id(self) -> str | None:
        """The intent this record opens, advances, closes or refers to, if any."""
        value = self.data.get("intent_id")
        return value if isinstance(value, str) else None


def encode_json(value: Mapping[str, Any]) -> str:
    """Compact JSON as stored in the database and exported."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# --------------------------------------------------------------------------------------------
# Data validation: one table row per record type, built from small field checkers.

FieldCheck = Callable[[str, str, object], object]
"""(record type, field name, value) -> normalised value, or raises RecordInvalid."""

MAX_MONEY: Final = 100_000_000  # minor units; far above any vending amount, catches unit bugs
MAX_COUNT: Final = 1_000_000
MAX_TEXT: Final = 200
SLOT_RE: Final = re.compile(r"[A-Za-z0-9]{1,8}")  # same rule as the configuration's slot ids
ID_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _int_in(low: int, high: int) -> FieldCheck:
    def check(rtype: str, name: str, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise RecordInvalid(rtype, name, f"expected an integer {low}..{high}, found {value!r}")
        return value

    return check


_money = _int_in(0, MAX_MONEY)
_count = _int_in(0, MAX_COUNT)
_signed_money = _int_in(-MAX_MONEY, MAX_MONEY)
_signed_count = _int_in(-MAX_COUNT, MAX_COUNT)
_device_type = _int_in(0, 15)  # MDB coin and bill types are 0..15


def _text(rtype: str, name: str, value: object) -> object:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise RecordInvalid(rtype, name, f"expected a string of at most {MAX_TEXT} characters")
    return value


def _pattern(regex: re.Pattern[str], what: str) -> FieldCheck:
    def check(rtype: str, name: str, value: object) -> object:
        if not isinstance(value, str) or regex.fullmatch(value) is None:
            raise RecordInvalid(rtype, name, f"expected {what}, found {value!r}")
        return value

    return check


_slot = _pattern(SLOT_RE, "a slot id of 1 to 8 letters or digits")
_ident = _pattern(ID_RE, "an id of 1 to 64 characters [A-Za-z0-9_.:-]")
_currency = _pattern(re.compile(r"[A-Z]{3}"), "an ISO 4217 currency code")
_time = _pattern(re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z"), "an RFC 3339 UTC time")
#: The QR text of an order (its URL template allows 2000 characters, and the values it holds).
MAX_QR_TEXT: Final = 4000


#: Counter names as counter_deltas makes them (an audit_read names every counter).
COUNTER_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,120}")
MAX_COUNTER_NAMES: Final = 10_000
MAX_COUNTER_VALUE: Final = 2**53  # lifetime sums stay exact in the backend's JSON numbers
#: An audit_read must fit a cloud message (64 KiB) with room to spare: about 800 counters.
MAX_COUNTER_MAP_BYTES: Final = 32 * 1024


def _counter_map(rtype: str, name: str, value: object) -> object:
    if not isinstance(value, Mapping) or len(value) > MAX_COUNTER_NAMES:
        raise RecordInvalid(
            rtype, name, f"expected an object of at most {MAX_COUNTER_NAMES} counters"
        )
    result: dict[str, int] = {}
    for key, number in value.items():
        if not isinstance(key, str) or COUNTER_NAME_RE.fullmatch(key) is None:
            raise RecordInvalid(rtype, name, f"expected counter names, found {key!r}")
        if isinstance(number, bool) or not isinstance(number, int):
            raise RecordInvalid(rtype, name, f"{key}: expected an integer, found {number!r}")
        if not 0 <= number <= MAX_COUNTER_VALUE:
            raise RecordInvalid(
                rtype, name, f"{key}: expected 0..{MAX_COUNTER_VALUE}, found {number}"
            )
        result[key] = number
    if len(encode_json(result)) > MAX_COUNTER_MAP_BYTES:
        raise RecordInvalid(rtype, name, f"more than {MAX_COUNTER_MAP_BYTES} bytes of counters")
    return result


def _qr_text(rtype: str, name: str, value: object) -> object:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_QR_TEXT:
        raise RecordInvalid(rtype, name, f"expected a string of 1 to {MAX_QR_TEXT} characters")
    return value


def _one_of(*choices: str) -> FieldCheck:
    def check(rtype: str, name: str, value: object) -> object:
        if not isinstance(value, str) or value not in choices:
            raise RecordInvalid(
                rtype, name, f"expected one of {'|'.join(choices)}, found {value!r}"
            )
        return value

    return check


def _boolean(rtype: str, name: str, value: object) -> object:
    if not isinstance(value, bool):
        raise RecordInvalid(rtype, name, f"expected true or false, found {value!r}")
    return value


def _optional(check: FieldCheck) -> FieldCheck:
    """A field that may be JSON null (an unknown value, such as the worth of stacked bills)."""

    def inner(rtype: str, name: str, value: object) -> object:
        return None if value is None else check(rtype, name, value)

    return inner


def _coins(rtype: str, name: str, value: object) -> object:
    """``{coin_type: count}``; keys become decimal strings, as they are in JSON anyway."""
    if not isinstance(value, Mapping):
        raise RecordInvalid(rtype, name, "expected an object {coin type: count}")
    result: dict[str, int] = {}
    for key, count in value.items():
        try:
            coin_type = int(key)
        except (TypeError, ValueError):
            raise RecordInvalid(rtype, name, f"coin type {key!r} is not an integer") from None
        _device_type(rtype, f"{name}.{key}", coin_type)
        _count(rtype, f"{name}.{key}", count)
        if str(coin_type) in result:
            raise RecordInvalid(rtype, name, f"coin type {coin_type} given twice")
        if count:
            result[str(coin_type)] = count
    return dict(sorted(result.items(), key=lambda item: int(item[0])))


METHODS: Final = ("cash", "card", "qr")
PAYOUT_REASONS: Final = ("change", "refund", "manual", "lever")

# (checker, required)
_Spec = dict[str, tuple[FieldCheck, bool]]

SCHEMAS: Final[dict[str, _Spec]] = {
    "boot": {"version": (_text, True)},
    "cash_in": {
        "amount": (_money, True),
        "device": (_one_of("coin", "bill"), True),
        "route": (_one_of("tubes", "cashbox", "stacker"), True),
        "coin_type": (_device_type, False),
        "bill_type": (_device_type, False),
        "intent_id": (_ident, False),
        # A coin a technician put in to fill the tubes (the console's fill mode): in the tubes
        # or the cashbox like any coin, but not the customer's credit (``cash_in.fill.value``).
        "fill": (_boolean, False),
    },
    "cash_out": {
        "amount": (_money, True),
        "reason": (_one_of(*PAYOUT_REASONS), True),
        "coins": (_coins, True),
        "intent_id": (_ident, False),
        "final": (_boolean, False),
    },
    "payout_intent": {
        "intent_id": (_ident, True),
        "amount": (_money, True),
        "reason": (_one_of(*PAYOUT_REASONS), True),
        # The tube counts read after coin acceptance was switched off and before the first
        # coin left: recovery measures the payout against them (module recovery.py).
        "tubes": (_coins, False),
    },
    "escrow_decision": {
        "intent_id": (_ident, True),
        "bill_type": (_device_type, True),
        "amount": (_money, True),
        "decision": (_one_of("stack", "return"), True),
    },
    "escrow_returned": {"intent_id": (_ident, True)},
    "vend_intent": {
        "intent_id": (_ident, True),
        "slot": (_slot, True),
        "price": (_money, True),
        "method": (_one_of(*METHODS), True),
        "order_id": (_ident, False),
        "session_id": (_ident, False),
    },
    "sale": {
        "intent_id": (_ident, True),
        "slot": (_slot, True),
        "price": (_money, True),
        "method": (_one_of(*METHODS), True),
        "paid": (_money, True),
        "change": (_money, False),
        "order_id": (_ident, False),
    },
    "vend_failed": {
        "intent_id": (_ident, True),
        "slot": (_slot, True),
        "price": (_money, True),
        "method": (_one_of(*METHODS), True),
        "reason": (_text, True),
        # With reason "interrupted" when the board failed after RUN: what failed.
        "detail": (_text, False),
        "order_id": (_ident, False),
        "session_id": (_ident, False),
    },
    # Money owed back to a wallet (QR) or a card: the backend (or the reader) returns it.
    "refund": {
        "intent_id": (_ident, False),
        "order_id": (_ident, False),
        "session_id": (_ident, False),
        "amount": (_money, True),
        "currency": (_currency, False),
        "method": (_one_of(*METHODS), True),
        "reason": (_text, True),
    },
    "credit": {"amount": (_money, True), "reason": (_text, True)},
    "correction": {
        "device": (_text, True),
        "field": (_text, True),
        "expected": (_signed_count, True),
        "found": (_signed_count, True),
        "amount": (_optional(_signed_money), True),
    },
    # A QR order (vmc/payments/qr.py): ``created`` carries what the ``orders`` topic carries
    # (so the journal syncs it durably) and its origin; ``cancelled`` and ``expired`` the
    # reason. An order is closed by exactly one of: ``cancelled``, ``expired``, or the ``sale``
    # or ``vend_failed`` naming its ``order_id`` (the level ``orders.open.count``).
    "order": {
        "order_id": (_ident, True),
        "slot": (_slot, True),
        "price": (_money, True),
        "state": (_one_of("created", "cancelled", "expired"), True),
        "currency": (_currency, False),
        "origin": (_one_of("machine", "remote"), False),
        "qr": (_qr_text, False),
        "expires_at": (_time, False),
        "reason": (_text, False),
    },
    "price_changed": {"slot": (_slot, True), "old": (_money, True), "new": (_money, True)},
    "inventory_changed": {"slot": (_slot, True), "old": (_count, True), "new": (_count, True)},
    # ``old``: the planogram's enabled flag before (present on every planogram change, which a
    # restart keeps: vmc/planogram.py); absent on a lane the machine took out of sale by itself
    # (``reason``: a jammed or missing motor), which a restart puts back. ``capacity``: the
    # lane's capacity, when the configuration file changed it.
    "slot_changed": {
        "slot": (_slot, True),
        "enabled": (_boolean, True),
        "old": (_boolean, False),
        "capacity": (_int_in(1, MAX_COUNT), False),
        "reason": (_text, False),
    },
    # A device that came up names itself (its MDB identity, for the audit report's CA1, BA1,
    # DA1) and a changer its coin values (CA17); both optional.
    "device": {
        "device": (_text, True),
        "state": (_one_of("online", "offline", "fault", "recovered"), True),
        "detail": (_text, True),
        "manufacturer": (_text, False),
        "serial": (_text, False),
        "model": (_text, False),
        "version": (_count, False),
        "level": (_count, False),
        "coin_values": (_coins, False),
    },
    "door": {"open": (_boolean, True)},
    # A rejected cloud command names its result's error code and, when it could be read, its
    # cmd_id (vmc/cloud/commands.py).
    "security": {
        "what": (_text, True),
        "detail": (_text, True),
        "code": (_text, False),
        "cmd_id": (_ident, False),
    },
    "recovery": {"intent_id": (_ident, True), "resolution": (_text, True), "detail": (_text, True)},
    # A technician emptied the bill stacker (the console's ``bills empty``): ``count`` bills
    # worth ``value`` left the machine (the journal's own count and value since the last
    # emptying); ``device_count`` is what the validator's STACKER said, when it answered.
    "cash_removed": {
        "device": (_one_of("bill"), True),
        "count": (_count, True),
        "value": (_money, True),
        "device_count": (_optional(_count), False),
    },
    # A motor test from the console (no money): the slot, what the motor board reported, and
    # whether a product dropped (then an ``inventory_changed`` record takes it off the stock).
    "motor_test": {
        "slot": (_slot, True),
        "outcome": (_text, True),
        "dropped": (_boolean, True),
        "detail": (_text, False),
    },
    # An EVA-DTS audit read with reset (vmc/dex/): ``interim`` holds every counter's value
    # since the previous reset as this read reported it; it moves into the ``audit.<counter>``
    # levels, so the next interim starts anew. ``via``: who read (cli, console, cloud, dex_port).
    "audit_read": {"interim": (_counter_map, True), "via": (_text, True)},
}

RECORD_TYPES: Final = frozenset(SCHEMAS)


def _check_cash_in(data: dict[str, Any]) -> None:
    if data["device"] == "coin":
        if "coin_type" not in data or "bill_type" in data:
            raise RecordInvalid("cash_in", "coin_type", "a coin needs coin_type (and no bill_type)")
        if data["route"] not in ("tubes", "cashbox"):
            raise RecordInvalid("cash_in", "route", "a coin goes to the tubes or the cashbox")
    else:
        if "bill_type" not in data or "coin_type" in data:
            raise RecordInvalid("cash_in", "bill_type", "a bill needs bill_type (and no coin_type)")
        if data["route"] not in ("stacker", "cashbox"):
            raise RecordInvalid("cash_in", "route", "a bill goes to the stacker or the cashbox")


def _check_refund(data: dict[str, Any]) -> None:
    if not any(key in data for key in ("intent_id", "order_id", "session_id")):
        raise RecordInvalid("refund", "", "name the intent_id, order_id or session_id refunded")


_CROSS_CHECKS: Final[dict[str, Callable[[dict[str, Any]], None]]] = {
    "cash_in": _check_cash_in,
    "refund": _check_refund,
}


def validate(record_type: str, data: Mapping[str, object]) -> dict[str, Any]:
    """Check ``data`` against the schema of ``record_type`` and return a normalised copy.

    Unknown types and unknown fields are refused: a typo must fail at the first append, not turn
    up months later as a record the backend cannot read.
    """
    spec = SCHEMAS.get(record_type)
    if spec is None:
        raise RecordInvalid(record_type, "", "unknown record type")
    if not isinstance(data, Mapping):
        raise RecordInvalid(record_type, "", "data must be an object")
    unknown = [key for key in data if key not in spec]
    if unknown:
        raise RecordInvalid(record_type, str(unknown[0]), "not a field of this record type")
    result: dict[str, Any] = {}
    for name, (check, required) in spec.items():
        if name in data:
            result[name] = check(record_type, name, data[name])
        elif required:
            raise RecordInvalid(record_type, name, "missing")
    cross = _CROSS_CHECKS.get(record_type)
    if cross is not None:
        cross(result)
    return result


# --------------------------------------------------------------------------------------------
# Intents: which records open, advance and close them.

INTENT_TYPES: Final = frozenset({"vend_intent", "payout_intent", "escrow_decision"})

OUTCOME_TYPES: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "vend_intent": frozenset({"sale", "vend_failed"}),
        "payout_intent": frozenset({"cash_out"}),
        "escrow_decision": frozenset({"cash_in", "escrow_returned"}),
    }
)

IntentRole = Literal["open", "advance", "close", "resolve"]


def intent_role(record_type: str, data: Mapping[str, Any]) -> IntentRole | None:
    """What a record does to the intent named by its ``intent_id``.

    - ``open``: the record is an intent (vend_intent, payout_intent, escrow_decision).
    - ``advance``: a partial ``cash_out`` of a payout; the payout stays open.
    - ``close``: the outcome (sale, vend_failed, escrow_returned, a stacked bill's cash_in, the
      payout's ``cash_out`` with ``final: true``).
    - ``resolve``: a ``recovery`` record; closes the intent if it is still open.
    A ``refund`` only refers to an intent (usually one just closed by ``vend_failed``).
    """
    if "intent_id" not in data:
        return None
    if record_type in INTENT_TYPES:
        return "open"
    if record_type == "recovery":
        return "resolve"
    if record_type == "cash_out":
        return "close" if data.get("final") is True else "advance"
    if record_type in ("sale", "vend_failed", "escrow_returned", "cash_in"):
        return "close"
    return None


def check_intent_step(
    record_type: str, data: Mapping[str, Any], open_intents: dict[str, str]
) -> None:
    """Apply one record to ``open_intents`` ({intent_id: intent type}), or raise IntentError.

    The caller works on a copy per batch so that a refused record changes nothing.
    """
    role = intent_role(record_type, data)
    if role is None:
        return
    intent_id = str(data["intent_id"])
    if role == "open":
        if intent_id in open_intents:
            raise IntentError(record_type, "intent_id", f"{intent_id} is already open")
        open_intents[intent_id] = record_type
        return
    if role == "resolve":
        open_intents.pop(intent_id, None)
        return
    kind = open_intents.get(intent_id)
    if kind is None:
        raise IntentError(record_type, "intent_id", f"no open intent {intent_id}")
    if record_type not in OUTCOME_TYPES[kind]:
        raise IntentError(record_type, "intent_id", f"{intent_id} is a {kind}, not closed by this")
    if role == "close":
        del open_intents[intent_id]


# --------------------------------------------------------------------------------------------
# Counters (lifetime, never decrease) and levels (tube coins, stacker bills, stock).

LEVEL_FIELD_RE: Final = re.compile(
    r"tubes\.(\d{1,2})\.count|stacker\.count|stock\.[A-Za-z0-9]{1,8}\.count"
)


def _add(deltas: dict[str, int], name: str, value: int) -> None:
    if value:
        deltas[name] = deltas.get(name, 0) + value


def counter_deltas(record: Record) -> dict[str, int]:
    """What ``record`` adds to the lifetime counters. Every delta is >= 0, so counters never go
    backwards; they are updated in the same transaction as the record."""
    data = record.data
    deltas: dict[str, int] = {}
    match record.type:
        case "boot":
            _add(deltas, "boots.count", 1)
        case "cash_in":
            device, route, amount = data["device"], data["route"], data["amount"]
            _add(deltas, "cash_in.count", 1)
            _add(deltas, "cash_in.value", amount)
            _add(deltas, f"cash_in.{device}.{route}.count", 1)
            _add(deltas, f"cash_in.{device}.{route}.value", amount)
            if data.get("fill") is True:
                _add(deltas, "cash_in.fill.count", 1)
                _add(deltas, "cash_in.fill.value", amount)
        case "cash_out":
            _add(deltas, "cash_out.count", 1)
            _add(deltas, "cash_out.value", data["amount"])
            _add(deltas, f"cash_out.{data['reason']}.value", data["amount"])
        case "sale":
            slot, method, price = data["slot"], data["method"], data["price"]
            for prefix in ("sales", f"sales.slot.{slot}", f"sales.method.{method}"):
                _add(deltas, f"{prefix}.count", 1)
                _add(deltas, f"{prefix}.value", price)
        case "vend_intent":
            _add(deltas, "vend_intent.count", 1)
        case "vend_failed":
            _add(deltas, "vend_failed.count", 1)
            _add(deltas, f"vend_failed.slot.{data['slot']}.count", 1)
        case "refund":
            _add(deltas, "refund.count", 1)
            _add(deltas, "refund.value", data["amount"])
            _add(deltas, f"refund.method.{data['method']}.value", data["amount"])
        case "credit":
            _add(deltas, "credit.count", 1)
            _add(deltas, "credit.value", data["amount"])
        case "escrow_returned":
            _add(deltas, "escrow_returned.count", 1)
        case "correction":
            _add(deltas, "correction.count", 1)
            amount = data["amount"] or 0
            _add(deltas, "correction.surplus.value", max(amount, 0))
            _add(deltas, "correction.shortfall.value", max(-amount, 0))
        case "order":
            _add(deltas, f"order.{data['state']}.count", 1)
        case "door":
            _add(deltas, "door.opened.count", 1 if data["open"] else 0)
        case "security":
            _add(deltas, "security.count", 1)
        case "cash_removed":
            _add(deltas, f"cash_removed.{data['device']}.count", data["count"])
            _add(deltas, f"cash_removed.{data['device']}.value", data["value"])
        case "motor_test":
            _add(deltas, "motor_test.count", 1)
        case "recovery":
            _add(deltas, "recovery.count", 1)
        case "device":
            # Faults and lost devices are EVA-DTS events (vmc/dex/report.py): counted for life.
            if data["state"] in DEVICE_EVENT_STATES:
                _add(deltas, device_event_counter(data["device"], data["state"]), 1)
        case "audit_read":
            _add(deltas, "audit_read.count", 1)
        case _:
            pass
    return deltas


#: The ``device`` record states counted as events (``device.<device>.<state>.count``).
DEVICE_EVENT_STATES: Final = ("fault", "offline")


def device_event_counter(device: str, state: str) -> str:
    """The lifetime counter of one device's faults or losses."""
    return f"device.{device}.{state}.count"


def audit_level_name(counter: str) -> str:
    """The level holding ``counter``'s value at the last audit read with reset."""
    return f"audit.{counter}"


def level_deltas(record: Record) -> dict[str, int]:
    """What ``record`` changes in the device levels: coins per tube (``tubes.<type>.count``),
    bills in the stacker (``stacker.count``) and products per slot (``stock.<slot>.count``),
    and the QR orders not yet closed (``orders.open.count``: start-up expires them).
    Levels go up and down; they are what the devices should report if nothing went unrecorded.
    The planogram is kept as levels too, so that it survives restarts and pruning atomically
    with its records: ``price.<slot>.value`` and ``disabled.<slot>.flag`` (vmc/planogram.py)."""
    data = record.data
    deltas: dict[str, int] = {}
    match record.type:
        case "cash_in":
            if data["route"] == "tubes":
                _add(deltas, f"tubes.{data['coin_type']}.count", 1)
            elif data["route"] == "stacker":
                _add(deltas, "stacker.count", 1)
        case "cash_out":
            for coin_type, count in data["coins"].items():
                _add(deltas, f"tubes.{coin_type}.count", -count)
        case "sale":
            _add(deltas, f"stock.{data['slot']}.count", -1)
            if "order_id" in data:
                _add(deltas, OPEN_ORDERS_LEVEL, -1)
        case "vend_failed":
            if "order_id" in data:
                _add(deltas, OPEN_ORDERS_LEVEL, -1)
        case "order":
            _add(deltas, OPEN_ORDERS_LEVEL, 1 if data["state"] == "created" else -1)
        case "inventory_changed":
            _add(deltas, f"stock.{data['slot']}.count", data["new"] - data["old"])
        case "cash_removed":
            _add(deltas, STACKER_LEVEL, -data["count"])
        case "price_changed":
            _add(deltas, price_level_name(data["slot"]), data["new"] - data["old"])
        case "slot_changed":
            if "old" in data:  # a planogram change (a machine's own take-out is not one)
                flag = int(data["old"]) - int(data["enabled"])
                _add(deltas, disabled_level_name(data["slot"]), flag)
        case "correction":
            if LEVEL_FIELD_RE.fullmatch(data["field"]):
                _add(deltas, data["field"], data["found"] - data["expected"])
        case "audit_read":
            for counter, value in data["interim"].items():
                _add(deltas, audit_level_name(counter), value)
        case _:
            pass
    return deltas


def price_level_name(slot: str) -> str:
    """The level holding a slot's current price (``price_changed`` moves it by new - old)."""
    return f"price.{slot}.value"


def disabled_level_name(slot: str) -> str:
    """The level that is 1 while a slot is out of sale by the planogram, 0 (or absent) when in
    sale (``slot_changed`` with ``old`` moves it)."""
    return f"disabled.{slot}.flag"


def merge_deltas(into: dict[str, int], deltas: Mapping[str, int]) -> None:
    """Add ``deltas`` into ``into`` in place."""
    for name, value in deltas.items():
        into[name] = into.get(name, 0) + value


def tube_level_name(coin_type: int) -> str:
    """The level name of one coin tube."""
    return f"tubes.{coin_type}.count"


STACKER_LEVEL: Final = "stacker.count"
OPEN_ORDERS_LEVEL: Final = "orders.open.count"
