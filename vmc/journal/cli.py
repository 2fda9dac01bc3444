"""``vmc journal tail|report|export``: read the journal from the command line.

Every command opens the database read-only (SQLite ``mode=ro``): it never appends, never
checkpoints, and is safe while the daemon runs. Exit codes: 0 done, 1 the journal cannot be
read, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import Any, Final, TextIO

from vmc.errors import ConfigError
from vmc.journal.files import database_path, open_readonly
from vmc.journal.reading import RECORD_COLUMNS, record_from_row
from vmc.journal.records import JournalError, Record, encode_json
from vmc.journal.reports import build_report, format_report

EXIT_OK: Final = 0
EXIT_JOURNAL: Final = 1
EXIT_USAGE: Final = 2

FOLLOW_POLL_S: Final = 0.5  # tail --follow: how often to look for new records
EXPORT_CHUNK: Final = 1_000  # records read per query while exporting


class _Location:
    """Where the journal is, and the money format, from --state-dir or --config."""

    def __init__(self, path: Path, decimals: int | None = None, currency: str = "") -> None:
        self.path = path
        self.decimals = decimals
        self.currency = currency


def _locate(args: argparse.Namespace) -> _Location:
    if args.state_dir is not None:
        return _Location(database_path(args.state_dir))
    from vmc.config import load_config  # only when asked: --state-dir works without a config

    config = load_config(args.config)
    return _Location(
        database_path(config.machine.state_dir),
        config.machine.decimal_places,
        config.machine.currency,
    )


def _add_location(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, metavar="FILE", help="use machine.state_dir of FILE")
    where.add_argument("--state-dir", type=Path, metavar="DIR", help="the state folder")


def _records_after(conn: sqlite3.Connection, after_seq: int, limit: int) -> list[Record]:
    rows = conn.execute(
        f"SELECT {RECORD_COLUMNS} FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
        (after_seq, limit),
    ).fetchall()
    return [record_from_row(row) for row in rows]


def _line(record: Record, as_json: bool) -> str:
    if as_json:
        return encode_json(record.to_wire())
    source = record.source["kind"]
    if "user" in record.source:
        source += f":{record.source['user']}"
    elif "cmd_id" in record.source:
        source += f":{record.source['cmd_id']}"
    return f"{record.seq:>8}  {record.ts}  {record.type:<17} {source:<8} {encode_json(record.data)}"


def _tail(args: argparse.Namespace, where: _Location, out: TextIO) -> int:
    conn = open_readonly(where.path)
    try:
        rows = conn.execute(
            f"SELECT {RECORD_COLUMNS} FROM records ORDER BY seq DESC LIMIT ?", (args.n,)
        ).fetchall()
        last = 0
        for record in reversed([record_from_row(row) for row in rows]):
            out.write(_line(record, args.json) + "\n")
            last = record.seq
        out.flush()
        if not args.follow:
            return EXIT_OK
        if last == 0:
            last = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0])
        while True:
            time.sleep(FOLLOW_POLL_S)
            for record in _records_after(conn, last, EXPORT_CHUNK):
                out.write(_line(record, args.json) + "\n")
                last = record.seq
            out.flush()
    finally:
        conn.close()


def _report(args: argparse.Namespace, where: _Location, out: TextIO) -> int:
    conn = open_readonly(where.path)
    try:
        report = build_report(conn, args.since)
    finally:
        conn.close()
    if args.json:
        out.write(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    else:
        out.write(format_report(report, where.decimals, where.currency))
    return EXIT_OK


def _all_records(conn: sqlite3.Connection, since_seq: int) -> Iterator[Record]:
    last = since_seq - 1
    while True:
        chunk = _records_after(conn, last, EXPORT_CHUNK)
        if not chunk:
            return
        yield from chunk
        last = chunk[-1].seq


CSV_COLUMNS: Final = ("seq", "id", "boot_id", "ts", "mono_ns", "type", "source", "data")


def _export(args: argparse.Namespace, where: _Location, out: TextIO) -> int:
    conn = open_readonly(where.path)
    try:
        conn.execute("BEGIN")  # one snapshot, however long the export takes
        journal_id = str(conn.execute("SELECT journal_id FROM state WHERE id = 1").fetchone()[0])
        records = _all_records(conn, args.since_seq)
        if args.format == "csv":
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            for r in records:
                writer.writerow(
                    [
                        r.seq,
                        r.id,
                        r.boot_id,
                        r.ts,
                        r.mono_ns,
                        r.type,
                        encode_json(r.source),
                        encode_json(r.data),
                    ]
                )
        else:
            # The contract's batch shape, streamed so a large journal is not held in memory.
            out.write(f'{{"journal":{json.dumps(journal_id)},"records":[')
            for n, r in enumerate(records):
                out.write(("," if n else "") + "\n" + encode_json(r.to_wire()))
            out.write("\n]}\n")
        conn.execute("COMMIT")
    finally:
        conn.close()
    return EXIT_OK


Handler = Callable[[argparse.Namespace, _Location, TextIO], int]


def _run(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            where = _locate(args)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            return handler(args, where, sys.stdout)
        except (JournalError, sqlite3.Error) as exc:
            print(f"vmc journal: {exc}", file=sys.stderr)
            return EXIT_JOURNAL
        except KeyboardInterrupt:
            return EXIT_OK  # ends tail --follow
        except BrokenPipeError:
            return EXIT_OK  # piped into head

    return run


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, found {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, found {text!r}")
    return value


def add_journal_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``journal tail|report|export`` to the ``vmc`` command line."""
    journal = subparsers.add_parser(
        "journal",
        help="read the transaction journal",
        description="Read the transaction journal (read-only; safe while the daemon runs).",
    )
    commands = journal.add_subparsers(dest="journal_command", required=True, metavar="COMMAND")

    tail = commands.add_parser(
        "tail", help="the last records", description="Show the last records."
    )
    _add_location(tail)
    tail.add_argument("-n", type=_positive, default=20, metavar="N", help="how many (20)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    tail.add_argument("--json", action="store_true", help="one JSON record per line")
    tail.set_defaults(handler=_run(_tail))

    report = commands.add_parser(
        "report",
        help="sales, cash position, backlog",
        description="Sales per slot, method and day; cash position; unsynced backlog.",
    )
    _add_location(report)
    report.add_argument("--since", type=_date, metavar="DATE", help="sales from this UTC date")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.set_defaults(handler=_run(_report))

    export = commands.add_parser(
        "export", help="all records as CSV or JSON", description="Export records in seq order."
    )
    _add_location(export)
    export.add_argument("--format", choices=("csv", "json"), required=True)
    export.add_argument(
        "--since-seq", type=_positive, default=1, metavar="N", help="records with seq >= N"
    )
    export.set_defaults(handler=_run(_export))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmc.journal.cli`` — the same commands without the rest of ``vmc``."""
    parser = argparse.ArgumentParser(prog="vmc")
    add_journal_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["journal", *(argv if argv is not None else sys.argv[1:])])
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
