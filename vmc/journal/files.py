"""The journal's files on disk: where the database lives, opening it read-only, its integrity
check, moving a damaged database (with its -wal/-shm) aside, the journal-id marker beside it, the
lock that keeps a second writer out, and free space."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from vmc.journal.records import JournalError

JOURNAL_FILE: Final = "journal.sqlite3"
#: Beside the database, ``journal.sqlite3.id``: the journal id (J) of the database, written at
#: every open where it is missing or different. A start that must create a new database while
#: this file names a journal knows that one was lost, and says so at ERROR (docs/journal.md).
JOURNAL_ID_SUFFIX: Final = ".id"
APPLICATION_ID: Final = 0x564D434A  # "VMCJ" in the SQLite header: marks the file as ours
BUSY_TIMEOUT_MS: Final = 5_000  # WAL readers never block the writer; this only covers the CLI
# briefly holding a lock while its connection opens

SQLITE_READONLY: Final = 8
SQLITE_IOERR: Final = 10
SQLITE_CORRUPT: Final = 11
SQLITE_CANTOPEN: Final = 14
SQLITE_NOTADB: Final = 26


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back when anything inside raises (the
    connection is in autocommit mode: without it each statement would stand alone)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


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
