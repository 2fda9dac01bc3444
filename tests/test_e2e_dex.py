"""End to end: the daemon as a subprocess with ``[dex] port`` on a pty, the simulated machine
(hil/harness.py); a cash sale, then a handheld of the test's own reads the audit report over
DEX/UCS (the read resets the interims, journaled), ``vmc dex`` reads it meanwhile, and the
daemon still stops within its promise."""

from __future__ import annotations

import os
import signal
import subprocess
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.harness import Daemon, journal_records, wait_until, write_config
from tests.dex_support import check_g85_and_se, find, segments
from tests.test_dex_port import Handheld
from tests.test_journal_support import PYTHON, subprocess_env

pytestmark = pytest.mark.slow

COIN_100 = 4  # hil/sim/coin.py DEFAULT_COINS
STOP_PROMISE_S = 2.0
WAIT_S = 20.0


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def test_a_handheld_reads_the_running_machines_audit(
    tmp_path: Path, pty_pair: tuple[int, str]
) -> None:
    master, port = pty_pair
    state = tmp_path / "state"
    config = write_config(tmp_path / "vmc.toml", state, extra=f'[dex]\nport = "{port}"')
    d = Daemon(config, state)
    d.start()
    try:
        d.insert_coins(COIN_100)
        d.wait_state(lambda s: s["credit"] >= 100, "the credit")
        assert d.control({"op": "select", "slot": "A1"})["ok"] is True
        wait_until(
            lambda: any(r["type"] == "sale" for r in journal_records(state)), WAIT_S, "the sale"
        )
        handheld = Handheld(master)
        read = handheld.read_report()
        check_g85_and_se(read.report)
        assert find(read.report, "VA1") == ["100", "1", "100", "1"]
        assert find(read.report, "CA2") == ["100", "1", "100", "1"]
        assert ["PA2", "1", "100", "1", "100"] in segments(read.report)
        wait_until(
            lambda: any(r["type"] == "audit_read" for r in journal_records(state)),
            WAIT_S,
            "the read with reset journaled",
        )
        shown = subprocess.run(
            [PYTHON, "-m", "vmc", "dex", "--config", str(config)],
            capture_output=True,
            env=subprocess_env(),
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert find(shown.stdout.decode("ascii"), "VA1") == ["100", "1", "0", "0"]
        again = handheld.read_report()
        assert find(again.report, "VA1") == ["100", "1", "0", "0"]
    finally:
        code, elapsed = d.stop(signal.SIGTERM)
    assert code == 0 and elapsed < STOP_PROMISE_S, (code, elapsed)
