"""The EVA-DTS report built from a real journal (SQLite in tmp_path): every segment and its
figures, G85 and SE recomputed by the test's own code, lifetime counters after pruning, a read
with reset journaled and the interim counters starting anew."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.dex_support import (
    MACHINE_ID,
    check_g85_and_se,
    coin,
    fill_journal,
    find,
    make_config,
    segments,
    sell,
)
from vmc.dex import DexError, build_dex_report, crc16_arc, read_audit, reset_audit
from vmc.dex.link import ETX, SOH, encode_frame
from vmc.journal import Journal, RecordInvalid
from vmc.journal.store import database_path

NOW = datetime(2026, 11, 30, 14, 5, 9, tzinfo=UTC)


def fixed_now() -> datetime:
    return NOW


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    opened = await Journal.open(tmp_path)
    try:
        yield opened
    finally:
        await opened.close()


def test_crc16_arc_check_value_and_a_handhelds_handshake_frame() -> None:
    assert crc16_arc(b"123456789") == 0xBB3D
    # A handheld's first handshake as a public ESP32 DEX reader sends it (bytes as published):
    # DLE SOH "6150210000" "R" "R01L01" DLE ETX, CRC 0x6D1A low byte first.
    published = bytes.fromhex("1001") + b"6150210000RR01L01" + bytes.fromhex("1003 1a6d")
    assert encode_frame(SOH, b"6150210000RR01L01", ETX) == published


async def test_every_segment_with_its_figures(journal: Journal, tmp_path: Path) -> None:
    await fill_journal(journal)
    config = make_config(tmp_path)
    report = await build_dex_report(journal, config, reset=False, now=fixed_now)
    check_g85_and_se(report)
    tags = [s[0] for s in segments(report)]
    for tag in ("ID1", "ID4", "ID5", "CB1", "VA1", "CA1", "CA2", "CA3", "CA4", "CA15"):
        assert tag in tags, tag
    for tag in ("CA17", "BA1", "DA1", "DA2", "DA4", "DB1", "DB2", "PA1", "PA2", "EA1", "EA2"):
        assert tag in tags, tag
    assert find(report, "DXS") == ["000DEX0042", "VA", "V0/6", "1"]
    assert find(report, "ID1")[0] == MACHINE_ID
    assert find(report, "ID4") == ["2", "978", "EUR"]
    assert find(report, "ID5") == ["20261130", "140509"]
    # Lifetime then interim; nothing was ever reset, so both halves agree.
    assert find(report, "VA1") == ["650", "4", "650", "4"]
    assert find(report, "CA2") == ["300", "2", "300", "2"]
    # CA3: cash in, coins to the cashbox, coins to the tubes, bills; interim then lifetime.
    assert find(report, "CA3") == ["800", "100", "200", "500"] * 2
    # CA4: dispensed (change), manually dispensed; interim then lifetime.
    assert find(report, "CA4") == ["100", "50"] * 2
    assert find(report, "CA15") == ["50"]  # one 0.50 coin left in the tubes
    assert find(report, "CA17", "2") == ["2", "50", "1"]
    assert find(report, "CA17", "3") == ["3", "100", "0"]
    assert find(report, "DA2") == ["200", "1", "200", "1"]
    assert find(report, "DA4") == ["200", "200"]  # the card refund
    assert find(report, "DB2") == ["150", "1", "150", "1"]
    rows = segments(report)
    pa = [r for r in rows if r[0] in ("PA1", "PA2")]
    assert pa == [
        ["PA1", "A1", "150", "Cola"],
        ["PA2", "3", "450", "3", "450"],
        ["PA1", "B2", "200", "Water"],
        ["PA2", "1", "200", "1", "200"],
    ]
    assert find(report, "EA2", "EGS") == ["EGS", "1", "1", "", "0"]  # closed again
    assert find(report, "EA2", "ELA") == ["ELA", "1", "1", "", "0"]
    assert find(report, "EA2", "EA") == ["EA", "1", "1", "", "0"]
    assert find(report, "EA1", "EGS")[0] == "EGS"
    assert find(report, "EA3")[:4] == ["0", "20261130", "140509", "CONSOLE"]
    assert find(report, "EA7") == ["0", "0"]


async def test_device_identities_and_coin_values_come_from_their_start_up_records(
    journal: Journal, tmp_path: Path
) -> None:
    """CA1/BA1/DA1 carry what each device reported at its last start-up (its journaled
    ``device`` record), and CA17 the changer's own coin values; without such records the
    generic model stands (previous test)."""
    await fill_journal(journal)
    await journal.append(
        "device",
        {
            "device": "coin",
            "state": "online",
            "detail": "",
            "manufacturer": "SIM",
            "serial": "000000000042",
            "model": "CC-SIM-3",
            "version": 17,
            "level": 3,
            "coin_values": {"0": 5, "2": 50, "3": 100, "4": 200},
        },
    )
    bill = {"device": "bill", "state": "recovered", "detail": "", "manufacturer": "BVS"}
    await journal.append("device", {**bill, "serial": "7", "model": "BV-1", "version": 2})
    report = await build_dex_report(journal, make_config(tmp_path), reset=False, now=fixed_now)
    check_g85_and_se(report)
    assert find(report, "CA1") == ["SIM000000000042", "CC-SIM-3", "0017"]
    assert find(report, "BA1") == ["BVS7", "BV-1", "0002"]
    assert find(report, "DA1") == ["", "MDB-CASHLESS"]  # the reader never named itself
    assert find(report, "CA17", "2") == ["2", "50", "1"]


async def test_a_read_with_reset_is_journaled_and_the_interims_start_anew(
    journal: Journal, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    await fill_journal(journal)
    first = await build_dex_report(journal, config, reset=True, now=fixed_now)
    assert find(first, "VA1") == ["650", "4", "650", "4"]
    assert find(first, "EA3")[0] == "1"
    (read,) = [r for r in await journal.records(limit=10_000) if r.type == "audit_read"]
    assert read.data["via"] == "console"
    assert read.data["interim"]["sales.value"] == 650
    assert read.data["interim"]["sales.slot.A1.count"] == 3

    second = await build_dex_report(journal, config, reset=False, now=fixed_now)
    check_g85_and_se(second)
    assert find(second, "VA1") == ["650", "4", "0", "0"]
    assert find(second, "CA3") == ["0", "0", "0", "0", "800", "100", "200", "500"]
    assert find(second, "EA3")[:1] == ["1"] and find(second, "EA3")[4] == "20261130"

    await coin(journal, 3, 100)
    await sell(journal, 20, "B2", 200, "cash")
    third = await build_dex_report(journal, config, reset=False, now=fixed_now)
    assert find(third, "VA1") == ["850", "5", "200", "1"]
    assert find(third, "CA2") == ["500", "3", "200", "1"]
    pa2 = [r[1:] for r in segments(third) if r[0] == "PA2"]
    assert pa2 == [["3", "450", "0", "0"], ["2", "400", "1", "200"]]
    assert await journal.verify_counters() == []


async def test_lifetime_and_interim_counters_survive_pruning_and_a_restart(
    journal: Journal, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    await fill_journal(journal)
    await build_dex_report(journal, config, reset=True, now=fixed_now)
    await sell(journal, 30, "A1", 150, "card")
    before = await build_dex_report(journal, config, reset=False, now=fixed_now)
    assert await journal.ack(journal.journal_id, journal.last_seq)
    pruned = await journal.prune(datetime.now(UTC) + timedelta(days=2), 1)
    assert pruned == journal.last_seq  # every record is gone, the audit_read among them
    after = await build_dex_report(journal, config, reset=False, now=fixed_now)
    for tag in ("VA1", "CA2", "CA3", "CA4", "DA2", "DB2", "EA7"):
        assert find(after, tag) == find(before, tag), tag
    assert find(after, "VA1") == ["800", "5", "150", "1"]
    assert [r for r in segments(after) if r[0] == "PA2"] == [
        r for r in segments(before) if r[0] == "PA2"
    ]
    assert await journal.verify_counters() == []
    await journal.close()
    reopened = await Journal.open(tmp_path)
    try:
        again = await build_dex_report(reopened, config, reset=False, now=fixed_now)
        assert find(again, "VA1") == ["800", "5", "150", "1"]
        assert find(again, "EA7") == ["1", "1"]  # the restart counts as a power-up
    finally:
        await reopened.close()


async def test_a_reading_overtaken_by_another_reset_cannot_reset_twice(
    journal: Journal, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    await fill_journal(journal)
    slow = await read_audit(journal, config, via="dex_port", reset=True)
    await build_dex_report(journal, config, reset=True, via="cloud")
    with pytest.raises(DexError, match="another read with reset"):
        await reset_audit(journal, slow)
    report = await build_dex_report(journal, config, reset=False)
    assert find(report, "VA1") == ["650", "4", "0", "0"]  # not below zero, not reset twice
    assert len([r for r in await journal.records(limit=10_000) if r.type == "audit_read"]) == 1


async def test_an_audit_read_record_is_checked(journal: Journal) -> None:
    for bad in (
        {"interim": {"sales.value": -1}, "via": "cli"},
        {"interim": {"sales value": 1}, "via": "cli"},
        {"interim": {"sales.value": True}, "via": "cli"},
        {"interim": [], "via": "cli"},
        {"interim": {}},
        {"interim": {f"sales.slot.S{n}.count": 1 for n in range(2000)}, "via": "cli"},
    ):
        with pytest.raises(RecordInvalid):
            await journal.append("audit_read", bad)


async def test_migration_counts_the_retained_device_faults_of_an_older_journal(
    tmp_path: Path,
) -> None:
    journal = await Journal.open(tmp_path)
    for state in ("fault", "offline", "fault", "online"):
        await journal.append("device", {"device": "bill", "state": state, "detail": "test"})
    await journal.close()
    # Make it the journal an older vmc left: no device event counters, migration 0002 not run.
    conn = sqlite3.connect(database_path(tmp_path))
    with conn:
        conn.execute("DELETE FROM counters WHERE name LIKE 'device.%'")
        conn.execute("DELETE FROM _sqlite_migrations WHERE name = '0002_device_event_counters'")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    reopened = await Journal.open(tmp_path)
    try:
        assert reopened.schema_version == 2
        counters = await reopened.counters()
        assert counters["device.bill.fault.count"] == 2
        assert counters["device.bill.offline.count"] == 1
        assert await reopened.verify_counters() == []
    finally:
        await reopened.close()
