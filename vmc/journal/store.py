"""The journal's storage: one SQLite database, one writer thread, group commit.

Every write goes through a single dedicated thread that owns the only read-write connection, so
the event loop never waits on SQLite or fsync, and ``seq`` can be assigned from memory without
races. Appends that arrive while a commit (and its fsync) is in progress are batched into the
next ``BEGIN IMMEDIATE … COMMIT``: one fsync for the whole batch, each caller's future resolved
once its batch is durable (``journal_mode=WAL``, ``synchronous=FULL``).

See ``docs/journal.md`` for the recovery policy, the record types and the disk-full behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

if TYPE_CHECKING:
    from sqlite_utils import Database
    from sqlite_utils.migrations import Migrations

from vmc.journal.records import (
    INTENT_TYPES,
    LOCAL,
    IntentError,
    JournalClosed,
    JournalCorrupt,
    JournalError,
    JournalUnavailable,
    Record,
    SchemaTooNew,
    Source,
    check_intent_step,
    counter_deltas,
    encode_json,
    format_ts,
    intent_role,
    level_deltas,
    merge_deltas,
    validate,
    validate_source,
)
from vmc.log import FailureLog

log = logging.getLogger("vmc.journal")

T = TypeVar("T")

JOURNAL_FILE: Final = "journal.sqlite3"
#: Beside the database, ``journal.sqlite3.id``: the journal id (J) of the database, written at
#: every open where it is missing or different. A start that must create a new database while
#: this file names a journal knows that one was lost, and says so at ERROR (docs/journal.md).
JOURNAL_ID_SUFFIX: Final = ".id"
APPLICATION_ID: Final = 0x564D434A  # "VMCJ" in the SQLite header: marks the file as ours

DEFAULT_MIN_FREE_BYTES: Final = 20 * 1024 * 1024  # issue 3: stop taking money below 20 MiB free
RESERVE_FLOOR_DIVISOR: Final = 4  # appends are refused only below a quarter of the reserve: the
# rest of the reserve records the money already on its way in when the machine stops taking it
HEALTH_PROBE_INTERVAL_S: Final = 5.0  # retry a write this often while unwritable; a person
# clearing a full disk waits at most this long, and a failing SD card is not hammered

# Timeouts on the writer thread. SD cards and eMMC stall for seconds during their own garbage
# collection; beyond these the storage is treated as unavailable rather than waited on.
T_COMMIT_S: Final = 15.0  # one append or batch: commit + fsync
T_CALL_S: Final = 60.0  # other writer work: an ack, a read, one prune chunk
T_OPEN_S: Final = 300.0  # integrity check of the whole file + migrations, at start only
T_CLOSE_S: Final = 30.0  # finish queued writes and close the connection
BUSY_TIMEOUT_MS: Final = 5_000  # WAL readers never block the writer; this only covers the CLI
# briefly holding a lock while its connection opens

MAX_BATCH_RECORDS: Final = 500  # bounds one transaction's size and its commit latency
PRUNE_CHUNK_RECORDS: Final = 2_000  # one prune transaction; appends interleave between chunks
CHECKPOINT_IDLE_COMMITS: Final = 200  # checkpoint the WAL when idle after this many commits
CHECKPOINT_FORCE_COMMITS: Final = 2_000  # …or at the latest after this many, idle or not
PROBE_BLOB_BYTES: Final = 16 * 1024  # the health probe's scratch write: a few pages, real I/O

SQLITE_READONLY: Final = 8
SQLITE_IOERR: Final = 10
SQLITE_CORRUPT: Final = 11
SQLITE_CANTOPEN: Final = 14
SQLITE_NOTADB: Final = 26
# Errors an open connection keeps repeating even once the cause is gone (a file or filesystem
# made writable again): the connection is reopened before the next try. SQLITE_FULL is not
# among them: it clears by itself when space is freed.
RECONNECT_CODES: Final = frozenset({SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN})


class Clock(Protocol):
    """Where the journal gets its times; tests inject their own."""

    def wall(self) -> datetime:
        """Wall-clock time, timezone-aware UTC (may jump: no RTC, late NTP)."""
        ...

    def monotonic_ns(self) -> int:
        """A monotonic clock in nanoseconds, as ``time.monotonic_ns``."""
        ...


class SystemClock:
    """The real clocks."""

    def wall(self) -> datetime:
        return datetime.now(UTC)

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


@dataclass(frozen=True)
class CounterMismatch:
    """A counter or level whose stored value differs from the recomputation over the records."""

    kind: str  # "counter" or "level"
    name: str
    stored: int
    recomputed: int


HealthListener = Callable[[bool, str], None]


# --------------------------------------------------------------------------------------------
# Schema and migrations (sqlite-utils). Append new migrations to ``_MIGRATION_STEPS``; never
# edit one that has shipped.


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


@functools.cache
def _migrations() -> Migrations:
    """The migration set. sqlite-utils (with click, pluggy, dateutil) is imported here, by the
    journal's thread as it opens, not at the daemon's start-up: the MDB line starts meanwhile
    (bench/footprint.py)."""
    from sqlite_utils.migrations import Migrations

    migrations = Migrations("vmc.journal")
    for name, step in _MIGRATION_STEPS:
        migrations(name=name)(step)
    return migrations


def apply_migrations(conn: sqlite3.Connection) -> int:
    """Apply pending migrations; returns the schema version (number applied). Refuses a database
    that carries migrations this version does not know (opened by a newer vmc)."""
    from sqlite_utils import Database  # here, not at start-up: see _migrations

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
    version = len(migrations.applied(db))
    # Written only on change: an up-to-date database on a read-only medium must still open.
    if conn.execute("PRAGMA user_version").fetchone()[0] != version:
        conn.execute(f"PRAGMA user_version = {version}")
    return version


# --------------------------------------------------------------------------------------------
# File helpers


def database_path(state_dir: Path) -> Path:
    """Where the journal of a state folder lives."""
    return state_dir / JOURNAL_FILE


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection (reports, CLI, verification). Never writes, never checkpoints."""
    if not path.exists():
        raise JournalError(f"no journal database at {path}")
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def integrity_problem(path: Path) -> str | None:
    """``None`` if the database passes ``PRAGMA quick_check``, else what is wrong.

    The check runs on a read-only connection: it never checkpoints the WAL into a damaged file.
    Errors other than corruption (locks, permissions) propagate: they are not a verdict on the
    file, and moving a healthy database aside on a transient error would lose J's sequence.
    """
    try:
        conn = open_readonly(path)
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc):
            return str(exc)
        raise
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id not in (0, APPLICATION_ID):
            return f"application_id 0x{app_id:08X} is not a vmc journal"
        rows = conn.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            return "; ".join(str(row[0]) for row in rows[:5])
        return None
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc):
            return str(exc)
        raise
    finally:
        conn.close()


def _link_aside(source: Path, target: Path) -> Path:
    """Move ``source`` to ``target`` (or ``target.1``, ``.2``…) without ever replacing a file:
    ``os.link`` fails if the name is taken, unlike ``rename``."""
    candidate, n = target, 0
    while True:
        try:
            os.link(source, candidate)
        except FileExistsError:
            n += 1
            candidate = target.with_name(f"{target.name}.{n}")
            continue
        os.unlink(source)
        return candidate


def move_aside(path: Path, moment: datetime) -> tuple[str, ...]:
    """Rename a damaged database and its -wal/-shm to ``<name>.corrupt-<UTC time>[-wal|-shm]``,
    keeping the three together so forensic tools can open them as a set."""
    stamp = moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = path.with_name(f"{path.name}.corrupt-{stamp}")
    kept_db = _link_aside(path, base)
    kept = [str(kept_db)]
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            kept.append(str(_link_aside(side, kept_db.with_name(kept_db.name + suffix))))
    _fsync_dir(path.parent)
    return tuple(kept)


def journal_id_marker(path: Path) -> Path:
    """The file beside the database ``path`` that records its journal id."""
    return path.with_name(path.name + JOURNAL_ID_SUFFIX)


def read_journal_id_marker(path: Path) -> str | None:
    """The journal id recorded beside the database ``path`` (None: no marker)."""
    try:
        return journal_id_marker(path).read_text().strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:  # unreadable: still evidence of a journal
        return f"unreadable marker ({exc})"


def write_journal_id_marker(path: Path, journal_id: str) -> None:
    """Record ``journal_id`` beside the database: a temporary file, fsync, rename, fsync."""
    marker = journal_id_marker(path)
    tmp = marker.with_name(marker.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, (journal_id + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, marker)
    _fsync_dir(path.parent)


def _move_orphans_aside(path: Path, sides: list[Path], moment: datetime) -> tuple[str, ...]:
    """Rename a lost database's leftover ``-wal``/``-shm`` to ``<name>.missing-<UTC time>-wal``
    (``-shm``), never over an existing file."""
    stamp = moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    kept = []
    for side in sides:
        if side.exists():
            suffix = side.name[len(path.name) :]
            target = path.with_name(f"{path.name}.missing-{stamp}{suffix}")
            kept.append(str(_link_aside(side, target)))
    _fsync_dir(path.parent)
    return tuple(kept)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_state(path: Path) -> int:
    """Take ``<journal>.lock`` exclusively: one writer per database, ever. A second daemon would
    assign the same seqs from its own memory (the primary key would refuse them, but the machine
    would be out of service); better to refuse the second one at start, clearly."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalError(
            f"the journal {path} is already open in another process (lock {lock_path})"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def free_bytes(directory: Path | int) -> int:
    """Bytes available to an unprivileged writer on the filesystem holding ``directory`` (a path
    or an open descriptor of it). Root's reserved blocks are not counted: we may run as root, but
    the reserve must hold for the system too."""
    st = os.fstatvfs(directory) if isinstance(directory, int) else os.statvfs(directory)
    return st.f_bavail * st.f_frsize


# --------------------------------------------------------------------------------------------
# Reading rows


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


# --------------------------------------------------------------------------------------------
# The writer thread


@dataclass
class _Pending:
    """A validated record waiting for its seq, with everything the writer needs precomputed
    (JSON, counter and level deltas, its intent step) so the writer thread holds the GIL as
    little as possible: less contention with the event loop."""

    type: str
    data: dict[str, Any]
    source: dict[str, str]
    id: str
    boot_id: str
    ts: str
    mono_ns: int
    data_json: str
    source_json: str
    counters: dict[str, int]
    levels: dict[str, int]
    intent_id: str | None
    intent_role: str | None

    def record(self, seq: int) -> Record:
        """The record once ``seq`` is known."""
        return Record(
            seq, self.id, self.boot_id, self.ts, self.mono_ns, self.type, self.data, self.source
        )


def make_pending(
    rtype: str, data: Mapping[str, Any], source: Mapping[str, object], boot_id: str, clock: Clock
) -> _Pending:
    """Validate a record and precompute what the writer needs (pure, apart from the clock)."""
    clean = validate(rtype, data)
    src = validate_source(source)
    draft = Record(
        0,
        str(uuid.uuid4()),
        boot_id,
        format_ts(clock.wall()),
        clock.monotonic_ns(),
        rtype,
        clean,
        src,
    )
    role = intent_role(rtype, clean)
    return _Pending(
        type=rtype,
        data=clean,
        source=src,
        id=draft.id,
        boot_id=boot_id,
        ts=draft.ts,
        mono_ns=draft.mono_ns,
        data_json=encode_json(clean),
        source_json=encode_json(src),
        counters=counter_deltas(draft),
        levels=level_deltas(draft),
        intent_id=draft.intent_id,
        intent_role=role,
    )


@dataclass
class _AppendJob:
    items: list[_Pending]
    future: asyncio.Future[int]  # the seq of the first item, once durable


@dataclass
class _CallJob:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    write: bool  # a failure makes the journal unwritable


@dataclass
class _OpenParams:
    path: Path
    boot_id: str
    version: str
    clock: Clock
    start_fresh_after_corrupt: bool


@dataclass
class _OpenResult:
    journal_id: str
    schema_version: int
    corrupt_kept: tuple[str, ...] = ()
    recovered_note: str | None = None
    pending_records: list[_Pending] = field(default_factory=list)


_STOP: Final = object()

_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


def _apply_outcomes(outcomes: list[_Outcome]) -> None:
    for future, result, exc in outcomes:
        if future.done():  # the caller gave up (cancelled or timed out)
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


class _Writer(threading.Thread):
    """Owns the read-write connection; everything that touches it runs here, in queue order."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        params: _OpenParams,
        min_free_bytes: int,
        probe_interval_s: float,
        on_health: Callable[[bool, str], None],
    ) -> None:
        super().__init__(name="vmc-journal-writer", daemon=True)
        self.loop = loop
        self.params = params
        self.path = params.path
        self.min_free_bytes = min_free_bytes
        self.probe_interval_s = probe_interval_s
        self._notify_health = on_health
        self.jobs: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.ready: asyncio.Future[_OpenResult] = loop.create_future()
        self.stopped: asyncio.Future[None] = loop.create_future()
        self.conn: sqlite3.Connection | None = None
        # State owned by this thread; the loop only reads the ints (atomic under the GIL).
        self.last_seq = 0
        self.acked_upto = 0
        self.journal_id = ""
        self.open_intents: dict[str, str] = {}
        self.pending_records: list[_Pending] = []  # boot record not yet durable (disk full)
        self.healthy = True
        self.health_reason = "ok"
        self._health_lock = threading.Lock()
        self._lookahead: object | None = None
        self._commits_since_checkpoint = 0
        self.commits = 0  # append transactions committed (records per commit shows batching)
        self._unwritable_log = FailureLog(log)
        self._dir_fd: int | None = None  # the state folder, for fstatvfs before each batch
        self._reconnect_needed = False
        self._lock_fd: int | None = None  # flock held while this writer owns the database

    # -- plumbing ---------------------------------------------------------------------------

    def _settle(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        self._settle_all([(future, result, exc)])

    def _settle_all(self, outcomes: list[_Outcome]) -> None:
        """Resolve futures on the loop: one wake-up of the loop per batch, not per caller."""
        if not outcomes:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody waits
            self.loop.call_soon_threadsafe(_apply_outcomes, outcomes)

    def set_health(self, ok: bool, reason: str) -> None:
        """Record the health; listeners hear about changes only (on the loop)."""
        with self._health_lock:
            changed = ok != self.healthy
            self.healthy, self.health_reason = ok, reason
        if ok:
            self._unwritable_log.recovered("journal writable again")
        else:
            self._unwritable_log.failed(
                "journal unwritable, money must not be taken", reason=reason
            )
        if not changed:
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._notify_health, ok, reason)

    def _next_job(self) -> object:
        if self._lookahead is not None:
            job, self._lookahead = self._lookahead, None
            return job
        while True:
            try:
                return self.jobs.get(timeout=self.probe_interval_s)
            except queue.Empty:
                if self.healthy:
                    self._watch_reserve()
                else:
                    self._probe()

    # -- thread body ------------------------------------------------------------------------

    def run(self) -> None:
        failure: BaseException | None = None
        try:
            try:
                result = self._open()
            except (OSError, sqlite3.Error) as exc:
                error = JournalError(f"cannot open the journal {self.path}: {exc}")
                error.__cause__ = exc
                self._release()  # before the caller hears of it: it may open again at once
                self._settle(self.ready, None, error)
                return
            except BaseException as exc:
                self._release()
                self._settle(self.ready, None, exc)
                return
            self._settle(self.ready, result, None)
            while True:
                job = self._next_job()
                if job is _STOP:
                    break
                if isinstance(job, _AppendJob):
                    batch = [job]
                    count = len(job.items)
                    while count < MAX_BATCH_RECORDS:
                        try:
                            more = self.jobs.get_nowait()
                        except queue.Empty:
                            break
                        if isinstance(more, _AppendJob):
                            batch.append(more)
                            count += len(more.items)
                        else:
                            self._lookahead = more
                            break
                    self._commit(batch)
                elif isinstance(job, _CallJob):
                    self._call(job)
                self._maybe_checkpoint()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            failure = exc
            log.exception("journal writer thread failed")
            self.set_health(False, f"journal writer stopped: {exc!r}")
        finally:
            self._shutdown(failure)

    def _shutdown(self, failure: BaseException | None) -> None:
        closed = JournalClosed(
            "journal closed" if failure is None else f"journal failed: {failure}"
        )
        leftovers = [self._lookahead] if self._lookahead is not None else []
        self._lookahead = None
        while True:
            try:
                leftovers.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        for job in leftovers:
            if isinstance(job, _AppendJob | _CallJob):
                self._settle(job.future, None, closed)
        self._release()
        self._settle(self.stopped, None, None)

    def _release(self) -> None:
        """Close the database, the folder descriptor and the lock. Idempotent."""
        if self.conn is not None:
            try:
                self.conn.close()  # the last connection out checkpoints the WAL
            except sqlite3.Error as exc:
                log.warning("closing the journal database failed: %s", exc)
            self.conn = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- opening ----------------------------------------------------------------------------

    def _open(self) -> _OpenResult:
        params = self.params
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_state(path)
        kept: tuple[str, ...] = ()
        if path.exists() and path.stat().st_size > 0:
            problem = integrity_problem(path)
            if problem is not None:
                kept = move_aside(path, params.clock.wall())
                message = (
                    f"journal database {path} is damaged ({problem}); it was kept as "
                    f"{kept[0]} and nothing was written over it"
                )
                log.error("%s", message)
                if not params.start_fresh_after_corrupt:
                    raise JournalCorrupt(message, kept)
        fresh = not path.exists() or path.stat().st_size == 0
        earlier = sorted(
            str(p)
            for p in path.parent.glob(f"{path.name}.corrupt-*")
            if not p.name.endswith(("-wal", "-shm"))
        )
        previous_id = read_journal_id_marker(path) if fresh else None
        orphans: tuple[str, ...] = ()
        if fresh:
            # A -wal/-shm without its database: what is left of a lost journal. SQLite would
            # overwrite it; keep it for forensics instead, as a damaged database is kept.
            sides = [path.with_name(path.name + sfx) for sfx in ("-wal", "-shm")]
            if any(side.exists() for side in sides):
                orphans = _move_orphans_aside(path, sides, params.clock.wall())
        self.conn = self._connect(fresh=fresh)
        version = apply_migrations(self.conn)
        self._reload_state()
        result = _OpenResult(journal_id=self.journal_id, schema_version=version, corrupt_kept=kept)
        boot = self._pending("boot", {"version": params.version})
        self.pending_records = [boot]
        if fresh:
            log.warning(
                "new journal created",
                extra={"journal_id": self.journal_id, "database": str(path)},
            )
        evidence = [*orphans, *(kept or earlier)]
        if fresh and (previous_id or orphans) and not kept:
            log.error(
                "previous journal is missing",
                extra={
                    "journal_id": self.journal_id,
                    "previous_journal_id": previous_id or "",
                    "evidence": [str(journal_id_marker(path))] * bool(previous_id) + evidence,
                    "hint": "restore the database from a backup if there is one; the backend "
                    "sees a new journal id and a sequence starting again at 1",
                },
            )
        if fresh and (kept or earlier or previous_id or orphans):
            if kept or earlier:
                note = (
                    "new journal database; damaged earlier database kept as "
                    + (kept or earlier)[-1]
                )
            else:
                note = "new journal database; the previous one is missing"
            if previous_id:
                note += f" (previous journal {previous_id})"
            if orphans:
                note += f"; its leftover files kept as {orphans[0]}"
            result.recovered_note = note
            self.pending_records.append(
                self._pending(
                    "device", {"device": "journal", "state": "recovered", "detail": note[:200]}
                )
            )
        if read_journal_id_marker(path) != self.journal_id:
            try:
                write_journal_id_marker(path, self.journal_id)
            except OSError as exc:  # a full or read-only disk: the journal still opens
                log.warning("journal id marker not written: %s", exc)
        # The boot record goes first; if the disk is full it stays pending and the journal opens
        # unwritable (the machine then stays out of service until writing works again).
        self._commit([])
        return result

    def _connect(self, *, fresh: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=True)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if fresh:
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"journal {self.path} cannot use WAL (journal_mode={mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints run when idle, see below
        except BaseException:
            conn.close()
            raise
        return conn

    def _reload_state(self) -> None:
        """Read seq, acks and open intents from the database (at open, and after reconnecting:
        a commit that reported an I/O error may still have landed)."""
        conn = self.conn
        assert conn is not None
        journal_id, state_last, acked = conn.execute(
            "SELECT journal_id, last_seq, acked_upto FROM state WHERE id = 1"
        ).fetchone()
        max_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]
        # last_seq is only persisted when pruning; otherwise the records are the truth.
        last_seq = max(int(state_last), int(max_seq))
        if self.last_seq and last_seq != self.last_seq:
            log.warning("journal seq moved from %d to %d on reconnect", self.last_seq, last_seq)
        self.last_seq = last_seq
        self.acked_upto = min(int(acked), self.last_seq)
        self.journal_id = str(journal_id)
        self.open_intents = {
            str(i): str(t) for i, t in conn.execute("SELECT intent_id, type FROM pending_intents")
        }

    def _connection(self) -> sqlite3.Connection:
        """The connection, reopened first if the last failure was a database error: a file
        made read-only (or a remounted filesystem) stays read-only for an open connection."""
        if self.conn is not None and not self._reconnect_needed:
            return self.conn
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
            self.conn = None
        try:
            self.conn = self._connect()
            self._reload_state()
        except sqlite3.Error as exc:
            if self.conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.close()
                self.conn = None
            raise JournalUnavailable(f"journal database cannot be reopened: {exc}") from exc
        self._reconnect_needed = False
        return self.conn

    def _pending(self, rtype: str, data: dict[str, Any]) -> _Pending:
        return make_pending(rtype, data, LOCAL, self.params.boot_id, self.params.clock)

    # -- appending --------------------------------------------------------------------------

    def _free(self) -> int:
        if self._dir_fd is None:
            self._dir_fd = os.open(self.path.parent, os.O_RDONLY)
        return free_bytes(self._dir_fd)

    def _reserve_problem(self, free: int) -> str | None:
        if free >= self.min_free_bytes:
            return None
        return (
            f"free space {free} B on {self.path.parent} is below the reserve of "
            f"{self.min_free_bytes} B"
        )

    def _check_space(self) -> int:
        """Free bytes; raises JournalUnavailable below the floor (a quarter of the reserve).
        Between the floor and the reserve, records are still written (the money already on
        its way in must be recorded) but the journal reports itself unwritable, so the
        machine stops taking more."""
        try:
            free = self._free()
        except OSError as exc:
            raise JournalUnavailable(f"free space of {self.path.parent} unknown: {exc}") from exc
        if free < self.min_free_bytes // RESERVE_FLOOR_DIVISOR:
            raise JournalUnavailable(
                f"{self._reserve_problem(free)}; refusing to write below "
                f"{self.min_free_bytes // RESERVE_FLOOR_DIVISOR} B"
            )
        return free

    def _watch_reserve(self) -> None:
        """While idle and writable: notice the reserve being reached before any append does."""
        try:
            problem = self._reserve_problem(self._free())
        except OSError as exc:
            problem = f"free space of {self.path.parent} unknown: {exc}"
        if problem is not None:
            self.set_health(False, problem)

    def _intent_used(self, intent_id: str) -> bool:
        assert self.conn is not None
        marks = ",".join("?" * len(INTENT_TYPES))
        row = self.conn.execute(
            f"SELECT 1 FROM records WHERE intent_id = ? AND type IN ({marks}) LIMIT 1",
            (intent_id, *sorted(INTENT_TYPES)),
        ).fetchone()
        return row is not None

    def _admit(self, batch: list[_AppendJob]) -> tuple[list[_AppendJob], dict[str, str]]:
        """Check each job's intent steps in order on a working copy; refuse a job as a whole
        (append_many is all-or-nothing) without touching the others."""
        working = dict(self.open_intents)
        opened_here: set[str] = set()  # ids opened earlier in this batch, not yet committed
        admitted = []
        for job in batch:
            trial = dict(working)
            trial_opened = set(opened_here)
            try:
                for item in job.items:
                    if item.intent_role == "open":
                        intent_id = str(item.intent_id)
                        if intent_id in trial_opened or self._intent_used(intent_id):
                            raise IntentError(item.type, "intent_id", f"{intent_id} used before")
                        trial_opened.add(intent_id)
                    if item.intent_role is not None:
                        check_intent_step(item.type, item.data, trial)
            except IntentError as exc:
                self._settle(job.future, None, exc)
                continue
            working, opened_here = trial, trial_opened
            admitted.append(job)
        return admitted, working

    def _commit(self, batch: list[_AppendJob]) -> None:
        try:
            free = self._check_space()
            conn = self._connection()
        except JournalUnavailable as exc:
            self._fail_batch(batch, exc)
            return
        try:
            admitted, working = self._admit(batch)
        except sqlite3.Error as exc:  # the duplicate-intent lookup is a read; it can fail too
            self._reconnect_needed |= _primary_code(exc) in RECONNECT_CODES
            self._fail_batch(batch, JournalUnavailable(f"journal read failed: {exc}"), exc)
            return
        pendings = list(self.pending_records)
        for job in admitted:
            pendings.extend(job.items)
        if not pendings:
            return
        first = self.last_seq + 1
        rows = []
        counters: dict[str, int] = {}
        levels: dict[str, int] = {}
        opened: list[tuple[str, int, str]] = []
        closed: list[tuple[str]] = []
        for seq, p in enumerate(pendings, start=first):
            rows.append(
                (
                    seq,
                    p.id,
                    p.boot_id,
                    p.ts,
                    p.mono_ns,
                    p.type,
                    p.intent_id,
                    p.data_json,
                    p.source_json,
                )
            )
            merge_deltas(counters, p.counters)
            merge_deltas(levels, p.levels)
            if p.intent_role == "open":
                opened.append((str(p.intent_id), seq, p.type))
            elif p.intent_role in ("close", "resolve"):
                closed.append((str(p.intent_id),))
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO records (seq, id, boot_id, ts, mono_ns, type, intent_id, data,"
                    " source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                # Order matters when one batch opens and closes the same intent.
                for intent_id, seq, rtype in opened:
                    conn.execute(
                        "INSERT INTO pending_intents (intent_id, seq, type) VALUES (?, ?, ?)",
                        (intent_id, seq, rtype),
                    )
                if closed:
                    conn.executemany("DELETE FROM pending_intents WHERE intent_id = ?", closed)
                self._add_totals(conn, "counters", counters)
                self._add_totals(conn, "levels", levels)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._reconnect_needed |= _primary_code(exc) in RECONNECT_CODES
            self._fail_batch(admitted, JournalUnavailable(f"journal write failed: {exc}"), exc)
            return
        self.last_seq = first + len(pendings) - 1
        self.open_intents = working
        self.pending_records = []
        self._commits_since_checkpoint += 1
        self.commits += 1
        problem = self._reserve_problem(free)
        self.set_health(problem is None, problem or "ok")
        seq = self.last_seq + 1 - sum(len(job.items) for job in admitted)
        outcomes: list[_Outcome] = []
        for job in admitted:
            outcomes.append((job.future, seq, None))
            seq += len(job.items)
        self._settle_all(outcomes)

    @staticmethod
    def _add_totals(conn: sqlite3.Connection, table: str, deltas: Mapping[str, int]) -> None:
        if deltas:
            conn.executemany(
                f"INSERT INTO {table} (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                sorted(deltas.items()),
            )

    def _fail_batch(
        self,
        batch: Iterable[_AppendJob],
        exc: JournalUnavailable,
        cause: BaseException | None = None,
    ) -> None:
        if cause is not None:
            exc.__cause__ = cause
        # Logged once, as the journal's health (WARNING first, then DEBUG, INFO when it works).
        self.set_health(False, str(exc))
        self._settle_all([(job.future, None, exc) for job in batch])

    # -- other work -------------------------------------------------------------------------

    def _call(self, job: _CallJob) -> None:
        try:
            conn = self._connection()
        except JournalUnavailable as exc:
            self._settle(job.future, None, exc)
            return
        try:
            result = job.fn(conn)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if job.write:
                self._reconnect_needed |= _primary_code(exc) in RECONNECT_CODES
                error: BaseException = JournalUnavailable(f"journal write failed: {exc}")
                self.set_health(False, str(error))
            else:
                error = JournalError(f"journal read failed: {exc}")
            error.__cause__ = exc
            self._settle(job.future, None, error)
        except Exception as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._settle(job.future, None, exc)
        else:
            self._settle(job.future, result, None)

    def _probe(self) -> None:
        """While unwritable: try a small real write; success flips the health back."""
        if self.pending_records:
            self._commit([])  # the boot record doubles as the probe
            return
        try:
            problem = self._reserve_problem(self._check_space())
            if problem is not None:
                raise JournalUnavailable(problem)
            conn = self._connection()
            for statement in (
                "INSERT OR REPLACE INTO scratch (id, payload) VALUES (1, zeroblob(?))",
                "DELETE FROM scratch",
            ):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if "?" in statement:
                        conn.execute(statement, (PROBE_BLOB_BYTES,))
                    else:
                        conn.execute(statement)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            self._reconnect_needed |= _primary_code(exc) in RECONNECT_CODES
            self.set_health(False, f"journal write failed: {exc}")
            return
        except JournalUnavailable as exc:
            self.set_health(False, str(exc))
            return
        self.set_health(True, "ok")

    def _maybe_checkpoint(self) -> None:
        """Copy the WAL back into the database when there is nothing else to do, so checkpoint
        time is not added to an append (and the WAL does not grow without end under load)."""
        n = self._commits_since_checkpoint
        if n < CHECKPOINT_IDLE_COMMITS or self.conn is None:
            return
        if n < CHECKPOINT_FORCE_COMMITS and (self._lookahead is not None or not self.jobs.empty()):
            return
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self._commits_since_checkpoint = 0
        except sqlite3.Error as exc:
            log.debug("WAL checkpoint failed: %s", exc)


# --------------------------------------------------------------------------------------------
# The public face


def _silence_unretrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _default_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vmc")
    except PackageNotFoundError:
        return "0+unknown"


class Journal:
    """The transaction journal: durable, gap-free, crash-safe record of every money movement.

    Open with ``await Journal.open(state_dir)``; close with ``await journal.close()`` (or use it
    as an async context manager). All SQLite work runs on one writer thread.
    """

    def __init__(self, writer: _Writer, opened: _OpenResult, clock: Clock) -> None:
        self._writer = writer
        self._opened = opened
        self._clock = clock
        self._listeners: list[HealthListener] = []
        self._append_listeners: list[Callable[[int], None]] = []
        self._closed = False
        self._wire_reader: _WireReader | None = None

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        state_dir: Path,
        *,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        clock: Clock | None = None,
        start_fresh_after_corrupt: bool = False,
        version: str | None = None,
        probe_interval_s: float = HEALTH_PROBE_INTERVAL_S,
        retention_days: int | None = None,
    ) -> Journal:
        """Open (or create) ``state_dir/journal.sqlite3``, apply migrations, start this run's
        ``boot_id`` and append its ``boot`` record.

        Raises JournalCorrupt (file moved aside) unless ``start_fresh_after_corrupt``, in which
        case a new database with a new journal id is started after moving the damaged one aside.
        If the boot record cannot be written (disk full), the journal opens unwritable and
        writes it first when writing works again. With ``retention_days``, old acknowledged
        records are pruned right after opening (the daemon also calls :meth:`prune` daily).
        """
        loop = asyncio.get_running_loop()
        clock = clock or SystemClock()
        params = _OpenParams(
            path=database_path(Path(state_dir)),
            boot_id=str(uuid.uuid4()),
            version=version if version is not None else _default_version(),
            clock=clock,
            start_fresh_after_corrupt=start_fresh_after_corrupt,
        )
        holder: list[Journal] = []

        def health_changed(ok: bool, reason: str) -> None:
            if holder:
                holder[0]._notify(ok, reason)

        writer = _Writer(loop, params, min_free_bytes, probe_interval_s, health_changed)
        writer.ready.add_done_callback(_silence_unretrieved)  # if we stop waiting for it
        writer.start()
        try:
            opened = await asyncio.wait_for(asyncio.shield(writer.ready), T_OPEN_S)
        except TimeoutError:
            writer.jobs.put(_STOP)
            raise JournalUnavailable(f"opening the journal took longer than {T_OPEN_S} s") from None
        except asyncio.CancelledError:
            writer.jobs.put(_STOP)  # the writer closes the database once it has opened it
            raise
        journal = cls(writer, opened, clock)
        holder.append(journal)
        if retention_days is not None:
            try:
                await journal.prune(clock.wall(), retention_days)
            except JournalUnavailable as exc:  # not a reason to refuse to start
                log.warning("pruning at open failed: %s", exc)
        return journal

    async def close(self) -> None:
        """Finish queued writes, then close the database. Idempotent."""
        if self._closed:
            return
        self._closed = True
        reader, self._wire_reader = self._wire_reader, None
        if reader is not None:  # after its read in progress, if any
            await asyncio.get_running_loop().run_in_executor(reader.pool, reader.close)
            reader.pool.shutdown(wait=False)
        self._writer.jobs.put(_STOP)
        try:
            await asyncio.wait_for(asyncio.shield(self._writer.stopped), T_CLOSE_S)
        except TimeoutError:
            log.error("journal writer did not stop within %s s", T_CLOSE_S)

    async def __aenter__(self) -> Journal:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- identity and state -----------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The database file."""
        return self._writer.path

    @property
    def journal_id(self) -> str:
        """J: created with the database, sent with every batch of records."""
        return self._opened.journal_id

    @property
    def boot_id(self) -> str:
        """This run's id, in every record it appends."""
        return self._writer.params.boot_id

    @property
    def schema_version(self) -> int:
        """Number of schema migrations applied."""
        return self._opened.schema_version

    @property
    def corrupt_kept(self) -> tuple[str, ...]:
        """Files of a damaged database moved aside by this open (start_fresh_after_corrupt)."""
        return self._opened.corrupt_kept

    @property
    def last_seq(self) -> int:
        """The seq of the last durable record."""
        return self._writer.last_seq

    @property
    def acked_upto(self) -> int:
        """Every record with seq <= this is stored by the backend."""
        return self._writer.acked_upto

    @property
    def backlog(self) -> int:
        """Records not yet acknowledged (seq is gap-free, so a difference suffices)."""
        return self._writer.last_seq - self._writer.acked_upto

    @property
    def commit_count(self) -> int:
        """Append transactions committed by this run (fewer than appends under group commit)."""
        return self._writer.commits

    @property
    def writable(self) -> bool:
        """False while records cannot be made durable; the machine must not take money."""
        return self._writer.healthy and not self._closed

    @property
    def health_reason(self) -> str:
        """Why the journal is unwritable ("ok" when it is writable)."""
        return self._writer.health_reason

    @property
    def min_free_bytes(self) -> int:
        """The free-space reserve below which appends are refused."""
        return self._writer.min_free_bytes

    @min_free_bytes.setter
    def min_free_bytes(self, value: int) -> None:
        self._writer.min_free_bytes = value

    def on_health(self, callback: HealthListener) -> Callable[[], None]:
        """Call ``callback(writable, reason)`` on the event loop at every change of
        :attr:`writable` (read the attribute for the current state). Returns an unsubscribe."""
        self._listeners.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return remove

    def on_append(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(last_seq)`` on the event loop after each append (or batch) became
        durable: the cloud sync sends new records at once. Returns an unsubscribe."""
        self._append_listeners.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._append_listeners.remove(callback)

        return remove

    def _appended(self, future: asyncio.Future[int]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        for callback in list(self._append_listeners):
            try:
                callback(self._writer.last_seq)
            except Exception:
                log.exception("journal append listener failed")

    def _notify(self, ok: bool, reason: str) -> None:
        for callback in list(self._listeners):
            try:
                callback(ok, reason)
            except Exception:
                log.exception("journal health listener failed")

    # -- writing ----------------------------------------------------------------------------

    def _prepare(self, rtype: str, data: Mapping[str, Any], source: Source) -> _Pending:
        return make_pending(rtype, data, source, self.boot_id, self._clock)

    async def append(self, type: str, data: Mapping[str, Any], *, source: Source = LOCAL) -> Record:
        """Append one record; returns once it is durable. Raises RecordInvalid/IntentError (the
        record is wrong), JournalUnavailable (cannot be made durable now; nothing was written)
        or JournalClosed. Cancelling the caller does not withdraw a record already queued."""
        records = await self._submit([self._prepare(type, data, source)])
        return records[0]

    async def append_many(
        self, items: Sequence[tuple[str, Mapping[str, Any]]], *, source: Source = LOCAL
    ) -> list[Record]:
        """Append several records atomically (one transaction, consecutive seqs)."""
        if not items:
            return []
        return await self._submit([self._prepare(t, d, source) for t, d in items])

    async def _submit(self, items: list[_Pending]) -> list[Record]:
        if self._closed or not self._writer.is_alive():
            raise JournalClosed("journal is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        if self._append_listeners:
            future.add_done_callback(self._appended)  # also when the caller is cancelled
        self._writer.jobs.put(_AppendJob(items, future))
        # A plain timer instead of wait_for(shield(...)): this is the hot path. Cancelling the
        # caller cancels only this future; the writer still commits what it already took.
        timer = loop.call_later(T_COMMIT_S, self._commit_overdue, future)
        try:
            first = await future
        finally:
            timer.cancel()
        return [item.record(seq) for seq, item in enumerate(items, start=first)]

    def _commit_overdue(self, future: asyncio.Future[int]) -> None:
        if future.done():
            return
        # The commit may still land later; the machine stops taking money meanwhile.
        reason = f"journal commit took longer than {T_COMMIT_S} s"
        self._writer.set_health(False, reason)
        future.set_exception(JournalUnavailable(reason))

    async def _call(
        self, fn: Callable[[sqlite3.Connection], T], *, write: bool, limit_s: float = T_CALL_S
    ) -> T:
        if self._closed or not self._writer.is_alive():
            raise JournalClosed("journal is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_silence_unretrieved)
        self._writer.jobs.put(_CallJob(fn, future, write))
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit_s)
        except TimeoutError:
            raise JournalUnavailable(f"journal did not answer within {limit_s} s") from None

    async def _call_writer(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Test hook: run ``fn`` on the writer's own connection (e.g. ``PRAGMA max_page_count``,
        ``PRAGMA query_only``), in queue order."""
        return await self._call(fn, write=False)

    # -- sync state -------------------------------------------------------------------------

    async def unacked(self, limit: int = 500) -> list[Record]:
        """Records from the first unacknowledged seq, ascending, at most ``limit``."""

        def read(conn: sqlite3.Connection) -> list[Record]:
            rows = conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                (self._writer.acked_upto, limit),
            ).fetchall()
            return [record_from_row(row) for row in rows]

        return await self._call(read, write=False)

    async def ack(self, journal_id: str, upto: int) -> bool:
        """Apply a cumulative ack. A stale, repeated, foreign-journal or beyond-the-last-seq
        ack changes nothing and returns False."""

        def apply(conn: sqlite3.Connection) -> bool:
            writer = self._writer
            if journal_id != writer.journal_id or not writer.acked_upto < upto <= writer.last_seq:
                return False
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE state SET acked_upto = ? WHERE id = 1", (upto,))
            conn.execute("COMMIT")
            writer.acked_upto = upto
            return True

        if isinstance(upto, bool) or not isinstance(upto, int):
            return False
        return await self._call(apply, write=True)

    # -- reading ----------------------------------------------------------------------------

    async def records(self, since_seq: int = 1, limit: int = 1000) -> list[Record]:
        """Retained records with ``seq >= since_seq``, ascending."""

        def read(conn: sqlite3.Connection) -> list[Record]:
            rows = conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM records WHERE seq >= ? ORDER BY seq LIMIT ?",
                (since_seq, limit),
            ).fetchall()
            return [record_from_row(row) for row in rows]

        return await self._call(read, write=False)

    async def wire_batch(self, from_seq: int, max_records: int, max_bytes: int) -> WireBatch | None:
        """The cloud sync's read: records from ``from_seq`` in ascending seq, at most
        ``max_records`` and at most ``max_bytes`` of comma-joined wire JSON (a first record
        larger than that comes alone), each exactly ``encode_json(record.to_wire())``. None when
        there is no such record. SQLite builds the bytes on a read-only connection on a thread
        of its own (see :class:`_WireReader`); records not yet durable are not seen."""
        if self._closed:
            raise JournalClosed("journal is closed")
        reader = self._wire_reader
        if reader is None:
            reader = self._wire_reader = _WireReader(self.path)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                reader.pool, reader.read, from_seq, max_records, max_bytes
            )
        except sqlite3.Error as exc:
            raise JournalUnavailable(f"journal read failed: {exc}") from exc

    async def records_for_intent(self, intent_id: str) -> list[Record]:
        """Every retained record naming ``intent_id``, ascending."""

        def read(conn: sqlite3.Connection) -> list[Record]:
            rows = conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM records WHERE intent_id = ? ORDER BY seq",
                (intent_id,),
            ).fetchall()
            return [record_from_row(row) for row in rows]

        return await self._call(read, write=False)

    async def open_intents(self) -> list[Record]:
        """Intents (vend_intent, payout_intent, escrow_decision) without an outcome, by seq."""

        def read(conn: sqlite3.Connection) -> list[Record]:
            rows = conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM records WHERE seq IN "
                "(SELECT seq FROM pending_intents) ORDER BY seq"
            ).fetchall()
            return [record_from_row(row) for row in rows]

        return await self._call(read, write=False)

    async def counters(self) -> dict[str, int]:
        """Lifetime counters (never decrease)."""
        return await self._call(lambda conn: read_table(conn, "counters"), write=False)

    async def levels(self) -> dict[str, int]:
        """Device levels the records imply: coins per tube, bills in the stacker, stock."""
        return await self._call(lambda conn: read_table(conn, "levels"), write=False)

    async def verify_counters(self) -> list[CounterMismatch]:
        """Recompute counters and levels from the pruned baseline plus every record, on a
        separate read-only connection (one snapshot), and list what differs."""

        def verify() -> list[CounterMismatch]:
            conn = open_readonly(self.path)
            try:
                conn.execute("BEGIN")  # one read snapshot for tables and records alike
                counters, levels = recompute_totals(conn)
                stored_counters = read_table(conn, "counters")
                stored_levels = read_table(conn, "levels")
                conn.execute("COMMIT")
            finally:
                conn.close()
            return compare_totals(stored_counters, counters, "counter") + compare_totals(
                stored_levels, levels, "level"
            )

        return await asyncio.wait_for(asyncio.to_thread(verify), T_OPEN_S)

    # -- retention --------------------------------------------------------------------------

    async def prune(self, now: datetime, retention_days: int) -> int:
        """Delete acknowledged records whose wall time is older than ``retention_days`` before
        ``now``; never an unacknowledged record, never an open intent. Their counter and level
        contributions move into the baseline in the same transaction. Works in chunks so appends
        are not held up. Returns how many records were deleted. Runs even below the free-space
        reserve (it is what frees space)."""
        if retention_days < 0:
            raise ValueError("retention_days must be >= 0")
        cutoff = format_ts(now - timedelta(days=retention_days))

        def chunk(conn: sqlite3.Connection, low: int, high: int) -> int:
            rows = conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM records WHERE seq BETWEEN ? AND ? AND ts < ? "
                "AND seq NOT IN (SELECT seq FROM pending_intents) ORDER BY seq",
                (low, high, cutoff),
            ).fetchall()
            if not rows:
                return 0
            counters: dict[str, int] = {}
            levels: dict[str, int] = {}
            for row in rows:
                record = record_from_row(row)
                merge_deltas(counters, counter_deltas(record))
                merge_deltas(levels, level_deltas(record))
            conn.execute("BEGIN IMMEDIATE")
            try:
                upsert = (
                    "INSERT INTO baseline (kind, name, value) VALUES (?, ?, ?) "
                    "ON CONFLICT(kind, name) DO UPDATE SET value = value + excluded.value"
                )
                conn.executemany(upsert, [("counter", n, v) for n, v in counters.items()])
                conn.executemany(upsert, [("level", n, v) for n, v in levels.items()])
                conn.executemany("DELETE FROM records WHERE seq = ?", [(row[0],) for row in rows])
                # Keep the highest seq ever used, so it is never reused once records are gone.
                conn.execute(
                    "UPDATE state SET last_seq = MAX(last_seq, ?) WHERE id = 1",
                    (self._writer.last_seq,),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return len(rows)

        def first_seq(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COALESCE(MIN(seq), 0) FROM records").fetchone()[0])

        low = await self._call(first_seq, write=False)
        upto = self._writer.acked_upto
        deleted = 0
        if low == 0:
            return 0
        while low <= upto:
            high = min(low + PRUNE_CHUNK_RECORDS - 1, upto)
            deleted += await self._call(functools.partial(chunk, low=low, high=high), write=True)
            low = high + 1
        if deleted:
            log.info("journal pruned %d acknowledged records older than %s", deleted, cutoff)
        return deleted
