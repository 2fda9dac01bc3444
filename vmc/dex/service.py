"""Reading the audit report from a running journal, with or without reset.

The console, the cloud command ``dex`` and the DEX port call :func:`build_dex_report` (or the
two halves :func:`read_audit` and :func:`reset_audit`, when the reset must wait until the
report was delivered, as on the DEX port). The snapshot is read on a thread of its own on a
read-only connection: the event loop never waits on SQLite, and the journal's writer is not
held up. A reset is the ``audit_read`` record, appended through the journal like any other."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from vmc.config import Config
from vmc.dex.audit import AuditData, latest_reset_seq, read_audit_data
from vmc.dex.report import Identity, ReadInfo, Selection, build_report
from vmc.errors import VmcError
from vmc.journal import LOCAL, Journal, Record, Source
from vmc.journal.files import open_readonly
from vmc.journal.records import price_level_name

#: Who reads: the EA3 terminal id and the audit_read record's ``via``.
VIAS: Final = ("cli", "console", "cloud", "dex_port")
#: What a product name may hold in a report: printable ASCII without the separator.
_NAME_UNSAFE: Final = re.compile(r"[^ -)+-~]")

Now = Callable[[], datetime]


class DexError(VmcError):
    """An audit read that cannot be done (another reset came first, a journal problem)."""


@dataclass(frozen=True)
class AuditReading:
    """One report and the snapshot it was built from (a reset moves exactly its interims)."""

    text: str
    data: AuditData
    read: ReadInfo


def _now() -> datetime:
    return datetime.now(UTC)


def comm_id_for(config: Config) -> str:
    """The DEX communication id: ``[dex] comm_id``, else made of the machine id."""
    if config.dex.comm_id:
        return config.dex.comm_id
    letters = re.sub(r"[^A-Za-z0-9]", "", config.machine.id).upper()
    return (letters[-10:] or "VMC").rjust(10, "0")


def identity_for(config: Config, version: str) -> Identity:
    return Identity(
        comm_id=comm_id_for(config),
        machine_id=_safe(config.machine.id),
        software_version=_safe(version),
        currency=config.machine.currency,
        currency_numeric=config.machine.currency_numeric,
        decimal_places=config.machine.decimal_places,
        coin=config.mdb.coin.enabled,
        bill=config.mdb.bill.enabled,
        cashless=config.mdb.cashless.enabled,
        qr=config.cloud.enabled,
    )


def _safe(text: str) -> str:
    return _NAME_UNSAFE.sub("?", text)


def selections_for(config: Config, data: AuditData) -> list[Selection]:
    """The configured slots in their order, then any slot that sold once and is gone."""
    result = []
    for slot in config.slots:
        price = data.levels.get(price_level_name(slot.id), slot.price)
        result.append(Selection(slot.id, price, _safe(slot.name)))
    known = {slot.id for slot in config.slots}
    sold = sorted(
        {
            name.split(".")[2]
            for name in data.counters
            if name.startswith("sales.slot.") and name.endswith(".count")
        }
        - known
    )
    for slot_id in sold:
        result.append(Selection(slot_id, data.levels.get(price_level_name(slot_id)), ""))
    return result


def software_version() -> str:
    from vmc.cloud.link import software_version as version

    return version()


def build_reading(
    data: AuditData, config: Config, *, via: str, reset: bool, now: datetime
) -> AuditReading:
    """The report for ``data`` (pure)."""
    if via not in VIAS:
        raise ValueError(f"via must be one of {', '.join(VIAS)}")
    read = ReadInfo(at=now, via=via, reset=reset)
    text = build_report(
        data, identity_for(config, software_version()), selections_for(config, data), read
    )
    return AuditReading(text, data, read)


def read_snapshot(path: Path) -> AuditData:
    """Blocking: one snapshot of the journal at ``path`` (call it off the event loop)."""
    conn = open_readonly(path)
    try:
        return read_audit_data(conn)
    finally:
        conn.close()


def _latest_reset(path: Path) -> int:
    conn = open_readonly(path)
    try:
        return latest_reset_seq(conn)
    finally:
        conn.close()


# One lock per open journal: two resets at once (console and cloud) would move the same
# interims twice.
_LOCKS: weakref.WeakKeyDictionary[Journal, asyncio.Lock] = weakref.WeakKeyDictionary()


def _lock(journal: Journal) -> asyncio.Lock:
    lock = _LOCKS.get(journal)
    if lock is None:
        lock = _LOCKS[journal] = asyncio.Lock()
    return lock


async def read_audit(
    journal: Journal, config: Config, *, via: str, reset: bool = False, now: Now = _now
) -> AuditReading:
    """Build the report from one snapshot of ``journal``; nothing is written. ``reset`` only
    says, in EA3, that this read will be committed with :func:`reset_audit`."""
    try:
        data = await asyncio.to_thread(read_snapshot, journal.path)
    except sqlite3.Error as exc:
        raise DexError(f"cannot read the journal: {exc}") from exc
    return build_reading(data, config, via=via, reset=reset, now=now())


async def reset_audit(journal: Journal, reading: AuditReading, *, source: Source = LOCAL) -> Record:
    """Start the interim counters anew from ``reading``: journal its interims as an
    ``audit_read`` record. Refused (DexError) when another read with reset was journaled after
    ``reading``'s snapshot: its interims are no longer the ones to move."""
    async with _lock(journal):
        return await _append_reset(journal, reading, source)


async def _append_reset(journal: Journal, reading: AuditReading, source: Source) -> Record:
    try:
        latest = await asyncio.to_thread(_latest_reset, journal.path)
    except sqlite3.Error as exc:
        raise DexError(f"cannot read the journal: {exc}") from exc
    if latest != reading.data.last_reset_seq:
        raise DexError("another read with reset was journaled since this report was built")
    data = {"interim": reading.data.interims(), "via": reading.read.via}
    return await journal.append("audit_read", data, source=source)


async def build_dex_report(
    journal: Journal,
    config: Config,
    *,
    reset: bool,
    via: str = "console",
    source: Source = LOCAL,
    now: Now = _now,
) -> str:
    """The EVA-DTS report (CR LF lines). With ``reset`` the interim counters start anew: the
    read is journaled (``audit_read``) before the report is returned; if that write fails the
    error is raised and nothing was reset."""
    if not reset:
        return (await read_audit(journal, config, via=via, now=now)).text
    async with _lock(journal):
        reading = await read_audit(journal, config, via=via, reset=True, now=now)
        await _append_reset(journal, reading, source)
        return reading.text
