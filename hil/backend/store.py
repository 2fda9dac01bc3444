"""The stand-in backend's storage: one SQLite file, ``backend.sqlite3`` in its state folder.

Journal records are keyed by ``(machine, journal, seq)`` and a duplicate is dropped (the
machine resends after every reconnect and restart; contract). Per (machine, journal) the store
keeps ``contiguous_upto``: the highest seq such that every seq from the first one it ever
stored for that journal up to it is stored. That is what the backend acks: a record is acked
only once it and everything before it is durable here (``synchronous=FULL``).
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

DB_FILE: Final = "backend.sqlite3"

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS records (
    machine TEXT NOT NULL, journal TEXT NOT NULL, seq INTEGER NOT NULL,
    id TEXT NOT NULL, boot_id TEXT, ts TEXT, type TEXT NOT NULL, data TEXT NOT NULL,
    source TEXT, received_at TEXT NOT NULL,
    PRIMARY KEY (machine, journal, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journals (
    machine TEXT NOT NULL, journal TEXT NOT NULL, first_seq INTEGER NOT NULL,
    contiguous_upto INTEGER NOT NULL, duplicates INTEGER NOT NULL DEFAULT 0,
    first_seen TEXT NOT NULL, last_seen TEXT NOT NULL,
    PRIMARY KEY (machine, journal)
);
CREATE TABLE IF NOT EXISTS latest (
    machine TEXT NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL, received_at TEXT NOT NULL,
    PRIMARY KEY (machine, kind)
);
CREATE TABLE IF NOT EXISTS messages (
    n INTEGER PRIMARY KEY AUTOINCREMENT, machine TEXT NOT NULL, kind TEXT NOT NULL,
    payload TEXT NOT NULL, received_at TEXT NOT NULL
);
"""


def now_ts() -> str:
    utc = datetime.now(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class StoredBatch:
    """What one journal batch did: new records stored, duplicates dropped, what to ack."""

    stored: int
    duplicates: int
    upto: int


class BatchInvalid(ValueError):
    """A journal payload that does not follow the contract."""


class BackendStore:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / DB_FILE
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # --- journal ---------------------------------------------------------------------------

    def store_batch(self, machine: str, payload: Mapping[str, Any]) -> tuple[str, StoredBatch]:
        """Store a ``journal`` payload of ``machine``; returns (journal id, outcome).
        Raises BatchInvalid for a payload that breaks the contract."""
        journal = payload.get("journal")
        records = payload.get("records")
        if payload.get("machine") != machine:
            raise BatchInvalid("machine does not match the topic")
        if not isinstance(journal, str) or not isinstance(records, list) or not records:
            raise BatchInvalid("journal or records missing")
        if len(records) > 500:
            raise BatchInvalid(f"{len(records)} records in one batch (at most 500)")
        seqs = [r.get("seq") if isinstance(r, dict) else None for r in records]
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in seqs):
            raise BatchInvalid("a record without a positive integer seq")
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            raise BatchInvalid("records not in ascending seq")
        received = now_ts()
        rows = [
            (
                machine,
                journal,
                r["seq"],
                str(r.get("id", "")),
                r.get("boot_id"),
                r.get("ts"),
                str(r.get("type", "")),
                json.dumps(r.get("data", {}), separators=(",", ":")),
                json.dumps(r.get("source"), separators=(",", ":")),
                received,
            )
            for r in records
        ]
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            )
            stored = db.total_changes - before
            duplicates = len(rows) - stored
            row = db.execute(
                "SELECT first_seq, contiguous_upto FROM journals WHERE machine = ? AND journal = ?",
                (machine, journal),
            ).fetchone()
            if row is None:
                first = min(s for s in seqs if isinstance(s, int))
                upto = first - 1
                db.execute(
                    "INSERT INTO journals VALUES (?, ?, ?, ?, 0, ?, ?)",
                    (machine, journal, first, upto, received, received),
                )
            else:
                upto = int(row[1])
            upto = self._advance(machine, journal, upto)
            db.execute(
                "UPDATE journals SET contiguous_upto = ?, duplicates = duplicates + ?, "
                "last_seen = ? WHERE machine = ? AND journal = ?",
                (upto, duplicates, received, machine, journal),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return journal, StoredBatch(stored, duplicates, upto)

    def _advance(self, machine: str, journal: str, upto: int) -> int:
        cursor = self.db.execute(
            "SELECT seq FROM records WHERE machine = ? AND journal = ? AND seq > ? ORDER BY seq",
            (machine, journal, upto),
        )
        for (seq,) in cursor:
            if seq != upto + 1:
                break
            upto = seq
        return upto

    def acked_upto(self, machine: str, journal: str) -> int:
        row = self.db.execute(
            "SELECT contiguous_upto FROM journals WHERE machine = ? AND journal = ?",
            (machine, journal),
        ).fetchone()
        return int(row[0]) if row else 0

    def journals(self, machine: str | None = None) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT machine, journal, first_seq, contiguous_upto, duplicates, first_seen, "
            "last_seen FROM journals WHERE ? IS NULL OR machine = ? ORDER BY first_seen",
            (machine, machine),
        ).fetchall()
        names = ("machine", "journal", "first_seq", "contiguous_upto", "duplicates")
        return [
            {**dict(zip(names, row[:5], strict=True)), "first_seen": row[5], "last_seen": row[6]}
            for row in rows
        ]

    def records(
        self,
        machine: str | None = None,
        journal: str | None = None,
        types: Iterable[str] = (),
        limit: int = 1_000_000,
    ) -> list[dict[str, Any]]:
        wanted = list(types)
        sql = (
            "SELECT machine, journal, seq, id, boot_id, ts, type, data, source FROM records "
            "WHERE (? IS NULL OR machine = ?) AND (? IS NULL OR journal = ?)"
        )
        params: list[Any] = [machine, machine, journal, journal]
        if wanted:
            sql += f" AND type IN ({','.join('?' * len(wanted))})"
            params += wanted
        sql += " ORDER BY machine, journal, seq LIMIT ?"
        params.append(limit)
        out = []
        for row in self.db.execute(sql, params):
            out.append(
                {
                    "machine": row[0],
                    "journal": row[1],
                    "seq": row[2],
                    "id": row[3],
                    "boot_id": row[4],
                    "ts": row[5],
                    "type": row[6],
                    "data": json.loads(row[7]),
                    "source": json.loads(row[8]) if row[8] else None,
                }
            )
        return out

    # --- status, telemetry, orders, results ------------------------------------------------

    def put_latest(self, machine: str, kind: str, payload: Mapping[str, Any]) -> None:
        """Keep the latest ``status`` or ``telemetry`` of a machine."""
        self.db.execute(
            "INSERT INTO latest VALUES (?, ?, ?, ?) ON CONFLICT(machine, kind) DO UPDATE SET "
            "payload = excluded.payload, received_at = excluded.received_at",
            (machine, kind, json.dumps(payload, separators=(",", ":")), now_ts()),
        )

    def latest(self, machine: str, kind: str) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT payload FROM latest WHERE machine = ? AND kind = ?", (machine, kind)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def machines(self) -> list[str]:
        rows = self.db.execute(
            "SELECT machine FROM latest UNION SELECT machine FROM journals ORDER BY 1"
        ).fetchall()
        return [row[0] for row in rows]

    def add_message(self, machine: str, kind: str, payload: Mapping[str, Any]) -> None:
        """Keep an ``orders``, ``cmd/result`` or ``dex`` message."""
        self.db.execute(
            "INSERT INTO messages (machine, kind, payload, received_at) VALUES (?, ?, ?, ?)",
            (machine, kind, json.dumps(payload, separators=(",", ":")), now_ts()),
        )

    def messages(self, machine: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT machine, kind, payload, received_at FROM messages WHERE "
            "(? IS NULL OR machine = ?) AND (? IS NULL OR kind = ?) ORDER BY n",
            (machine, machine, kind, kind),
        ).fetchall()
        return [
            {"machine": m, "kind": k, "payload": json.loads(p), "received_at": at}
            for m, k, p, at in rows
        ]
