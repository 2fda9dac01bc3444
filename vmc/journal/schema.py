"""The journal's schema and its migrations (sqlite-utils): the tables, and ``apply_migrations``,
which brings a database to the current version. Append new migrations to ``_MIGRATION_STEPS``;
never edit one that has shipped."""

from __future__ import annotations

import functools
import sqlite3
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from sqlite_utils import Database
    from sqlite_utils.migrations import Migrations

from vmc.journal.records import SchemaTooNew, format_ts


def _migration_0001_initial(db: Database) -> None:
    db.table("state").create(
        {
            "id": int,
            "journal_id": str,
            "created_at": str,
            "last_seq": int,
            "acked_upto": int,
        },
        pk="id",
        not_null=["journal_id", "created_at", "last_seq", "acked_upto"],
    )
    # J is created once, together with the database (contract: a wiped database gets a new J).
    db.table("state").insert(
        {
            "id": 1,
            "journal_id": uuid.uuid4().hex,
            "created_at": format_ts(datetime.now(UTC)),
            "last_seq": 0,
            "acked_upto": 0,
        }
    )
    db.table("records").create(
        {
            "seq": int,
            "id": str,
            "boot_id": str,
            "ts": str,
            "mono_ns": int,
            "type": str,
            "intent_id": str,
            "data": str,
            "source": str,
        },
        pk="seq",
        not_null=["id", "boot_id", "ts", "mono_ns", "type", "data", "source"],
    )
    # Only records that name an intent are indexed: an ordinary append dirties no extra page.
    db.execute(
        "CREATE INDEX records_intent ON records(intent_id, type) WHERE intent_id IS NOT NULL"
    )
    db.table("pending_intents").create(
        {"intent_id": str, "seq": int, "type": str}, pk="intent_id", not_null=["seq", "type"]
    )
    db.table("counters").create({"name": str, "value": int}, pk="name", not_null=["value"])
    db.table("levels").create({"name": str, "value": int}, pk="name", not_null=["value"])
    # What pruned records had contributed, so counters can still be recomputed and verified.
    db.table("baseline").create(
        {"kind": str, "name": str, "value": int}, pk=("kind", "name"), not_null=["value"]
    )
    db.table("scratch").create({"id": int, "payload": bytes}, pk="id")


def _migration_0002_device_event_counters(db: Database) -> None:
    # counter_deltas now counts device faults and losses (EVA-DTS events). Records pruned
    # before this had no such counter and their baseline has none, so counting the retained
    # records keeps stored and recomputed counters equal (verify_counters).
    db.execute(
        "INSERT INTO counters (name, value) "
        "SELECT 'device.' || json_extract(data, '$.device') || '.' "
        "|| json_extract(data, '$.state') || '.count', COUNT(*) FROM records "
        "WHERE type = 'device' AND json_extract(data, '$.state') IN ('fault', 'offline') "
        "GROUP BY 1 ON CONFLICT(name) DO UPDATE SET value = value + excluded.value"
    )


#: Every migration, oldest first: (name, step).
_MIGRATION_STEPS: Final = (
    ("0001_initial", _migration_0001_initial),
    ("0002_device_event_counters", _migration_0002_device_event_counters),
)


#: The names of every migration this version knows, oldest first.
MIGRATION_NAMES: Final = tuple(name for name, _step in _MIGRATION_STEPS)


#: sqlite-utils' record of the migrations applied, and the name of our set in it.
MIGRATIONS_TABLE: Final = "_sqlite_migrations"
MIGRATION_SET: Final = "vmc.journal"


@functools.cache
def _migrations() -> Migrations:
    """The migration set. sqlite-utils (with click, pluggy, dateutil) is imported here, only
    when a database is created or migrated: see ``apply_migrations``."""
    from sqlite_utils.migrations import Migrations

    migrations = Migrations(MIGRATION_SET)
    for name, step in _MIGRATION_STEPS:
        migrations(name=name)(step)
    return migrations


def _applied_names(conn: sqlite3.Connection) -> list[str] | None:
    """The names sqlite-utils recorded as applied, oldest first, read with plain SQL; None
    when it never recorded any (a new database)."""
    table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (MIGRATIONS_TABLE,)
    ).fetchone()
    if table is None:
        return None
    rows = conn.execute(
        f"SELECT name FROM {MIGRATIONS_TABLE} WHERE migration_set = ? ORDER BY rowid",
        (MIGRATION_SET,),
    )
    return [name for (name,) in rows]


def apply_migrations(conn: sqlite3.Connection) -> int:
    """Apply pending migrations; returns the schema version (number applied). Refuses a database
    that carries migrations this version does not know (opened by a newer vmc)."""
    if _applied_names(conn) == list(MIGRATION_NAMES):
        # Up to date, as at nearly every start: sqlite-utils is not imported. Its import
        # (~90 ms of CPU here) ran on the journal's thread while the daemon imported its own
        # modules, and the two share one interpreter lock (bench/footprint.py, first POLL).
        version = len(MIGRATION_NAMES)
    else:
        version = _migrate(conn)
    # Written only on change: an up-to-date database on a read-only medium must still open.
    if conn.execute("PRAGMA user_version").fetchone()[0] != version:
        conn.execute(f"PRAGMA user_version = {version}")
    return version


def _migrate(conn: sqlite3.Connection) -> int:
    from sqlite_utils import Database  # here, not at start-up: see apply_migrations

    migrations = _migrations()
    db = Database(conn, execute_plugins=False)
    applied = [m.name for m in migrations.applied(db)]
    unknown = [name for name in applied if name not in MIGRATION_NAMES]
    if unknown:
        raise SchemaTooNew(
            f"journal database has schema migrations this vmc does not know: {', '.join(unknown)}"
        )
    if migrations.pending(db):
        migrations.apply(db)
    return len(migrations.applied(db))
