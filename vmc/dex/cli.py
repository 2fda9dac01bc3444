"""``vmc dex --config FILE [--reset] [--output FILE]``: the EVA-DTS audit report.

Without ``--reset`` the journal is opened read-only (SQLite ``mode=ro``): safe while the daemon
runs. ``--reset`` journals the read (``audit_read``), so it needs the journal's write lock: it
works only while the daemon is stopped; with the daemon running, read with reset through the
console, the DEX port or the cloud. Exit codes: 0 done, 1 the journal cannot be read or
written (or the output file), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from vmc.config import Config, load_config
from vmc.dex.service import DexError, build_dex_report, build_reading, read_snapshot
from vmc.errors import ConfigError
from vmc.journal import Journal, JournalError
from vmc.journal.files import database_path

EXIT_OK: Final = 0
EXIT_JOURNAL: Final = 1
EXIT_USAGE: Final = 2


def _report(config: Config, reset: bool) -> str:
    path = database_path(config.machine.state_dir)
    if not path.exists():
        raise JournalError(f"no journal database at {path}")
    if not reset:
        data = read_snapshot(path)
        return build_reading(data, config, via="cli", reset=False, now=datetime.now(UTC)).text

    async def read_with_reset() -> str:
        journal = await Journal.open(config.machine.state_dir)
        try:
            return await build_dex_report(journal, config, reset=True, via="cli")
        finally:
            await journal.close()

    return asyncio.run(read_with_reset())


def _write(text: str, output: Path | None) -> None:
    data = text.encode("ascii")
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    # Whole or not at all: a handheld upload tool must never pick up half a report.
    fd, temp = tempfile.mkstemp(dir=output.parent or Path("."), prefix=f".{output.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, output)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        text = _report(config, args.reset)
    except (JournalError, DexError, sqlite3.Error) as exc:
        hint = ""
        if args.reset and "already open" in str(exc):
            hint = " (the daemon is running: read with reset on the console or the DEX port)"
        print(f"vmc dex: {exc}{hint}", file=sys.stderr)
        return EXIT_JOURNAL
    try:
        _write(text, args.output)
    except OSError as exc:
        print(f"vmc dex: cannot write {args.output}: {exc}", file=sys.stderr)
        return EXIT_JOURNAL
    return EXIT_OK


def add_dex_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``dex`` to the ``vmc`` command line."""
    dex = subparsers.add_parser(
        "dex",
        help="the EVA-DTS (DEX/UCS) audit report",
        description=(
            "Print the EVA-DTS audit report built from the journal (read-only; safe while the "
            "daemon runs). --reset starts the interim counters anew (daemon stopped)."
        ),
    )
    dex.add_argument("--config", type=Path, metavar="FILE", required=True, help="TOML file")
    dex.add_argument(
        "--reset", action="store_true", help="read with reset: journal it, interims start anew"
    )
    dex.add_argument("--output", type=Path, metavar="FILE", help="write the report to FILE")
    dex.set_defaults(handler=_run)
