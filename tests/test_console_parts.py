"""The console's pure parts: the PIN hash and the lockout (on a clock the test moves), the line
editor fed the bytes a terminal sends, the command table and its completion, and the
``[console]`` configuration table and ``vmc console hash-pin``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmc.config import parse_config
from vmc.console.auth import PinError, PinGuard, hash_pin, verify_pin
from vmc.console.commands import COMMANDS, Context, UsageError, complete, find, help_text
from vmc.console.lineedit import Key, LineEditor
from vmc.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- PIN --------------------------------------------------------------------------------------


def test_pin_hash_verifies_only_its_pin_and_is_salted() -> None:
    stored = hash_pin("4711")
    assert stored.startswith("scrypt:16384:8:1:")
    assert verify_pin("4711", stored)
    assert not verify_pin("4712", stored)
    assert not verify_pin("4711", "")  # no hash configured: nobody logs in
    assert hash_pin("4711") != stored  # a fresh salt every time
    assert "4711" not in stored


@pytest.mark.parametrize("pin", ["123", "12345678901234", "12a4", "", "１２３４"])
def test_pin_shape_is_checked(pin: str) -> None:
    with pytest.raises(PinError):
        hash_pin(pin)


def test_lockout_after_max_failures_doubles_up_to_the_cap() -> None:
    clock = Clock()
    guard = PinGuard("", max_failures=3, lockout_s=30.0, lockout_max_s=100.0, clock=clock)
    assert guard.record(False).failures == 1
    assert not guard.record(False).lockout_started
    third = guard.record(False)
    assert third.lockout_started and third.retry_after_s == 30.0
    clock.now += 29.0
    refused = guard.before_check()
    assert refused is not None and refused.locked and refused.retry_after_s == pytest.approx(1.0)
    delays = []
    for _ in range(4):  # each wrong PIN after a lockout locks again, for twice as long
        clock.now += guard.locked_for()
        assert guard.before_check() is None
        delays.append(guard.record(False).retry_after_s)
    assert delays == [60.0, 100.0, 100.0, 100.0]
    clock.now += guard.locked_for()
    assert guard.record(True).ok
    assert guard.failures == 0 and guard.locked_for() == 0
    assert not guard.record(False).lockout_started  # the count starts again


# --- line editor ------------------------------------------------------------------------------


def typed(editor: LineEditor, data: bytes) -> tuple[bytes, list[str | Key]]:
    echo, entries = b"", []
    for byte in data:
        out, entry = editor.key(byte)
        echo += out
        if entry is not None:
            entries.append(entry)
    return echo, entries


def test_backspace_del_ctrl_u_and_line_ends() -> None:
    editor = LineEditor()
    editor.start("> ")
    echo, entries = typed(editor, b"statux\x7fs\r")
    assert entries == ["status"] and echo == b"statux\b \bs\r\n"
    assert typed(editor, b"abc\x08\x08d\n") == (b"abc\b \b\b \bd\r\n", ["ad"])
    # CR LF is one line end, not a line and an empty one; LF alone and CR alone end a line.
    assert typed(editor, b"one\r\ntwo\nthree\r")[1] == ["one", "two", "three"]
    assert typed(editor, b"gone\x15kept\r") == (b"gone" + b"\b \b" * 4 + b"kept\r\n", ["kept"])
    assert typed(editor, b"\x08\x7f")[0] == b""  # nothing to erase


def test_ctrl_c_ctrl_d_escapes_and_noise() -> None:
    editor = LineEditor()
    editor.start("> ")
    assert typed(editor, b"half\x03") == (b"half^C\r\n", [Key.INTERRUPT])
    assert typed(editor, b"\x04") == (b"\r\n", [Key.END])
    assert typed(editor, b"x\x04\r")[1] == ["x"]  # Ctrl-D only ends an empty line
    # An arrow key (ESC [ A), a stray ESC x, non-ASCII bytes and other control bytes are ignored.
    assert typed(editor, b"a\x1b[Ab\x1bxc\xc3\xa9\x07d\r") == (b"abcd\r\n", ["abcd"])


def test_secret_mode_echoes_stars_and_never_completes() -> None:
    editor = LineEditor(lambda text: ["status"])
    editor.start("PIN: ", secret=True)
    assert typed(editor, b"47\t11\r") == (b"****\r\n", ["4711"])


def test_tab_completes_one_lists_several() -> None:
    ctx = Context(slots=["A1", "A2", "B1"], devices=["coin", "bill"])
    editor = LineEditor(lambda text: complete(text, ctx))
    editor.start("vmc> ")
    assert typed(editor, b"pri\t")[0] == b"pri" + b"ce "
    assert typed(editor, b"b\t")[0] == b"b" + b"\b \bB1 "  # the slot's own spelling
    echo, _ = typed(editor, b"\x15price a\t")
    assert echo.endswith(b"\r\nA1  A2\r\nvmc> price a")  # several: listed, line redrawn
    assert typed(editor, b"\x15res\tc\t")[0].endswith(b"et coin ")
    assert typed(editor, b"\x15journal \t")[0].endswith(b"report  tail\r\nvmc> journal ")


# --- commands ---------------------------------------------------------------------------------


def test_commands_build_their_requests() -> None:
    ctx = Context(decimals=2, slots=["A1", "B1"])
    cases = {
        "price a1 1.30": {"op": "set_slot", "slot": "A1", "price": 130},
        "price B1 2": {"op": "set_slot", "slot": "B1", "price": 200},
        "price B1 0,5": {"op": "set_slot", "slot": "B1", "price": 50},
        "stock A1 7": {"op": "set_slot", "slot": "A1", "stock": 7},
        "slot A1 out": {"op": "set_slot", "slot": "A1", "enabled": False},
        "journal tail": {"op": "journal_tail", "n": 20},
        "journal tail 5": {"op": "journal_tail", "n": 5},
        "payout 3 2": {"op": "coin_payout", "coin_type": 3, "count": 2},
        "fill on": {"op": "coin_fill", "on": True},
        "motor test b1": {"op": "motor_test", "slot": "B1"},
        "qr A1": {"op": "qr_order", "slot": "A1"},
        "qr cancel": {"op": "qr_cancel"},
        "bills empty": {"op": "bills_emptied"},
        "sync force": {"op": "sync_force"},
        "reset Coin": {"op": "device_reset", "device": "coin"},
    }
    for line, request in cases.items():
        found = find(line.split())
        assert found is not None, line
        command, args = found
        assert command.build(args, ctx) == request, line


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("price A1 1.234", "at most 2 decimals"),
        ("price A1 abc", "not an amount"),
        ("price C9 1", "no slot 'C9'"),
        ("stock A1 many", "a whole number"),
        ("slot A1 maybe", "usage: slot SLOT in|out"),
        ("fill", "usage: fill on|off"),
        ("status now", "no arguments"),
    ],
)
def test_bad_arguments_say_how_to_type_the_command(line: str, message: str) -> None:
    found = find(line.split())
    assert found is not None
    with pytest.raises(UsageError, match=message):
        found[0].build(found[1], Context(slots=["A1"]))


def test_help_names_every_command_and_explains_one() -> None:
    text = help_text([])
    for command in COMMANDS:
        assert command.usage in text
    assert help_text(["bills", "empty"]).startswith("bills empty\r\n")
    with pytest.raises(UsageError):
        help_text(["dance"])


# --- configuration and hash-pin ---------------------------------------------------------------


def test_console_table_is_optional_and_checked() -> None:
    base = {"machine": {"id": "VM-1"}, "mdb": {"simulate": True}, "motor": {"simulate": True}}
    config = parse_config(base, Path("/srv"))
    assert config.console.port is None and config.console.pin_hash == ""
    stored = hash_pin("123456")
    config = parse_config(
        {**base, "console": {"port": "/dev/ttyGS0", "pin_hash": stored}}, Path("/srv")
    )
    assert (config.console.port, config.console.baud) == ("/dev/ttyGS0", 115200)
    assert config.redacted()["console"]["pin_hash"] == "***"
    with pytest.raises(ConfigError, match=r"console\.pin_hash: expected the output of"):
        parse_config({**base, "console": {"pin_hash": "4711"}}, Path("/srv"))
    with pytest.raises(ConfigError, match=r"console\.idle_logout_s"):
        parse_config({**base, "console": {"idle_logout_s": 0}}, Path("/srv"))


def test_vmc_console_hash_pin_prints_a_verifiable_hash() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vmc", "console", "hash-pin"],
        input="902134\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert verify_pin("902134", done.stdout.strip())
    bad = subprocess.run(
        [sys.executable, "-m", "vmc", "console", "hash-pin"],
        input="12\n",
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "4 to 12 digits" in bad.stderr
