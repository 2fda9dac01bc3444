"""The EVA-DTS audit report (DEX/UCS transaction set "VA"): segments and the builder.

Pure: no I/O. Field positions follow EVA-DTS 6.x as the public sources give them (docs/dex.md
lists each segment, its elements and the counters they come from). Money is in the currency's
minor unit without a decimal point (ID4 says how many decimals); "lifetime" is since
initialisation (the journal's lifetime counters), "interim" since the last read with reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from vmc.dex.audit import AuditData, Occurrence
from vmc.dex.crc import crc16_arc
from vmc.journal.records import LEVEL_FIELD_RE, parse_ts

CRLF: Final = "\r\n"
SEPARATOR: Final = "*"
#: DXS: the version of the standard the report follows, and the transaction set's id.
STANDARD_VERSION: Final = "V0/6"
TRANSACTION_SET: Final = "001"
CONTROL_NUMBER: Final = "0001"
MODEL: Final = "VMC"

#: Events (EA1/EA2): EVA-DTS event id -> the lifetime counter that counts it, and the retained
#: record kind whose latest occurrence dates it: (type, device, state).
EVENTS: Final[tuple[tuple[str, str, tuple[str, str | None, str | None]], ...]] = (
    ("EGS", "door.opened.count", ("door", None, None)),  # door open
    ("ELA", "vend_failed.count", ("vend_failed", None, None)),  # failed vend
    ("EA", "device.coin.fault.count", ("device", "coin", "fault")),  # coin mechanism fault
    ("EAR", "device.coin.offline.count", ("device", "coin", "offline")),  # coin mech comm error
    ("EN", "device.bill.fault.count", ("device", "bill", "fault")),  # bill validator fault
    ("ENK", "device.bill.offline.count", ("device", "bill", "offline")),  # bill comm error
    ("EK", "device.cashless.fault.count", ("device", "cashless", "fault")),  # cashless 1 fault
    ("EKM", "device.cashless.offline.count", ("device", "cashless", "offline")),  # its comm error
)


@dataclass(frozen=True)
class Identity:
    """Who the report is about: from the configuration and the software."""

    comm_id: str  # DXS sender (the DEX communication id)
    machine_id: str  # ID1 serial number, CB1 serial number
    software_version: str
    currency: str
    currency_numeric: int
    decimal_places: int
    coin: bool  # which payment devices the machine has (CA1, BA1, DA1 only for those)
    bill: bool
    cashless: bool
    qr: bool


@dataclass(frozen=True)
class Selection:
    """One PA1/PA2 pair: a slot, its current price and product name."""

    slot: str
    price: int | None
    name: str


@dataclass(frozen=True)
class ReadInfo:
    """This read (EA3): when, by whom, whether it resets the interim counters."""

    at: datetime
    via: str
    reset: bool


def segment(tag: str, *elements: object) -> str:
    """One segment without its line end; trailing empty elements are left out."""
    texts = ["" if e is None else str(e) for e in elements]
    while texts and texts[-1] == "":
        texts.pop()
    for text in texts:
        if SEPARATOR in text or "\r" in text or "\n" in text:
            raise ValueError(f"{tag}: an element may not hold '*' or a line end: {text!r}")
    return SEPARATOR.join([tag, *texts])


def _date(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d")


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%H%M%S")


def _pair(data: AuditData, value: str, count: str) -> tuple[int, int, int, int]:
    """value, count lifetime, then value, count interim (VA1, CA2, DA2 order)."""
    return (
        data.lifetime(value),
        data.lifetime(count),
        data.interim(value),
        data.interim(count),
    )


def _sum(data: AuditData, names: Iterable[str], *, interim: bool) -> int:
    return sum(data.interim(n) if interim else data.lifetime(n) for n in names)


def _identification(name: str, data: AuditData, device: str, unknown_model: str) -> str:
    """CA1/BA1/DA1: serial (manufacturer code and serial number), model, software version, as
    the device reported them at its last start-up (journaled); the generic model when no such
    record is retained."""
    known = data.identity(device)
    if not known:
        return segment(name, "", unknown_model)
    serial = f"{known.get('manufacturer', '')}{known.get('serial', '')}".strip()
    model = str(known.get("model", "")).strip() or unknown_model
    version = known.get("version")
    return segment(name, serial, model, f"{version:04d}" if isinstance(version, int) else "")


def _cash_segments(data: AuditData, identity: Identity) -> list[str]:
    lines = []
    if identity.coin:
        lines.append(_identification("CA1", data, "coin", "MDB-COIN"))
    lines.append(segment("CA2", *_pair(data, "sales.method.cash.value", "sales.method.cash.count")))
    coins_box = "cash_in.coin.cashbox.value"
    coins_tubes = "cash_in.coin.tubes.value"
    bills = ("cash_in.bill.stacker.value", "cash_in.bill.cashbox.value")
    ca3: list[int] = []
    for interim in (True, False):  # CA3 gives since-reset first, then since-initialisation
        ca3 += [
            _sum(data, ("cash_in.value",), interim=interim),
            _sum(data, (coins_box,), interim=interim),
            _sum(data, (coins_tubes,), interim=interim),
            _sum(data, bills, interim=interim),
        ]
    lines.append(segment("CA3", *ca3))
    paid = ("cash_out.value",)
    manual = ("cash_out.manual.value",)
    ca4: list[int] = []
    for interim in (True, False):  # CA4: dispensed, manually dispensed; reset then init
        manual_value = _sum(data, manual, interim=interim)
        ca4 += [_sum(data, paid, interim=interim) - manual_value, manual_value]
    lines.append(segment("CA4", *ca4))
    tubes = sorted(
        int(name.split(".")[1])
        for name in data.levels
        if name.startswith("tubes.") and LEVEL_FIELD_RE.fullmatch(name)
    )
    if identity.coin and tubes:
        counts = {t: max(0, data.levels[f"tubes.{t}.count"]) for t in tubes}
        if all(t in data.coin_values for t in tubes):
            lines.append(segment("CA15", sum(counts[t] * data.coin_values[t] for t in tubes)))
        for t in tubes:
            lines.append(segment("CA17", t, data.coin_values.get(t), counts[t]))
    if identity.bill:
        lines.append(_identification("BA1", data, "bill", "MDB-BILL"))
    return lines


def _cashless_segments(data: AuditData, identity: Identity) -> list[str]:
    lines = []
    # Cashless 1 is the MDB card reader (DA), cashless 2 the QR e-wallet (DB).
    for tag, method, device, present, model in (
        ("DA", "card", "cashless", identity.cashless, "MDB-CASHLESS"),
        ("DB", "qr", "", identity.qr, "QR-WALLET"),
    ):
        sold = data.lifetime(f"sales.method.{method}.count")
        if not present and not sold:
            continue
        lines.append(_identification(f"{tag}1", data, device, model))
        lines.append(
            segment(
                f"{tag}2",
                *_pair(data, f"sales.method.{method}.value", f"sales.method.{method}.count"),
            )
        )
        refunds = f"refund.method.{method}.value"  # money credited back to the card or wallet
        lines.append(segment(f"{tag}4", data.lifetime(refunds), data.interim(refunds)))
    return lines


def _selection_segments(data: AuditData, selections: Sequence[Selection]) -> list[str]:
    lines = []
    for selection in selections:
        lines.append(segment("PA1", selection.slot, selection.price, selection.name))
        count = f"sales.slot.{selection.slot}.count"
        value = f"sales.slot.{selection.slot}.value"
        # PA2 gives the count first, then the value (VA1 and CA2 the other way round).
        lines.append(
            segment(
                "PA2",
                data.lifetime(count),
                data.lifetime(value),
                data.interim(count),
                data.interim(value),
            )
        )
    return lines


def _event_segments(data: AuditData, read: ReadInfo) -> list[str]:
    lines = []
    for event_id, counter, (rtype, device, state) in EVENTS:
        lifetime = data.lifetime(counter)
        if not lifetime and event_id != "EGS":
            continue
        last = data.last(rtype, device, state)
        if rtype == "door":
            last = _last_door_opening(data)
        if last is not None:
            when = parse_ts(last.ts)
            lines.append(segment("EA1", event_id, _date(when), _time(when)))
        active = 0
        if rtype == "door":
            door = data.last("door")
            active = int(door is not None and bool(door.data.get("open")))
        lines.append(segment("EA2", event_id, data.interim(counter), lifetime, "", active))
    lines.append(_ea3(data, read))
    # Power outages: every start of vmc after the first is counted as one (the boot record).
    lifetime_starts = data.lifetime("boots.count")
    outages = max(0, lifetime_starts - 1)
    lines.append(segment("EA7", min(data.interim("boots.count"), outages), outages))
    return lines


def _last_door_opening(data: AuditData) -> Occurrence | None:
    return data.last("door", None, "open")


def _ea3(data: AuditData, read: ReadInfo) -> str:
    resets = data.lifetime("audit_read.count") + (1 if read.reset else 0)
    previous = data.last("audit_read")
    last_date = last_time = last_via = ""
    if previous is not None:
        when = parse_ts(previous.ts)
        last_date, last_time = _date(when), _time(when)
        last_via = str(previous.data.get("via", ""))
    return segment(
        "EA3",
        resets,
        _date(read.at),
        _time(read.at),
        read.via.upper(),
        last_date,
        last_time,
        last_via.upper(),
    )


def build_report(
    data: AuditData,
    identity: Identity,
    selections: Sequence[Selection],
    read: ReadInfo,
) -> str:
    """The whole report: DXS, ST, the data segments, G85, SE, DXE; lines end CR LF."""
    body = [
        segment("ST", TRANSACTION_SET, CONTROL_NUMBER),
        segment("ID1", identity.machine_id, MODEL, identity.software_version),
        segment(
            "ID4", identity.decimal_places, f"{identity.currency_numeric:03d}", identity.currency
        ),
        segment("ID5", _date(read.at), _time(read.at)),
        segment("CB1", identity.machine_id, MODEL, identity.software_version),
        segment("VA1", *_pair(data, "sales.value", "sales.count")),
        *_cash_segments(data, identity),
        *_cashless_segments(data, identity),
        *_selection_segments(data, selections),
        *_event_segments(data, read),
    ]
    covered = "".join(line + CRLF for line in body)
    body.append(segment("G85", f"{crc16_arc(covered.encode('ascii')):04X}"))
    body.append(segment("SE", len(body) + 1, CONTROL_NUMBER))
    lines = [
        segment("DXS", identity.comm_id, "VA", STANDARD_VERSION, 1),
        *body,
        segment("DXE", 1, 1),
    ]
    return "".join(line + CRLF for line in lines)
