"""Shared by the DEX tests: a journal with sales, cash and events written the way the vend
cycle writes them, and an EVA-DTS reader of the test's own (its own CRC, its own parsing), so
the report is checked against an implementation that is not the one under test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmc.config import Config, parse_config
from vmc.journal import Journal

MACHINE_ID = "DEX-0042"
SLOTS: list[dict[str, Any]] = [
    {"id": "A1", "row": 0, "col": 0, "price": 150, "stock": 5, "name": "Cola"},
    {"id": "B2", "row": 1, "col": 1, "price": 200, "stock": 3, "name": "Water"},
]


def make_config(state_dir: Path, **dex: Any) -> Config:
    return parse_config(
        {
            "machine": {"id": MACHINE_ID, "state_dir": str(state_dir)},
            "mdb": {"simulate": True, "coin": {}, "bill": {}, "cashless": {"enabled": True}},
            "motor": {"simulate": True},
            "cloud": {"enabled": False},
            "dex": dex,
            "slot": SLOTS,
        },
        state_dir,
    )


def crc16_arc_bitwise(data: bytes) -> int:
    """CRC-16/ARC one bit at a time (the module under test uses a table)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def segments(report: str) -> list[list[str]]:
    """The report's segments split into elements; every line must end CR LF."""
    assert report.endswith("\r\n")
    lines = report[:-2].split("\r\n")
    assert all("\n" not in line and "\r" not in line for line in lines)
    return [line.split("*") for line in lines]


def find(report: str, tag: str, first: str | None = None) -> list[str]:
    """The elements of the one segment ``tag`` (whose first element is ``first``, if given)."""
    found = [s[1:] for s in segments(report) if s[0] == tag and (first is None or s[1] == first)]
    assert len(found) == 1, (tag, first, found)
    return found[0]


def check_g85_and_se(report: str) -> None:
    """G85 recomputed over the exact bytes from ST to the line before G85; SE counts ST..SE."""
    data = report.encode("ascii")
    start = data.index(b"\r\nST*") + 2
    g85 = data.index(b"\r\nG85*") + 2
    expected = crc16_arc_bitwise(data[start:g85])
    line_end = data.index(b"\r\n", g85)
    assert data[g85:line_end] == b"G85*%04X" % expected
    lines = segments(report)
    tags = [s[0] for s in lines]
    assert tags[0] == "DXS" and tags[1] == "ST" and tags[-3:] == ["G85", "SE", "DXE"]
    assert lines[-2] == ["SE", str(len(lines) - 2), "0001"]  # ST..SE: all but DXS and DXE
    assert lines[-1] == ["DXE", "1", "1"]


async def sell(journal: Journal, n: int, slot: str, price: int, method: str) -> None:
    extra: dict[str, Any] = {}
    if method == "qr":
        extra = {"order_id": f"o-{n}"}
        await journal.append(
            "order", {"order_id": f"o-{n}", "slot": slot, "price": price, "state": "created"}
        )
    await journal.append(
        "vend_intent",
        {"intent_id": f"v-{n}", "slot": slot, "price": price, "method": method, **extra},
    )
    await journal.append(
        "sale",
        {
            "intent_id": f"v-{n}",
            "slot": slot,
            "price": price,
            "method": method,
            "paid": price,
            **extra,
        },
    )


async def coin(journal: Journal, coin_type: int, value: int, route: str = "tubes") -> None:
    await journal.append(
        "cash_in", {"amount": value, "device": "coin", "route": route, "coin_type": coin_type}
    )


async def fill_journal(journal: Journal) -> None:
    """Two cash sales of A1 (coins and a bill), one card sale of B2, one QR sale of A1, change,
    a manual payout, a card refund, a failed vend, the door opened and closed, a coin fault."""
    for value, coin_type in ((100, 3), (50, 2), (50, 2)):
        await coin(journal, coin_type, value)
    await coin(journal, 3, 100, route="cashbox")
    await sell(journal, 1, "A1", 150, "cash")
    await journal.append(
        "cash_in", {"amount": 500, "device": "bill", "route": "stacker", "bill_type": 1}
    )
    await sell(journal, 2, "A1", 150, "cash")
    await journal.append("cash_out", {"amount": 100, "reason": "change", "coins": {"3": 1}})
    await journal.append("cash_out", {"amount": 50, "reason": "manual", "coins": {"2": 1}})
    await sell(journal, 3, "B2", 200, "card")
    await sell(journal, 4, "A1", 150, "qr")
    await journal.append(
        "refund", {"amount": 200, "method": "card", "reason": "test", "session_id": "s-1"}
    )
    await journal.append(
        "vend_intent", {"intent_id": "v-9", "slot": "B2", "price": 200, "method": "cash"}
    )
    await journal.append(
        "vend_failed",
        {"intent_id": "v-9", "slot": "B2", "price": 200, "method": "cash", "reason": "jam"},
    )
    await journal.append("door", {"open": True})
    await journal.append("door", {"open": False})
    await journal.append("device", {"device": "coin", "state": "fault", "detail": "tube jam"})
