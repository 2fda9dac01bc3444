"""``vmc dex`` as a real subprocess on a real journal: the report on stdout or in a file, a read
with reset journaled, refused while another process holds the journal, bad configuration."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from tests.dex_support import MACHINE_ID, check_g85_and_se, fill_journal, find
from tests.test_journal_support import PYTHON, subprocess_env
from vmc.journal import Journal
from vmc.journal.files import database_path, open_readonly

CLI = [PYTHON, "-m", "vmc", "dex"]
#: A child Python starting and reading a small journal: seconds on a loaded CI machine.
RUN_TIMEOUT_S = 60


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, env=subprocess_env(), timeout=RUN_TIMEOUT_S
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    state = tmp_path / "state"

    async def fill() -> None:
        journal = await Journal.open(state)
        try:
            await fill_journal(journal)
        finally:
            await journal.close()

    asyncio.run(fill())
    path = tmp_path / "vmc.toml"
    path.write_text(
        f"""
[machine]
id = "{MACHINE_ID}"
state_dir = "state"

[mdb]
simulate = true
[mdb.coin]
[mdb.bill]

[motor]
simulate = true

[[slot]]
id = "A1"
row = 0
col = 0
price = 150
name = "Cola"

[[slot]]
id = "B2"
row = 1
col = 1
price = 200
name = "Water"
"""
    )
    return path


def audit_reads(state: Path) -> int:
    conn = open_readonly(database_path(state))
    try:
        row = conn.execute("SELECT COUNT(*) FROM records WHERE type = 'audit_read'").fetchone()
        return int(row[0])
    finally:
        conn.close()


def test_the_report_on_stdout_and_in_a_file(config_file: Path, tmp_path: Path) -> None:
    shown = run("--config", str(config_file))
    assert shown.returncode == 0, shown.stderr
    report = shown.stdout.decode("ascii")
    check_g85_and_se(report)
    assert find(report, "VA1") == ["650", "4", "650", "4"]
    assert find(report, "EA3")[3] == "CLI"
    output = tmp_path / "audit.dex"
    written = run("--config", str(config_file), "--output", str(output))
    assert written.returncode == 0 and written.stdout == b""
    check_g85_and_se(output.read_bytes().decode("ascii"))
    assert audit_reads(tmp_path / "state") == 0  # a read without reset writes nothing


def test_a_read_with_reset_is_journaled(config_file: Path, tmp_path: Path) -> None:
    first = run("--config", str(config_file), "--reset")
    assert first.returncode == 0, first.stderr
    assert find(first.stdout.decode("ascii"), "VA1") == ["650", "4", "650", "4"]
    assert audit_reads(tmp_path / "state") == 1
    second = run("--config", str(config_file))
    assert find(second.stdout.decode("ascii"), "VA1") == ["650", "4", "0", "0"]


def test_reset_is_refused_while_the_journal_is_open_elsewhere(
    config_file: Path, tmp_path: Path
) -> None:
    async def hold_and_run() -> subprocess.CompletedProcess[bytes]:
        journal = await Journal.open(tmp_path / "state")  # as the running daemon holds it
        try:
            return await asyncio.to_thread(run, "--config", str(config_file), "--reset")
        finally:
            await journal.close()

    refused = asyncio.run(hold_and_run())
    assert refused.returncode == 1 and refused.stdout == b""
    assert b"already open" in refused.stderr and b"console" in refused.stderr
    assert audit_reads(tmp_path / "state") == 0
    shown = run("--config", str(config_file))  # reading without reset works meanwhile too
    assert shown.returncode == 0


def test_a_bad_configuration_or_a_missing_journal(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    minimal = '[machine]\nid = "x"\nstate_dir = "s"\n[mdb]\nsimulate = true\n'
    minimal += "[motor]\nsimulate = true\n"
    bad.write_text(minimal + '[dex]\ncomm_id = "short"\n')
    result = run("--config", str(bad))
    assert result.returncode == 2 and b"dex.comm_id" in result.stderr
    empty = tmp_path / "empty.toml"
    empty.write_text(minimal.replace('"s"', '"nothing-here"'))
    missing = run("--config", str(empty))
    assert missing.returncode == 1 and b"no journal" in missing.stderr
