"""The daemon's log names level 5 "trace" however it reaches it: a ``drivers`` record, or a record
of the MDB line process that its parent logs again with the child's numeric level."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SUBPROCESS_TIMEOUT_S = 60.0

SCRIPT = """
import logging, sys
from vmc.log import configure_logging
configure_logging("trace", sys.argv[1])
# Something else in the process renamed level 5 (logging.basicConfig in a library, or no
# addLevelName at all in a process that relays records): the name shown stays "trace".
logging.addLevelName(5, "Level 5")
relay = logging.getLogger("drivers.mdb.line_process")
relay.log(5, "%s", "tx 0b 0b ack")  # as LineProcessMaster relays a child's record
relay.log(logging.WARNING, "%s", "no response from 0x08")
relay.log(logging.CRITICAL, "%s", "line process failed")
"""


def run(fmt: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, fmt],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def test_level_5_is_trace_in_the_json_log(tmp_path: Path) -> None:
    result = run("json", tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["level"], r["logger"], r["event"]) for r in records] == [
        ("trace", "drivers.mdb.line_process", "tx 0b 0b ack"),
        ("warning", "drivers.mdb.line_process", "no response from 0x08"),
        ("critical", "drivers.mdb.line_process", "line process failed"),
    ]
    assert "Level 5" not in result.stdout


def test_level_5_is_trace_in_the_console_log(tmp_path: Path) -> None:
    result = run("console", tmp_path)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert "trace" in first and "tx 0b 0b ack" in first
    assert "Level 5" not in result.stdout
