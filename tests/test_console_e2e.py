"""The technician console end to end, typed the way a person types: the daemon runs as a
subprocess with the simulated machine (hil/harness.py) and its serial console on a pty whose
master end the test holds (tests/console_pty.py); ``vmc console`` runs with a pty as its
terminal. One daemon serves the module's tests, in order (each logs out at its end)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hil.harness import Daemon, journal_records, wait_until, write_config
from tests.console_pty import PtyLine
from vmc.console.auth import hash_pin

pytestmark = pytest.mark.slow

PIN = "4711"
#: Short on purpose: the idle-logout test waits this long for real (and a little more); the
#: other tests answer every prompt within a fraction of it.
IDLE_LOGOUT_S = 3.0
#: The first lockout and its cap, short enough to wait out in a test; max_failures 3.
LOCKOUT_S = 0.5
LOCKOUT_MAX_S = 1.0


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, PtyLine]]:
    tmp = tmp_path_factory.mktemp("console")
    line = PtyLine(tmp / "console.tty")
    console = "\n".join(
        [
            "[console]",
            f'port = "{line.link}"',
            f'pin_hash = "{hash_pin(PIN)}"',
            'user = "tech7"',
            f"idle_logout_s = {IDLE_LOGOUT_S}",
            "max_failures = 3",
            f"lockout_s = {LOCKOUT_S}",
            f"lockout_max_s = {LOCKOUT_MAX_S}",
        ]
    )
    state = tmp / "state"
    daemon = Daemon(write_config(tmp / "vmc.toml", state, extra=console), state)
    daemon.start()
    try:
        yield daemon, line
    finally:
        line.close()
        if daemon.proc is not None:
            code, _elapsed = daemon.stop()
            assert code == 0


def security(daemon: Daemon) -> list[dict[str, Any]]:
    return [r for r in journal_records(daemon.state_dir) if r["type"] == "security"]


def log_in(line: PtyLine) -> None:
    line.type("\r")  # wakes the prompt if it was printed before the test looked
    line.expect("PIN: ")
    line.type(PIN + "\r")
    line.expect("type help for the commands")
    line.expect("vmc> ")


def log_out(line: PtyLine) -> None:
    line.type("logout\r")
    line.expect("logged out")


def test_wrong_pin_then_the_right_one(machine: tuple[Daemon, PtyLine]) -> None:
    daemon, line = machine
    line.expect("PIN: ")
    line.type("1234\r")
    assert "****" in line.expect("wrong PIN")  # the PIN is never echoed
    line.expect("PIN: ")
    line.type(PIN + "\r")
    line.expect("logged in as tech7")
    log_out(line)
    records = security(daemon)
    assert [r["data"]["what"] for r in records] == [
        "console_pin_failed",
        "console_login",
        "console_logout",
    ]
    assert all(r["source"] == {"kind": "console", "user": "tech7"} for r in records)
    assert "1234" not in str(records) and PIN not in str(records)


def test_backspace_ctrl_u_and_ctrl_c_edit_the_line(machine: tuple[Daemon, PtyLine]) -> None:
    _daemon, line = machine
    log_in(line)
    line.type("nonsense\x15")  # Ctrl-U: the whole line erased
    line.type("halp\x03")  # Ctrl-C: dropped
    line.expect("^C\r\nvmc> ")
    line.type("statux\x7fs\r")  # DEL erases the x
    out = line.expect("vmc> ")
    assert "phase idle" in out and "in service: yes" in out
    assert "unknown command" not in out
    line.type("faultz\x08s\r")  # BS works too
    assert "faults: none" in line.expect("vmc> ")
    line.type("devices\r")
    devices = line.expect("vmc> ")
    assert "coin: ready  level 3" in devices and "bill: ready  level 2" in devices
    line.type("coins\r")
    assert "fill mode: off" in line.expect("vmc> ")
    line.type("qr A1\r")  # this machine has no cloud link: no QR payment
    assert "refused: qr_unavailable" in line.expect("vmc> ")
    log_out(line)


def test_tab_completes_a_command_and_a_slot_name(machine: tuple[Daemon, PtyLine]) -> None:
    daemon, line = machine
    log_in(line)
    line.type("pri\t")
    line.expect("ce ")  # "pri" + Tab -> "price "
    line.type("b\t")
    line.expect("B1 ")  # the only slot starting with B
    line.type("1.40\r")
    assert "B1: price 1.40" in line.expect("vmc> ")
    line.type("journal t\t")
    line.expect("ail ")
    line.type("3\r")
    out = line.expect("vmc> ")
    assert "price_changed" in out and "console:tech7" in out
    log_out(line)
    slot = next(s for s in daemon.state()["state"]["slots"] if s["slot"] == "B1")
    assert slot["price"] == 140


def test_help_lists_every_command(machine: tuple[Daemon, PtyLine]) -> None:
    _daemon, line = machine
    log_in(line)
    line.type("help\r")
    out = line.expect("vmc> ")
    for usage in (
        "status",
        "faults",
        "devices",
        "reset DEVICE",
        "coins",
        "fill on|off",
        "payout TYPE COUNT",
        "bills empty",
        "motor test SLOT",
        "price SLOT AMOUNT",
        "stock SLOT COUNT",
        "slot SLOT in|out",
        "journal tail [N]",
        "journal report",
        "sync force",
        "qr SLOT",
        "config",
        "dex [reset]",
        "logout",
    ):
        assert usage in out, usage
    log_out(line)


def test_set_price_and_stock_show_in_state_and_journal(machine: tuple[Daemon, PtyLine]) -> None:
    daemon, line = machine
    log_in(line)
    line.type("price A2 1.35\r")
    assert "A2: price 1.35" in line.expect("vmc> ")
    line.type("stock A2 7\r")
    assert "stock 7" in line.expect("vmc> ")
    line.type("price A2 1.355\r")
    assert "at most 2 decimals" in line.expect("vmc> ")
    line.type("price Z9 1\r")
    assert "no slot 'Z9'" in line.expect("vmc> ")
    log_out(line)
    slot = next(s for s in daemon.state()["state"]["slots"] if s["slot"] == "A2")
    assert (slot["price"], slot["stock"]) == (135, 7)
    console = [
        r
        for r in journal_records(daemon.state_dir)
        if r["source"].get("kind") == "console" and r["data"].get("slot") == "A2"
    ]
    assert [(r["type"], r["data"]["old"], r["data"]["new"]) for r in console] == [
        ("price_changed", 120, 135),
        ("inventory_changed", 10, 7),
    ]
    assert {r["source"]["user"] for r in console} == {"tech7"}


def test_a_dropped_line_then_a_new_session_works(machine: tuple[Daemon, PtyLine]) -> None:
    daemon, line = machine
    log_in(line)
    line.drop()  # the cable is pulled mid-session
    wait_until(
        lambda: any("line dropped" in r["data"]["detail"] for r in security(daemon)),
        15.0,
        "the dropped session's logout journaled",
    )
    line.plug()  # plugged in again: the daemon opens the port anew
    log_in(line)
    line.type("status\r")
    assert "phase idle" in line.expect("vmc> ")
    log_out(line)


def test_idle_logout(machine: tuple[Daemon, PtyLine]) -> None:
    daemon, line = machine
    log_in(line)
    line.expect("logged out (idle)", timeout_s=IDLE_LOGOUT_S + 10.0)
    assert security(daemon)[-1]["data"]["what"] == "console_logout"
    assert security(daemon)[-1]["data"]["detail"].endswith("idle")


def test_lockout_after_three_wrong_pins_grows(machine: tuple[Daemon, PtyLine]) -> None:
    daemon, line = machine
    line.type("\r")
    for _ in range(2):
        line.expect("PIN: ")
        line.type("0000\r")
        line.expect("wrong PIN")
    line.expect("PIN: ")
    line.type("0000\r")
    line.expect("locked: try again in 0.5 s")
    line.expect("PIN: ")
    line.type(PIN + "\r")  # even the right PIN is refused while locked
    line.expect("locked")
    # After the lockout, one more wrong PIN locks again, for twice as long.
    wait_until(lambda: _lockout_passed(daemon), 10.0, "the lockout over")
    line.expect("PIN: ")
    line.type("0000\r")
    line.expect("locked: try again in 1 s")
    wait_until(lambda: _lockout_passed(daemon), 10.0, "the second lockout over")
    log_in(line)
    log_out(line)
    lockouts = [
        r["data"]["detail"] for r in security(daemon) if r["data"]["what"] == "console_lockout"
    ]
    assert [d.rsplit(" for ", 1)[1] for d in lockouts] == ["0.5 s", "1 s"]


def _lockout_passed(daemon: Daemon) -> bool:
    # The daemon's own clock says when the lockout is over.
    answer = daemon.control({"op": "console_status"})
    return bool(answer["ok"]) and answer["locked_for_s"] == 0


def test_terminal_console_over_the_control_socket(
    machine: tuple[Daemon, PtyLine], tmp_path: Path
) -> None:
    daemon, _line = machine
    terminal = PtyLine()
    slave = os.open(terminal.slave_name, os.O_RDWR | os.O_NOCTTY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmc", "console", "--config", str(daemon.config)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    try:
        terminal.expect("PIN: ")
        terminal.type(PIN + "\r")
        terminal.expect("vmc> ")
        terminal.type("stat\t")
        terminal.expect("us ")
        terminal.type("\r")
        assert "A1" in terminal.expect("vmc> ")
        terminal.type("logout\r")
        terminal.expect("logged out")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        terminal.close()
    assert security(daemon)[-1]["data"]["detail"] == "terminal: logout"


def test_terminal_console_without_a_daemon_says_so(tmp_path: Path) -> None:
    config = write_config(tmp_path / "vmc.toml", tmp_path / "state")
    done = subprocess.run(
        [sys.executable, "-m", "vmc", "console", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert b"vmc console:" in done.stdout and b"PIN" not in done.stdout
