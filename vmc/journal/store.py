"""The journal's public face: ``Journal``, its async API on the event loop.

``Journal`` hands every SQLite job to the writer thread (``writer.py``) and waits for it with the
timeouts below, so the event loop never waits on SQLite or fsync. The schema is in
``schema.py``, the database files in ``files.py``, the row readers in ``reading.py`` and the
clocks in ``clock.py``.

See ``docs/journal.md`` for the recovery policy, the record types and the disk-full behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

from vmc.journal.clock import Clock, SystemClock
from vmc.journal.files import database_path, open_readonly, write_transaction
from vmc.journal.reading import (
    RECORD_COLUMNS,
    CounterMismatch,
    WireBatch,
    _WireReader,
    compare_totals,
    read_table,
    recompute_totals,
    record_from_row,
)
from vmc.journal.records import (
    LOCAL,
    JournalClosed,
    JournalUnavailable,
    Record,
    Source,
    counter_deltas,
    format_ts,
    level_deltas,
    merge_deltas,
)
from vmc.journal.writer import (
    _STOP,
    _AppendJob,
    _CallJob,
    _OpenParams,
    _OpenResult,
    _Pending,
    _Writer,
    make_pending,
)

log = logging.getLogger("vmc.journal")

T = TypeVar("T")

DEFAULT_MIN_FREE_BYTES: Final = 20 * 1024 * 1024  # issue 3: stop taking money below 20 MiB free
HEALTH_PROBE_INTERVAL_S: Final = 5.0  # retry a write this often while unwritable; a person
# clearing a full disk waits at most this long, and a failing SD card is not hammered

# Timeouts on the writer thread. SD cards and eMMC stall for seconds during their own garbage
# collection; beyond these the storage is treated as unavailable rather than waited on.
T_COMMIT_S: Final = 15.0  # one append or batch: commit + fsync
T_CALL_S: Final = 60.0  # other writer work: an ack, a read, one prune chunk
T_OPEN_S: Final = 300.0  # integrity check of the whole file + migrations, at start only
T_CLOSE_S: Final = 30.0  # finish queued writes and close the connection
PRUNE_CHUNK_RECORDS: Final = 2_000  # one prune transaction; appends interleave between chunks

HealthListener = Callable[[bool, str], None]


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
            with write_transaction(conn):
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
