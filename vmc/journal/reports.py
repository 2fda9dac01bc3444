"""Reports from the journal on a read-only connection: sales per slot, method and day, the cash
position, the unsynced backlog. Pure SQL and Python; amounts in minor units.

Per-slot/method/day figures come from the retained records (pruning drops old ones; the day is
the UTC date of the record's wall time, so records written before the clock was set land on a
wrong day); lifetime totals come from the counters, which pruning never reduces.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

from vmc.journal.reading import read_table
from vmc.journal.recovery import customer_credit, stock_levels


@dataclass(frozen=True)
class SalesLine:
    """Sales of one slot, method or day."""

    key: str
    count: int
    value: int


@dataclass(frozen=True)
class CashPosition:
    """Money in and out over the machine's life (counters), and what the devices should hold."""

    cash_in: dict[str, int]  # "coin.tubes", "coin.cashbox", "bill.stacker", ... → value
    cash_in_total: int
    cash_out: dict[str, int]  # reason → value
    cash_out_total: int
    net: int
    refunds_owed: int  # card/QR refunds recorded (paid back by the backend or the reader)
    customer_credit: int
    tubes: dict[int, int]  # coin type → coins the records say are in the tube
    stacker_count: int | None


@dataclass(frozen=True)
class Backlog:
    """Records the backend has not acknowledged yet."""

    count: int
    acked_upto: int
    oldest_seq: int | None
    oldest_ts: str | None


@dataclass(frozen=True)
class Report:
    """Everything ``vmc journal report`` shows."""

    journal_id: str
    last_seq: int
    since: str | None
    sales_by_slot: list[SalesLine]
    sales_by_method: list[SalesLine]
    sales_by_day: list[SalesLine]
    sales_total: SalesLine
    lifetime_sales: SalesLine
    cash: CashPosition
    backlog: Backlog
    stock: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for JSON."""
        return asdict(self)


def _since_ts(since: date | None) -> str:
    # Records' ts is "YYYY-MM-DDTHH:MM:SS.mmmZ"; a bare date sorts before every time that day.
    return since.isoformat() if since is not None else ""


def sales_by(conn: sqlite3.Connection, key: str, since: date | None = None) -> list[SalesLine]:
    """Sales grouped by ``slot``, ``method`` or ``day`` (UTC date of ts) over retained records."""
    expressions = {
        "slot": "json_extract(data, '$.slot')",
        "method": "json_extract(data, '$.method')",
        "day": "substr(ts, 1, 10)",
    }
    expression = expressions[key]
    rows = conn.execute(
        f"SELECT {expression} AS k, COUNT(*), COALESCE(SUM(json_extract(data, '$.price')), 0) "
        "FROM records WHERE type = 'sale' AND ts >= ? GROUP BY k ORDER BY k",
        (_since_ts(since),),
    ).fetchall()
    return [SalesLine(str(k), int(n), int(v)) for k, n, v in rows]


def cash_position(conn: sqlite3.Connection) -> CashPosition:
    """The lifetime cash position from the counters, and the levels."""
    counters = read_table(conn, "counters")
    levels = read_table(conn, "levels")
    cash_in: dict[str, int] = {}
    cash_out: dict[str, int] = {}
    for name, value in counters.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "cash_in" and parts[3] == "value":
            cash_in[f"{parts[1]}.{parts[2]}"] = value
        elif len(parts) == 3 and parts[0] == "cash_out" and parts[2] == "value":
            cash_out[parts[1]] = value
    tubes = {}
    for name, value in levels.items():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "tubes" and parts[2] == "count":
            tubes[int(parts[1])] = value
    total_in = counters.get("cash_in.value", 0)
    total_out = counters.get("cash_out.value", 0)
    return CashPosition(
        cash_in=dict(sorted(cash_in.items())),
        cash_in_total=total_in,
        cash_out=dict(sorted(cash_out.items())),
        cash_out_total=total_out,
        net=total_in - total_out,
        refunds_owed=counters.get("refund.value", 0),
        customer_credit=customer_credit(counters),
        tubes=dict(sorted(tubes.items())),
        stacker_count=levels.get("stacker.count"),
    )


def backlog(conn: sqlite3.Connection) -> Backlog:
    """Unacknowledged records: how many, and the oldest."""
    acked, state_last = conn.execute(
        "SELECT acked_upto, last_seq FROM state WHERE id = 1"
    ).fetchone()
    last = max(
        int(state_last),
        int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]),
    )
    oldest = conn.execute(
        "SELECT seq, ts FROM records WHERE seq > ? ORDER BY seq LIMIT 1", (acked,)
    ).fetchone()
    return Backlog(
        count=last - int(acked),
        acked_upto=int(acked),
        oldest_seq=None if oldest is None else int(oldest[0]),
        oldest_ts=None if oldest is None else str(oldest[1]),
    )


def build_report(conn: sqlite3.Connection, since: date | None = None) -> Report:
    """The whole report, read in one snapshot."""
    conn.execute("BEGIN")
    try:
        journal_id, state_last = conn.execute(
            "SELECT journal_id, last_seq FROM state WHERE id = 1"
        ).fetchone()
        last_seq = max(
            int(state_last),
            int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]),
        )
        by_slot = sales_by(conn, "slot", since)
        counters = read_table(conn, "counters")
        report = Report(
            journal_id=str(journal_id),
            last_seq=last_seq,
            since=None if since is None else since.isoformat(),
            sales_by_slot=by_slot,
            sales_by_method=sales_by(conn, "method", since),
            sales_by_day=sales_by(conn, "day", since),
            sales_total=SalesLine(
                "total", sum(line.count for line in by_slot), sum(line.value for line in by_slot)
            ),
            lifetime_sales=SalesLine(
                "lifetime", counters.get("sales.count", 0), counters.get("sales.value", 0)
            ),
            cash=cash_position(conn),
            backlog=backlog(conn),
            stock=stock_levels(read_table(conn, "levels")),
        )
    finally:
        conn.execute("COMMIT")
    return report


def format_money(amount: int, decimals: int | None = None) -> str:
    """Minor units as text: ``150`` → ``1.50`` with 2 decimals, as is without a scale."""
    if not decimals:
        return str(amount)
    sign = "-" if amount < 0 else ""
    whole, part = divmod(abs(amount), 10**decimals)
    return f"{sign}{whole}.{part:0{decimals}d}"


def format_report(report: Report, decimals: int | None = None, currency: str = "") -> str:
    """The report as text for a terminal."""
    unit = currency or ("minor units" if not decimals else "")

    def money(amount: int) -> str:
        return format_money(amount, decimals)

    def table(title: str, lines: list[SalesLine]) -> list[str]:
        out = [f"{title}:"]
        if not lines:
            out.append("  (none)")
        for line in lines:
            out.append(f"  {line.key:<12} {line.count:>7}  {money(line.value):>12}")
        return out

    period = f"since {report.since}" if report.since else "all retained records"
    cash = report.cash
    lines = [
        f"journal {report.journal_id}, last seq {report.last_seq}",
        f"amounts in {unit}" if unit else "",
        f"sales ({period}): {report.sales_total.count} for {money(report.sales_total.value)}",
        *table("per slot", report.sales_by_slot),
        *table("per method", report.sales_by_method),
        *table("per day (UTC)", report.sales_by_day),
        f"lifetime sales: {report.lifetime_sales.count} for {money(report.lifetime_sales.value)}",
        "cash position (lifetime):",
        *(f"  in  {route:<14} {money(v):>12}" for route, v in cash.cash_in.items()),
        *(f"  out {reason:<14} {money(v):>12}" for reason, v in cash.cash_out.items()),
        f"  net{'':<15} {money(cash.net):>12}",
        f"  card/QR refunds recorded {money(cash.refunds_owed)}",
        f"  customer credit held     {money(cash.customer_credit)}",
        "  tubes (coins): "
        + (", ".join(f"type {t}: {n}" for t, n in cash.tubes.items()) or "unknown"),
        f"  stacker (bills): {'unknown' if cash.stacker_count is None else cash.stacker_count}",
        f"unsynced backlog: {report.backlog.count} records"
        + (
            f", oldest seq {report.backlog.oldest_seq} at {report.backlog.oldest_ts}"
            if report.backlog.oldest_seq is not None
            else ""
        ),
    ]
    if report.stock:
        lines.append("stock: " + ", ".join(f"{s}: {n}" for s, n in sorted(report.stock.items())))
    return "\n".join(line for line in lines if line) + "\n"
