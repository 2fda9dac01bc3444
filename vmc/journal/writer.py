"""The journal's writer thread: the one read-write connection, group commit, the jobs the event
loop hands it, the health probe while storage is unwritable, and WAL checkpoints.

Every write goes through this single dedicated thread, so the event loop never waits on SQLite
or fsync, and ``seq`` can be assigned from memory without races. Appends that arrive while a
commit (and its fsync) is in progress are batched into the next ``BEGIN IMMEDIATE … COMMIT``: one
fsync for the whole batch, each caller's future resolved once its batch is durable
(``journal_mode=WAL``, ``synchronous=FULL``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from vmc.journal.clock import Clock
from vmc.journal.files import (
    APPLICATION_ID,
    BUSY_TIMEOUT_MS,
    SQLITE_CANTOPEN,
    SQLITE_IOERR,
    SQLITE_READONLY,
    _lock_state,
    _move_orphans_aside,
    _primary_code,
    free_bytes,
    integrity_problem,
    journal_id_marker,
    move_aside,
    read_journal_id_marker,
    write_journal_id_marker,
    write_transaction,
)
from vmc.journal.records import (
    INTENT_TYPES,
    LOCAL,
    IntentError,
    JournalClosed,
    JournalCorrupt,
    JournalError,
    JournalUnavailable,
    Record,
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
from vmc.journal.schema import apply_migrations
from vmc.log import FailureLog

log = logging.getLogger("vmc.journal")

RESERVE_FLOOR_DIVISOR: Final = 4  # appends are refused only below a quarter of the reserve: the
# rest of the reserve records the money already on its way in when the machine stops taking it

MAX_BATCH_RECORDS: Final = 500  # bounds one transaction's size and its commit latency
CHECKPOINT_IDLE_COMMITS: Final = 200  # checkpoint the WAL when idle after this many commits
CHECKPOINT_FORCE_COMMITS: Final = 2_000  # …or at the latest after this many, idle or not
PROBE_BLOB_BYTES: Final = 16 * 1024  # the health probe's scratch write: a few pages, real I/O

# Errors an open connection keeps repeating even once the cause is gone (a file or filesystem
# made writable again): the connection is reopened before the next try. SQLITE_FULL is not
# among them: it clears by itself when space is freed.
RECONNECT_CODES: Final = frozenset({SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN})


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
            with write_transaction(conn):
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
                with write_transaction(conn):
                    if "?" in statement:
                        conn.execute(statement, (PROBE_BLOB_BYTES,))
                    else:
                        conn.execute(statement)
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
