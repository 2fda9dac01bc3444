"""The journal store on real SQLite files: seq, durability, group commit, acks, retention."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.test_journal_support import (
    PYTHON,
    FakeClock,
    coin_in,
    sale,
    subprocess_env,
    vend_intent,
)
from vmc.journal import (
    IntentError,
    Journal,
    JournalClosed,
    JournalError,
    RecordInvalid,
    SchemaTooNew,
    console_source,
    remote_source,
)
from vmc.journal.files import database_path, open_readonly
from vmc.journal.schema import MIGRATION_NAMES
from vmc.journal.writer import MAX_BATCH_RECORDS


async def _all_seqs(journal: Journal) -> list[int]:
    return [r.seq for r in await journal.records(1, 1_000_000)]


async def test_open_creates_a_wal_database_with_a_journal_id_and_a_boot_record(
    tmp_path: Path,
) -> None:
    journal = await Journal.open(tmp_path, version="1.2.3")
    try:
        assert len(journal.journal_id) == 32
        int(journal.journal_id, 16)
        assert journal.schema_version == len(MIGRATION_NAMES) == 2
        assert journal.last_seq == 1 and journal.writable
        (boot,) = await journal.records()
        assert (boot.seq, boot.type, boot.data) == (1, "boot", {"version": "1.2.3"})
        assert boot.boot_id == journal.boot_id
        sync = await journal._call_writer(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        assert sync == 2  # FULL
    finally:
        await journal.close()
    conn = open_readonly(database_path(tmp_path))
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        conn.close()


async def test_reopen_keeps_journal_id_and_continues_seq_with_a_new_boot(tmp_path: Path) -> None:
    first = await Journal.open(tmp_path)
    record = await first.append("cash_in", coin_in(), source=console_source("ann"))
    await first.close()
    second = await Journal.open(tmp_path)
    try:
        assert second.journal_id == first.journal_id
        assert second.boot_id != first.boot_id
        records = await second.records()
        assert [r.seq for r in records] == [1, 2, 3]
        assert records[1] == record  # byte for byte what the caller was given
        assert records[1].source == {"kind": "console", "user": "ann"}
        assert records[2].type == "boot" and records[2].boot_id == second.boot_id
        assert record.to_wire() == {
            "seq": 2,
            "id": record.id,
            "boot_id": first.boot_id,
            "ts": record.ts,
            "type": "cash_in",
            "data": coin_in(),
            "source": {"kind": "console", "user": "ann"},
        }
    finally:
        await second.close()


async def test_concurrent_appends_get_gap_free_seqs_in_call_order(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    try:
        per_task: dict[int, list[int]] = {}

        async def appender(task: int) -> None:
            seqs = per_task.setdefault(task, [])
            for i in range(20):
                if i % 5 == 4:
                    many = await journal.append_many(
                        [("door", {"open": True}), ("door", {"open": False})],
                        source=remote_source(f"c{task}-{i}"),
                    )
                    assert many[1].seq == many[0].seq + 1  # atomic: consecutive
                    seqs.extend(r.seq for r in many)
                else:
                    seqs.append((await journal.append("cash_in", coin_in(10 + task))).seq)

        await asyncio.gather(*(appender(t) for t in range(40)))
        every = sorted(s for seqs in per_task.values() for s in seqs)
        assert every == list(range(2, 2 + 40 * 24))  # 1 is the boot record
        for seqs in per_task.values():
            assert seqs == sorted(seqs)  # a task's own appends keep their order
        assert await _all_seqs(journal) == list(range(1, journal.last_seq + 1))
        # Group commit: the 960 appends needed far fewer transactions.
        assert journal.commit_count < 40 * 20
        assert await journal.verify_counters() == []
    finally:
        await journal.close()


async def test_a_batch_larger_than_one_transaction_is_split_but_stays_gap_free(
    tmp_path: Path,
) -> None:
    journal = await Journal.open(tmp_path)
    try:
        n = MAX_BATCH_RECORDS * 2 + 7
        records = await asyncio.gather(*(journal.append("door", {"open": True}) for _ in range(n)))
        assert [r.seq for r in records] == list(range(2, n + 2))
    finally:
        await journal.close()


async def test_wall_clock_jumping_back_keeps_seq_order(tmp_path: Path) -> None:
    clock = FakeClock()
    journal = await Journal.open(tmp_path, clock=clock)
    try:
        a = await journal.append("door", {"open": True})
        clock.advance(days=-400)  # NTP arrives late, or an RTC-less boot starts in the past
        b = await journal.append("door", {"open": False})
        clock.advance(days=800)
        c = await journal.append("door", {"open": True})
        assert a.seq < b.seq < c.seq
        assert b.ts < a.ts < c.ts
        assert a.mono_ns < b.mono_ns < c.mono_ns  # monotonic time beside the wall time
        assert [r.seq for r in await journal.unacked()] == [1, a.seq, b.seq, c.seq]
    finally:
        await journal.close()


async def test_invalid_records_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    try:
        with pytest.raises(RecordInvalid):
            await journal.append("cash_in", {"amount": 1})
        with pytest.raises(RecordInvalid):
            await journal.append("teleport", {})
        with pytest.raises(RecordInvalid):
            await journal.append("door", {"open": True}, source={"kind": "alien"})
        # An outcome without its intent, or an append_many with one, changes nothing at all.
        with pytest.raises(IntentError):
            await journal.append("sale", sale("nope"))
        with pytest.raises(IntentError):
            await journal.append_many([("cash_in", coin_in()), ("sale", sale("nope"))])
        assert journal.last_seq == 1
        assert (await journal.counters()).get("cash_in.count", 0) == 0
        # seq was not consumed by the refusals.
        assert (await journal.append("door", {"open": True})).seq == 2
    finally:
        await journal.close()


async def test_intents_open_and_close_and_ids_are_never_reused(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    try:
        intent = await journal.append("vend_intent", vend_intent("v1"))
        assert await journal.open_intents() == [intent]
        with pytest.raises(IntentError):
            await journal.append("vend_intent", vend_intent("v1"))
        await journal.append("sale", sale("v1"))
        assert await journal.open_intents() == []
        with pytest.raises(IntentError):  # closed: a second outcome would double count
            await journal.append("vend_failed", {**vend_intent("v1"), "reason": "x"})
        with pytest.raises(IntentError):  # used before: ids are single-use
            await journal.append("vend_intent", vend_intent("v1"))
        # One batch may open and close (an intent and its outcome in one append_many).
        both = await journal.append_many(
            [
                ("payout_intent", {"intent_id": "p", "amount": 50, "reason": "change"}),
                (
                    "cash_out",
                    {
                        "intent_id": "p",
                        "amount": 50,
                        "reason": "change",
                        "coins": {"3": 1},
                        "final": True,
                    },
                ),
            ]
        )
        assert [r.type for r in both] == ["payout_intent", "cash_out"]
        assert await journal.open_intents() == []
    finally:
        await journal.close()
    reopened = await Journal.open(tmp_path)
    await reopened.append("vend_intent", vend_intent("v2"))
    await reopened.close()
    again = await Journal.open(tmp_path)
    try:  # open intents survive a restart, and a used id stays used
        assert [r.data["intent_id"] for r in await again.open_intents()] == ["v2"]
        with pytest.raises(IntentError):
            await again.append("vend_intent", vend_intent("v1"))
    finally:
        await again.close()


async def test_ack_semantics(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    try:
        for _ in range(9):
            await journal.append("door", {"open": True})
        assert journal.last_seq == 10 and journal.backlog == 10
        j = journal.journal_id
        assert not await journal.ack("f" * 32, 5)  # foreign journal
        assert not await journal.ack(j, 11)  # beyond the last record
        assert not await journal.ack(j, 0)
        assert await journal.ack(j, 5)
        assert not await journal.ack(j, 5)  # repeated
        assert not await journal.ack(j, 3)  # stale
        assert journal.acked_upto == 5 and journal.backlog == 5
        assert [r.seq for r in await journal.unacked()] == [6, 7, 8, 9, 10]
        assert [r.seq for r in await journal.unacked(limit=2)] == [6, 7]
        assert await journal.ack(j, 10)
        assert await journal.unacked() == []
    finally:
        await journal.close()
    reopened = await Journal.open(tmp_path)
    try:
        assert reopened.acked_upto == 10  # durable
        assert [r.seq for r in await reopened.unacked()] == [11]  # the new boot record
    finally:
        await reopened.close()


async def test_prune_removes_only_old_acknowledged_records_and_counters_still_verify(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    journal = await Journal.open(tmp_path, clock=clock)
    try:
        await journal.append("cash_in", coin_in(100))  # 2
        await journal.append("vend_intent", vend_intent("open-one", price=100))  # 3: stays open
        await journal.append("cash_in", coin_in(200))  # 4
        clock.advance(days=10)
        await journal.append("cash_in", coin_in(50))  # 5: recent
        clock.advance(days=-30)  # clock jumps back: record 6 *looks* old but is unacked
        await journal.append("cash_in", coin_in(7))  # 6
        clock.advance(days=30)
        before = await journal.counters()
        levels_before = await journal.levels()
        assert await journal.ack(journal.journal_id, 5)
        deleted = await journal.prune(clock.wall(), retention_days=5)
        assert deleted == 3  # 1, 2 and 4; not 3 (open intent), 5 (recent) or 6 (unacked)
        assert await _all_seqs(journal) == [3, 5, 6]
        assert await journal.counters() == before  # counters never go backwards
        assert await journal.levels() == levels_before
        assert await journal.verify_counters() == []
        assert await journal.prune(clock.wall(), retention_days=5) == 0  # idempotent
        # Everything acknowledged and old: all but the open intent goes.
        assert await journal.ack(journal.journal_id, 6)
        clock.advance(days=100)
        assert await journal.prune(clock.wall(), retention_days=5) == 2
        assert await _all_seqs(journal) == [3]
        assert await journal.verify_counters() == []
        await journal.append("sale", sale("open-one", price=100))
        assert await journal.ack(journal.journal_id, journal.last_seq)
        clock.advance(days=100)
        assert await journal.prune(clock.wall(), retention_days=5) == 2
        assert await _all_seqs(journal) == []
        last = journal.last_seq
    finally:
        await journal.close()
    reopened = await Journal.open(tmp_path, clock=clock)
    try:
        (boot,) = await reopened.records()
        assert boot.seq == last + 1  # never reused, even with every record pruned
        assert await reopened.verify_counters() == []
        assert (await reopened.counters())["cash_in.value"] == 357
    finally:
        await reopened.close()


async def test_verify_counters_reports_a_tampered_counter(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    try:
        await journal.append("cash_in", coin_in(100))

        def tamper(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE counters SET value = 99 WHERE name = 'cash_in.value'")

        await journal._call_writer(tamper)
        (mismatch,) = await journal.verify_counters()
        assert (mismatch.kind, mismatch.name, mismatch.stored, mismatch.recomputed) == (
            "counter",
            "cash_in.value",
            99,
            100,
        )
    finally:
        await journal.close()


async def test_closed_journal_refuses_appends(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    await journal.close()
    await journal.close()  # idempotent
    assert not journal.writable
    with pytest.raises(JournalClosed):
        await journal.append("door", {"open": True})


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    await journal.close()
    conn = sqlite3.connect(database_path(tmp_path))
    conn.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
        "VALUES ('vmc.journal', '0099_from_the_future', 'x')"
    )
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNew, match="0099_from_the_future"):
        await Journal.open(tmp_path)


def test_an_up_to_date_journal_opens_without_importing_sqlite_utils(tmp_path: Path) -> None:
    """sqlite-utils (with click, pluggy, dateutil) is for creating and migrating the database
    only: an ordinary start does not pay for its import (bench/footprint.py)."""

    async def create() -> None:
        journal = await Journal.open(tmp_path)
        await journal.close()

    asyncio.run(create())
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from vmc.journal import Journal

        async def main():
            journal = await Journal.open({str(tmp_path)!r})
            await journal.append("door", {{"open": True}})
            await journal.close()

        asyncio.run(main())
        print(sorted(m for m in sys.modules if m.split(".")[0] == "sqlite_utils"))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    conn = sqlite3.connect(database_path(tmp_path))
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATION_NAMES)
        assert conn.execute("SELECT COUNT(*) FROM records WHERE type = 'door'").fetchone()[0] == 1
    finally:
        conn.close()


async def test_a_journal_missing_its_last_migration_gets_it_when_opened(tmp_path: Path) -> None:
    """A database of an older vmc (the last migration not recorded) is migrated through
    sqlite-utils as before; only the up-to-date one skips it."""
    journal = await Journal.open(tmp_path)
    await journal.append("device", {"device": "coin", "state": "fault", "detail": "jam"})
    await journal.close()
    conn = sqlite3.connect(database_path(tmp_path))
    last = MIGRATION_NAMES[-1]
    conn.execute("DELETE FROM _sqlite_migrations WHERE name = ?", (last,))
    conn.execute(f"PRAGMA user_version = {len(MIGRATION_NAMES) - 1}")
    conn.commit()
    conn.close()
    journal = await Journal.open(tmp_path)
    await journal.close()
    conn = sqlite3.connect(database_path(tmp_path))
    try:
        names = [n for (n,) in conn.execute("SELECT name FROM _sqlite_migrations ORDER BY rowid")]
        assert names == list(MIGRATION_NAMES)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATION_NAMES)
    finally:
        conn.close()


async def test_the_event_loop_keeps_ticking_while_appending(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    lateness: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            due = loop.time() + 0.002
            await asyncio.sleep(0.002)
            lateness.append(loop.time() - due)

    tick = asyncio.create_task(ticker())
    try:
        for _ in range(20):
            await asyncio.gather(*(journal.append("door", {"open": True}) for _ in range(50)))
    finally:
        stop.set()
        await tick
        await journal.close()
    assert len(lateness) > 10
    # Generous: this box is shared and noisy. A blocking commit on the loop would show up as
    # lateness of whole fsyncs times batches; the benchmark measures the real figure.
    assert statistics.median(lateness) < 0.05
    assert max(lateness) < 1.0


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from vmc.journal import Journal

    async def main() -> None:
        journal = await Journal.open(Path(sys.argv[1]))
        print("open", journal.last_seq, flush=True)

        async def appender(k: int) -> None:
            i = 0
            while True:
                i += 1
                if i % 7 == 0:
                    recs = await journal.append_many([("door", {"open": True}),
                                                      ("door", {"open": False})])
                else:
                    recs = [await journal.append("cash_in", {"amount": k, "device": "coin",
                                                              "route": "tubes", "coin_type": 2})]
                for r in recs:
                    # Printed only after the append returned: the caller was told "durable".
                    print("ok", r.seq, r.id, flush=True)

        await asyncio.gather(*(appender(k) for k in range(8)))

    asyncio.run(main())
    """
)


def test_sigkill_mid_stream_loses_nothing_that_was_acknowledged(tmp_path: Path) -> None:
    state = tmp_path / "state"
    confirmed: dict[int, str] = {}
    for round_ in range(3):  # kill it several times: WAL recovery after recovery
        child = subprocess.Popen(
            [PYTHON, "-c", CHILD, str(state)],
            stdout=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        try:
            assert child.stdout is not None
            first = child.stdout.readline().split()
            assert first[0] == "open", first
            target = 150 + 70 * round_
            seen = 0
            while seen < target:
                line = child.stdout.readline()
                assert line, "child stopped early"
                _, seq, rid = line.split()
                confirmed[int(seq)] = rid
                seen += 1
            child.send_signal(signal.SIGKILL)
            # Lines already flushed to the pipe before the kill were also confirmed; the kill
            # can cut the last one short (print writes it in pieces): that one is not counted.
            rest = child.stdout.read()
            for line in rest[: rest.rfind("\n") + 1].splitlines():
                _, seq, rid = line.split()
                confirmed[int(seq)] = rid
        finally:
            child.kill()
            child.wait(timeout=30)
        shm = state / "journal.sqlite3-shm"
        if round_ == 1 and shm.exists():
            # After a power cut the shared-memory index may be stale: SQLite must rebuild it
            # from the WAL, and the integrity check must not mistake this for damage.
            shm.write_bytes(b"\0" * shm.stat().st_size)

    async def check() -> None:
        journal = await Journal.open(state)
        try:
            records = await journal.records(1, 1_000_000)
            seqs = [r.seq for r in records]
            assert seqs == list(range(1, len(seqs) + 1))  # gap-free, nothing reused
            by_seq = {r.seq: r.id for r in records}
            missing = [s for s, rid in confirmed.items() if by_seq.get(s) != rid]
            assert missing == []
            assert await journal.verify_counters() == []
            boots = [r for r in records if r.type == "boot"]
            assert len(boots) == 4
        finally:
            await journal.close()

    asyncio.run(check())


async def test_timing_of_a_sequential_append_is_sane(tmp_path: Path) -> None:
    # Not a benchmark (bench/journal.py is); only catches an order-of-magnitude regression,
    # such as an extra fsync per record or a checkpoint per commit.
    journal = await Journal.open(tmp_path)
    try:
        start = time.perf_counter()
        for _ in range(100):
            await journal.append("door", {"open": True})
        assert (time.perf_counter() - start) / 100 < 0.1
    finally:
        await journal.close()


async def test_records_for_intent_and_retained_window(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    try:
        await journal.append("payout_intent", {"intent_id": "p1", "amount": 30, "reason": "lever"})
        await journal.append(
            "cash_out", {"intent_id": "p1", "amount": 10, "reason": "lever", "coins": {"1": 1}}
        )
        await journal.append("cash_in", coin_in())
        assert [r.type for r in await journal.records_for_intent("p1")] == [
            "payout_intent",
            "cash_out",
        ]
        assert [r.seq for r in await journal.records(since_seq=3, limit=1)] == [3]
    finally:
        await journal.close()


async def test_one_writer_per_database(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    try:
        with pytest.raises(JournalError, match="already open in another process"):
            await Journal.open(tmp_path)
        assert (await journal.append("door", {"open": True})).seq == 2  # the first is unharmed
    finally:
        await journal.close()
    again = await Journal.open(tmp_path)  # the lock went with the first writer
    await again.close()


async def test_open_errors_are_journal_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(JournalError, match="cannot open the journal"):
        await Journal.open(blocker / "state")


async def test_open_with_retention_prunes(tmp_path: Path) -> None:
    clock = FakeClock()
    journal = await Journal.open(tmp_path, clock=clock)
    await journal.append("door", {"open": True})
    assert await journal.ack(journal.journal_id, 2)
    await journal.close()
    clock.advance(days=91)
    reopened = await Journal.open(tmp_path, clock=clock, retention_days=90)
    try:
        assert [r.seq for r in await reopened.records()] == [3]  # only the new boot record
        assert await reopened.verify_counters() == []
    finally:
        await reopened.close()


async def test_an_intent_id_reused_within_one_batch_fails_only_that_caller(
    tmp_path: Path,
) -> None:
    journal = await Journal.open(tmp_path)
    try:
        # Three callers in one group commit: the second reuses the first one's intent id
        # (opened and closed within the batch). Only the second is refused. The writer is held
        # on a gate so that all three are queued before it takes the batch.
        gate = threading.Event()
        held = asyncio.create_task(journal._call_writer(lambda _conn: gate.wait(30)))
        await asyncio.sleep(0)  # the gate job is queued first
        appends = asyncio.gather(
            journal.append_many([("vend_intent", vend_intent("dup")), ("sale", sale("dup"))]),
            journal.append("vend_intent", vend_intent("dup")),
            journal.append("door", {"open": True}),
            return_exceptions=True,
        )
        await asyncio.sleep(0.05)  # the three appends queue behind the gate
        commits = journal.commit_count
        gate.set()
        results = await appends
        await held
        assert journal.commit_count == commits + 1  # one transaction for the batch
        assert isinstance(results[1], IntentError)
        assert not isinstance(results[0], BaseException)
        assert not isinstance(results[2], BaseException)
        assert journal.writable
        assert await journal.open_intents() == []
        assert await _all_seqs(journal) == [1, 2, 3, 4]
    finally:
        await journal.close()
