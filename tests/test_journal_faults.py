"""The journal when storage fails: disk full (page limit, free-space reserve, a real size-capped
tmpfs), a read-only database, and a corrupt file at start."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.test_journal_support import PYTHON, FakeClock, coin_in, subprocess_env
from vmc.journal import Journal, JournalCorrupt, JournalUnavailable
from vmc.journal.files import database_path, free_bytes

PROBE_S = 0.02  # the health probe interval in these tests
WAIT_S = 10.0  # generous bound for a state change on a loaded machine


class HealthLog:
    """Collects health callbacks and lets a test wait for a given state."""

    def __init__(self, journal: Journal) -> None:
        self.events: list[tuple[bool, str]] = []
        self._changed = asyncio.Event()
        journal.on_health(self._on_health)

    def _on_health(self, ok: bool, reason: str) -> None:
        self.events.append((ok, reason))
        self._changed.set()

    async def wait_for(self, ok: bool) -> None:
        async with asyncio.timeout(WAIT_S):
            while not self.events or self.events[-1][0] is not ok:
                self._changed.clear()
                await self._changed.wait()


async def _assert_nothing_half_written(journal: Journal, last_seq: int) -> None:
    assert journal.last_seq == last_seq
    records = await journal.records(1, 100_000)
    assert [r.seq for r in records] == list(range(1, last_seq + 1))
    assert await journal.verify_counters() == []


async def test_sqlite_full_from_a_page_limit_then_recovery(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path, probe_interval_s=PROBE_S)
    health = HealthLog(journal)
    try:
        await journal.append("cash_in", coin_in(100))

        def cap(conn: sqlite3.Connection) -> int:
            pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
            conn.execute(f"PRAGMA max_page_count = {pages}")
            return pages

        await journal._call_writer(cap)
        failure = None
        for _ in range(2_000):  # fill what free room the last pages had
            try:
                await journal.append("cash_in", coin_in(5))
            except JournalUnavailable as exc:
                failure = exc
                break
        assert failure is not None and "full" in str(failure)
        assert not journal.writable
        await health.wait_for(False)
        last = journal.last_seq
        # A multi-record append fails as a whole, and keeps failing while the limit holds.
        with pytest.raises(JournalUnavailable):
            await journal.append_many([("cash_in", coin_in(1)), ("door", {"open": True})])
        await _assert_nothing_half_written(journal, last)

        def lift(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA max_page_count = 1073741823")

        await journal._call_writer(lift)
        await health.wait_for(True)  # the probe found writing works again, by itself
        assert journal.writable
        record = await journal.append("cash_in", coin_in(7))
        assert record.seq == last + 1  # the failed appends consumed no seq
        assert [ok for ok, _ in health.events] == [False, True]
    finally:
        await journal.close()


async def test_free_space_reserve_refuses_appends_before_the_disk_is_full(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path, probe_interval_s=PROBE_S)
    health = HealthLog(journal)
    try:
        last = journal.last_seq
        journal.min_free_bytes = 1 << 62  # more than any disk has: the reserve is reached
        with pytest.raises(JournalUnavailable, match="below the reserve"):
            await journal.append("cash_in", coin_in())
        await health.wait_for(False)
        assert "reserve" in journal.health_reason
        await _assert_nothing_half_written(journal, last)
        # Pruning still runs below the reserve: it is what frees space.
        assert await journal.prune(FakeClock().wall(), 1) == 0
        journal.min_free_bytes = 0
        await health.wait_for(True)
        assert (await journal.append("cash_in", coin_in())).seq == last + 1
    finally:
        await journal.close()


async def test_reaching_the_reserve_stops_money_but_still_records_what_is_in_flight(
    tmp_path: Path,
) -> None:
    journal = await Journal.open(tmp_path, probe_interval_s=PROBE_S)
    health = HealthLog(journal)
    try:
        free = free_bytes(tmp_path)
        # The reserve is reached while the machine is idle: the journal notices by itself, so
        # the acceptors are disabled before any coin could arrive.
        journal.min_free_bytes = free * 2  # reserve above the free space, floor below it
        await health.wait_for(False)
        assert "reserve" in health.events[-1][1]
        # A coin that was already on its way in is still recorded (from the reserve).
        coin = await journal.append("cash_in", coin_in())
        assert coin.seq == 2 and not journal.writable
        journal.min_free_bytes = 0
        await health.wait_for(True)
        assert [ok for ok, _ in health.events] == [False, True]
    finally:
        await journal.close()


async def test_opening_below_the_reserve_opens_unwritable_and_boots_later(tmp_path: Path) -> None:
    first = await Journal.open(tmp_path)
    await first.close()
    journal = await Journal.open(tmp_path, min_free_bytes=1 << 62, probe_interval_s=PROBE_S)
    health = HealthLog(journal)
    try:
        assert not journal.writable
        assert journal.last_seq == 1  # this run's boot record is still pending
        with pytest.raises(JournalUnavailable):
            await journal.append("door", {"open": True})
        journal.min_free_bytes = 0
        await health.wait_for(True)
        door = await journal.append("door", {"open": True})
        boot, after = await journal.records(2)
        assert (boot.seq, boot.type, boot.boot_id) == (2, "boot", journal.boot_id)
        assert after == door and door.seq == 3  # the boot record still comes first
    finally:
        await journal.close()


async def test_read_only_connection_goes_unwritable_and_recovers_by_reconnecting(
    tmp_path: Path,
) -> None:
    # PRAGMA query_only makes the writer's own connection refuse writes (SQLITE_READONLY), as
    # a file made read-only under an open connection does. The probe reopens the connection.
    journal = await Journal.open(tmp_path, probe_interval_s=PROBE_S)
    health = HealthLog(journal)
    try:
        last = journal.last_seq
        await journal._call_writer(lambda conn: conn.execute("PRAGMA query_only = 1"))
        with pytest.raises(JournalUnavailable, match="readonly"):
            await journal.append("cash_in", coin_in())
        await health.wait_for(False)
        await health.wait_for(True)
        assert (await journal.append("cash_in", coin_in())).seq == last + 1
        assert await journal.ack(journal.journal_id, last + 1)
    finally:
        await journal.close()


READ_ONLY_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from vmc.journal import Journal, JournalUnavailable

    async def main() -> None:
        journal = await Journal.open(Path(sys.argv[1]), probe_interval_s=0.02)
        report = {"writable": journal.writable, "reason": journal.health_reason}
        try:
            await journal.append("door", {"open": True})
            report["append"] = "ok"
        except JournalUnavailable as exc:
            report["append"] = str(exc)
        print(json.dumps(report), flush=True)
        sys.stdin.readline()  # the parent makes the files writable again
        for _ in range(500):
            if journal.writable:
                break
            await asyncio.sleep(0.02)
        record = await journal.append("door", {"open": False})
        print(json.dumps({"writable": journal.writable, "seq": record.seq}), flush=True)
        await journal.close()

    asyncio.run(main())
    """
)


def _unprivileged_prefix() -> list[str]:
    """A command prefix under which file modes are enforced. As root, drop CAP_DAC_OVERRIDE
    (and DAC_READ_SEARCH) from the bounding set with setpriv: uid 0 then gets the owner's
    permissions only, so a 0444 file is really read-only, while the venv stays readable."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: chmod cannot make a file read-only")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


async def test_read_only_database_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = await Journal.open(state)
    await journal.append("cash_in", coin_in())
    await journal.close()
    db = database_path(state)
    db.chmod(0o444)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    child = await asyncio.create_subprocess_exec(
        *_unprivileged_prefix(),
        PYTHON,
        "-c",
        READ_ONLY_CHILD,
        str(state),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=subprocess_env(),
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        async with asyncio.timeout(60):
            first = json.loads(await child.stdout.readline())
        assert first["writable"] is False  # opened, but the boot record could not be written
        assert "readonly" in first["reason"]
        assert "readonly" in first["append"]
        assert hashlib.sha256(db.read_bytes()).hexdigest() == before
        for path in state.glob("journal.sqlite3*"):  # SQLite gave -wal/-shm the same mode
            path.chmod(0o644)
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        async with asyncio.timeout(60):
            second = json.loads(await child.stdout.readline())
        assert second == {"writable": True, "seq": 4}  # boot (3) first, then this record
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    reopened = await Journal.open(state)
    try:
        types = [r.type for r in await reopened.records()]
        assert types == ["boot", "cash_in", "boot", "door", "boot"]
    finally:
        await reopened.close()


TMPFS_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, subprocess, sys
    from pathlib import Path
    from vmc.journal import Journal, JournalUnavailable

    async def main() -> None:
        mount = Path(sys.argv[1])
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                       check=True)
        events = []
        journal = await Journal.open(mount / "state", min_free_bytes=0, probe_interval_s=0.02)
        journal.on_health(lambda ok, why: events.append(ok))
        filler = mount / "filler"
        st = os.statvfs(mount)
        filler.write_bytes(bytes(st.f_bavail * st.f_frsize - 64 * 1024))
        report = {"appended": 0}
        for _ in range(5000):
            try:
                await journal.append("security", {"what": "fill", "detail": "x" * 150})
                report["appended"] += 1
            except JournalUnavailable as exc:
                report["error"] = str(exc)
                break
        report["writable_when_full"] = journal.writable
        report["last_when_full"] = journal.last_seq
        retained = await journal.records(1, 100000)
        report["gap_free"] = [r.seq for r in retained] == list(range(1, journal.last_seq + 1))
        filler.unlink()
        for _ in range(500):
            if journal.writable:
                break
            await asyncio.sleep(0.02)
        report["seq_after"] = (await journal.append("door", {"open": True})).seq
        report["mismatches"] = len(await journal.verify_counters())
        report["events"] = events
        await journal.close()
        print(json.dumps(report), flush=True)

    asyncio.run(main())
    """
)


def test_real_disk_full_on_a_size_capped_tmpfs(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a private size-capped tmpfs")
    mount = tmp_path / "mnt"
    mount.mkdir()
    # A private mount namespace: the tmpfs disappears with the child, whatever happens.
    result = subprocess.run(
        [unshare, "-m", "--propagation", "private", PYTHON, "-c", TMPFS_CHILD, str(mount)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    if result.returncode != 0 and "mount" in result.stderr and "permission" in result.stderr:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.strip()[-200:]}")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["appended"] >= 1
    assert "full" in report["error"]
    assert report["writable_when_full"] is False
    assert report["gap_free"] is True
    assert report["seq_after"] == report["last_when_full"] + 1
    assert report["mismatches"] == 0
    assert report["events"] == [False, True]


# -- corrupt database at start ---------------------------------------------------------------


async def _make_journal(state: Path) -> None:
    journal = await Journal.open(state)
    for chunk in range(3):  # enough records for several pages
        await journal.append_many([("cash_in", coin_in(chunk * 100 + i)) for i in range(100)])
    await journal.close()  # checkpoints: everything is in the main file


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("where", ["header", "page"])
async def test_corrupt_database_is_kept_aside_byte_identical(tmp_path: Path, where: str) -> None:
    state = tmp_path / "state"
    await _make_journal(state)
    db = database_path(state)
    assert not db.with_name(db.name + "-wal").exists()
    conn = sqlite3.connect(db)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'records'").fetchone()[0]
    conn.close()
    with db.open("r+b") as f:
        if where == "header":
            f.write(b"this is not SQLite at all")
        else:
            # The b-tree page header of the records table's root page: its type byte, cell
            # count and pointers become nonsense (cell payloads are not checked by quick_check).
            f.seek((root - 1) * 4096)
            f.write(b"\x77" * 12)
    damaged = _sha(db)
    clock = FakeClock()
    with pytest.raises(JournalCorrupt) as caught:
        await Journal.open(state, clock=clock)
    # The -wal/-shm (if any: our read-only check may have created empty ones) go along with it.
    kept, *sides = caught.value.kept
    assert all(side.startswith(kept) for side in sides)
    assert kept.endswith("journal.sqlite3.corrupt-20261122T224000Z")
    assert kept in str(caught.value)
    assert _sha(Path(kept)) == damaged  # byte-identical, not checkpointed or repaired
    assert not db.exists()  # moved, not copied: nothing will be written over it

    # The next start (the default, after the daemon exited) begins a new journal J and says so.
    fresh = await Journal.open(state, clock=clock)
    try:
        boot, note = await fresh.records()
        assert boot.type == "boot" and boot.seq == 1
        assert note.type == "device" and note.data["state"] == "recovered"
        assert kept in note.data["detail"]
    finally:
        await fresh.close()
    assert _sha(Path(kept)) == damaged


async def test_corruption_twice_in_one_second_never_overwrites_the_first_copy(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    clock = FakeClock()  # frozen: both copies get the same time stamp
    kept_files = []
    for n in range(2):
        await _make_journal(state)
        db = database_path(state)
        db.write_bytes(b"garbage %d" % n + db.read_bytes()[20:])
        with pytest.raises(JournalCorrupt) as caught:
            await Journal.open(state, clock=clock)
        kept_files.append(Path(caught.value.kept[0]))
    assert kept_files[0] != kept_files[1]
    assert kept_files[1].name.endswith(".1")
    assert kept_files[0].read_bytes().startswith(b"garbage 0")
    assert kept_files[1].read_bytes().startswith(b"garbage 1")


async def test_start_fresh_after_corrupt_keeps_the_wal_too(tmp_path: Path) -> None:
    state = tmp_path / "state"
    await _make_journal(state)
    db = database_path(state)
    old = await Journal.open(state)
    old_id = old.journal_id
    await old.append("door", {"open": True})
    # Simulate a crash that leaves a WAL behind: copy the files while the journal is open.
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for path in state.iterdir():
        shutil.copy2(path, snapshot / path.name)
    await old.close()
    shutil.rmtree(state)
    shutil.copytree(snapshot, state)
    assert db.with_name(db.name + "-wal").exists()
    with db.open("r+b") as f:
        f.write(b"\xff" * 100)
    wal_before = _sha(db.with_name(db.name + "-wal"))
    journal = await Journal.open(state, start_fresh_after_corrupt=True)
    try:
        kept = journal.corrupt_kept
        assert any(k.endswith("-wal") for k in kept)
        kept_wal = Path(next(k for k in kept if k.endswith("-wal")))
        assert _sha(kept_wal) == wal_before
        assert journal.journal_id != old_id  # a new database gets a new J (contract)
        assert journal.writable and journal.last_seq == 2
    finally:
        await journal.close()


async def test_a_foreign_sqlite_file_is_not_taken_for_a_journal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = database_path(state)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA application_id = 1234")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(JournalCorrupt, match="not a vmc journal"):
        await Journal.open(state)
