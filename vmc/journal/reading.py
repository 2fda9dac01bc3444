"""Reading the journal's rows: records from rows, the sync's wire batches built by SQLite, and
the counters and levels recomputed from the records to check the stored ones."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from vmc.journal.files import open_readonly
from vmc.journal.records import Record, counter_deltas, level_deltas, merge_deltas

RECORD_COLUMNS: Final = "seq, id, boot_id, ts, mono_ns, type, data, source"


#: One record in the contract's wire form, built by SQLite from the stored columns: the same
#: bytes as ``encode_json(record.to_wire())`` (``data`` and ``source`` are stored as that compact
#: JSON already; ``json_quote`` escapes strings as ``json.dumps(ensure_ascii=False)`` does).
WIRE_RECORD_SQL: Final = (
    """'{"seq":' || seq || ',"id":' || json_quote(id) || ',"boot_id":' || json_quote(boot_id)"""
    """ || ',"ts":' || json_quote(ts) || ',"type":' || json_quote(type)"""
    """ || ',"data":' || data || ',"source":' || source || '}'"""
)
#: The sync's batch: records from ``:from_seq`` in ascending seq, at most ``:max_records``, cut
#: where the comma-joined records would pass ``:max_bytes`` (the first record always goes), joined
#: by SQLite. The subquery's ORDER BY keeps it from being flattened into the aggregate, so
#: ``group_concat`` sees the rows in seq order (SQLite 3.40 has no ORDER BY in aggregates).
WIRE_BATCH_SQL: Final = f"""
WITH picked AS (
    SELECT seq, CAST({WIRE_RECORD_SQL} AS BLOB) AS wire FROM records
    WHERE seq >= :from_seq ORDER BY seq LIMIT :max_records
), sized AS (
    SELECT seq, wire, ROW_NUMBER() OVER win AS n, SUM(length(wire) + 1) OVER win - 1 AS size
    FROM picked WINDOW win AS (ORDER BY seq ROWS UNBOUNDED PRECEDING)
)
SELECT MIN(seq), MAX(seq), COUNT(*), CAST(group_concat(wire, ',') AS BLOB) FROM (
    SELECT seq, wire FROM sized WHERE n = 1 OR size <= :max_bytes ORDER BY seq
)
"""


@dataclass(frozen=True)
class WireBatch:
    """Records ``first``..``last`` (``count`` of them) in wire form, joined by commas."""

    first: int
    last: int
    count: int
    body: bytes


class _WireReader:
    """The cloud sync's reads, on a read-only connection and a thread of their own: WAL lets
    them run beside the writer, so a batch read never waits behind appends or ack commits, and
    SQLite builds the JSON with the GIL released (the event loop keeps its latency)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmc-journal-sync-read")

    def read(self, from_seq: int, max_records: int, max_bytes: int) -> WireBatch | None:
        if self.conn is None:
            self.conn = open_readonly(self.path)
        row = self.conn.execute(
            WIRE_BATCH_SQL,
            {"from_seq": from_seq, "max_records": max_records, "max_bytes": max_bytes},
        ).fetchone()
        if row is None or not row[2]:
            return None
        return WireBatch(int(row[0]), int(row[1]), int(row[2]), bytes(row[3]))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def record_from_row(row: Sequence[Any]) -> Record:
    """Build a Record from a row selected with ``RECORD_COLUMNS``."""
    seq, rid, boot_id, ts, mono_ns, rtype, data, source = row
    return Record(
        seq=int(seq),
        id=str(rid),
        boot_id=str(boot_id),
        ts=str(ts),
        mono_ns=int(mono_ns),
        type=str(rtype),
        data=json.loads(data),
        source=json.loads(source),
    )


@dataclass(frozen=True)
class CounterMismatch:
    """A counter or level whose stored value differs from the recomputation over the records."""

    kind: str  # "counter" or "level"
    name: str
    stored: int
    recomputed: int


def recompute_totals(conn: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int]]:
    """Counters and levels recomputed from the pruned baseline plus every retained record."""
    counters: dict[str, int] = {}
    levels: dict[str, int] = {}
    for kind, name, value in conn.execute("SELECT kind, name, value FROM baseline"):
        (counters if kind == "counter" else levels)[name] = int(value)
    for row in conn.execute(f"SELECT {RECORD_COLUMNS} FROM records ORDER BY seq"):
        record = record_from_row(row)
        merge_deltas(counters, counter_deltas(record))
        merge_deltas(levels, level_deltas(record))
    return counters, levels


def read_table(conn: sqlite3.Connection, table: str) -> dict[str, int]:
    """The ``counters`` or ``levels`` table as a dict."""
    if table not in ("counters", "levels"):
        raise ValueError(table)
    return {
        str(name): int(value) for name, value in conn.execute(f"SELECT name, value FROM {table}")
    }


def compare_totals(
    stored: Mapping[str, int], recomputed: Mapping[str, int], kind: str
) -> list[CounterMismatch]:
    """Names whose values differ (a missing name counts as 0)."""
    mismatches = []
    for name in sorted(set(stored) | set(recomputed)):
        a, b = stored.get(name, 0), recomputed.get(name, 0)
        if a != b:
            mismatches.append(CounterMismatch(kind, name, a, b))
    return mismatches
