"""What an audit report is built from, read from the journal in one read-only snapshot.

Everything comes from tables that survive pruning (``counters``, ``levels``), so the figures
stay right after pruning and restarts. Retained records only add what a counter cannot hold:
the time of the last occurrence of an event, the door's state now, and each coin type's value
(the changer reports values over MDB; the journal has them in its ``cash_in`` records)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from vmc.journal.records import audit_level_name

#: The record kinds whose latest occurrence a report shows (EA1, EA2 activity, EA3).
LAST_OCCURRENCE_SQL: Final = """
SELECT type, json_extract(data, '$.device'),
       CASE type WHEN 'door' THEN json_extract(data, '$.open')
                 ELSE json_extract(data, '$.state') END,
       MAX(seq), ts, data
FROM records WHERE type IN ('door', 'vend_failed', 'device', 'audit_read')
GROUP BY 1, 2, 3
"""
#: The latest value seen for each coin type (a changer's coin values do not change in service).
COIN_VALUES_SQL: Final = """
SELECT json_extract(data, '$.coin_type'), json_extract(data, '$.amount'), MAX(seq)
FROM records WHERE type = 'cash_in' AND json_extract(data, '$.device') = 'coin'
GROUP BY 1
"""


@dataclass(frozen=True)
class Occurrence:
    """The latest retained record of one event kind."""

    seq: int
    ts: str
    data: dict[str, Any]


@dataclass(frozen=True)
class AuditData:
    """Counters and levels of one snapshot, and the retained facts beside them."""

    journal_id: str
    last_seq: int
    counters: Mapping[str, int]
    levels: Mapping[str, int]
    coin_values: Mapping[int, int] = field(default_factory=dict)
    #: Keyed by (record type, device or None, state or None); doors also by "open" and
    #: "closed" (None: the latest door record, whichever it was).
    latest: Mapping[tuple[str, str | None, str | None], Occurrence] = field(default_factory=dict)

    def lifetime(self, counter: str) -> int:
        """Since initialisation: the lifetime counter (never decreases)."""
        return self.counters.get(counter, 0)

    def interim(self, counter: str) -> int:
        """Since the last read with reset: lifetime less its value at that reset, never < 0."""
        return max(0, self.lifetime(counter) - self.levels.get(audit_level_name(counter), 0))

    def interims(self) -> dict[str, int]:
        """Every counter's interim value that is not 0 (what a reset moves into the levels)."""
        values = {name: self.interim(name) for name in self.counters}
        return {name: value for name, value in sorted(values.items()) if value}

    def last(
        self, rtype: str, device: str | None = None, state: str | None = None
    ) -> Occurrence | None:
        return self.latest.get((rtype, device, state))

    def identity(self, device: str) -> Mapping[str, Any]:
        """The latest retained ``device`` record in which ``device`` named itself (online or
        recovered, with its MDB identity); empty when none is retained."""
        records = (self.last("device", device, state) for state in ("online", "recovered"))
        found = [o for o in records if o is not None and "model" in o.data]
        return max(found, key=lambda o: o.seq).data if found else {}

    @property
    def last_reset_seq(self) -> int:
        """The seq of the latest retained read with reset (0: none retained)."""
        occurrence = self.last("audit_read")
        return occurrence.seq if occurrence is not None else 0


def read_audit_data(conn: sqlite3.Connection) -> AuditData:
    """Read one consistent snapshot (the caller's read-only connection, any thread)."""
    conn.execute("BEGIN")
    try:
        journal_id, last_seq = conn.execute(
            "SELECT journal_id, last_seq FROM state WHERE id = 1"
        ).fetchone()
        counters = {str(n): int(v) for n, v in conn.execute("SELECT name, value FROM counters")}
        levels = {str(n): int(v) for n, v in conn.execute("SELECT name, value FROM levels")}
        coin_values: dict[int, int] = {}
        for coin_type, amount, _seq in conn.execute(COIN_VALUES_SQL):
            if isinstance(coin_type, int) and isinstance(amount, int):
                coin_values[coin_type] = amount
        latest: dict[tuple[str, str | None, str | None], Occurrence] = {}
        for rtype, device, state, seq, ts, data in conn.execute(LAST_OCCURRENCE_SQL):
            occurrence = Occurrence(int(seq), str(ts), json.loads(data))
            if rtype == "device":
                latest[(str(rtype), device, state)] = occurrence
            elif rtype == "door":  # kept apart: the last opening, and the last change
                latest[("door", None, "open" if state else "closed")] = occurrence
                last_change = latest.get(("door", None, None))
                if last_change is None or last_change.seq < occurrence.seq:
                    latest[("door", None, None)] = occurrence
            else:
                latest[(str(rtype), None, None)] = occurrence
        # The changer's own coin values (its SETUP, journaled when it came up) win over the
        # values seen on coins taken in.
        for state in ("online", "recovered"):
            named = latest.get(("device", "coin", state))
            if named is not None and isinstance(named.data.get("coin_values"), dict):
                for key, value in named.data["coin_values"].items():
                    if isinstance(value, int):
                        coin_values[int(key)] = value
        max_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]
    finally:
        conn.execute("COMMIT")
    return AuditData(
        journal_id=str(journal_id),
        last_seq=max(int(last_seq), int(max_seq)),
        counters=counters,
        levels=levels,
        coin_values=coin_values,
        latest=latest,
    )


def latest_reset_seq(conn: sqlite3.Connection) -> int:
    """The seq of the newest audit_read record (0: none retained)."""
    row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records WHERE type = 'audit_read'")
    return int(row.fetchone()[0])
