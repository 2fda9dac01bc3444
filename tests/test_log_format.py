"""The daemon's log (vmc/log.py, docs/logging.md): the format ``auto`` picks for journald, a
terminal and anything else; the flow ids bound through a sale and gone after it; the one helper
for a recurring failure.

Formats are checked in a subprocess whose stdout is what the format is chosen for: a real file
named by JOURNAL_STREAM as systemd names the journal's socket, a real pty. The flow ids are
checked on a real VendMachine with the real journal, the VMC96 driver and simulator and the coin
changer simulator (the rig of tests/test_payments_qr.py), and once end to end on the daemon as a
subprocess.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.contextvars import merge_contextvars

from hil.harness import Daemon, journal_records, write_config
from tests.test_payments_qr import Rig, until
from vmc.log import FLOW_IDS, FailureLog, bind_ids, bound_ids, current_ids, resolve_format

SUBPROCESS_TIMEOUT_S = 60.0
#: How long the pty reader waits for more output before it looks whether the child ended.
PTY_READ_STEP_S = 0.1

SCRIPT = """
import logging, sys
from vmc.log import configure_logging, get_logger
configure_logging("trace", sys.argv[1])
log = get_logger("vmc.test")
log.trace("bytes on the bus", raw="0b 0b")
log.debug("poll quiet")
log.info("coin accepted", credit=150, note="two\\nlines")
log.warning("changer offline")
log.error("journal unwritable")
logging.getLogger("drivers.test").critical("line process failed")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("step failed")
"""
#: (level, syslog priority) of SCRIPT's lines, in order (sd-daemon(3)).
EXPECTED = [
    ("trace", 7),
    ("debug", 7),
    ("info", 6),
    ("warning", 4),
    ("error", 3),
    ("critical", 2),
    ("error", 3),
]
PREFIXED = re.compile(r"^<([0-7])>(\{.*\})$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_to_file(tmp_path: Path, fmt: str, journal_stream: str | None) -> list[str]:
    out_path = tmp_path / "stdout"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with out_path.open("w") as out:
        if journal_stream == "this file":
            status = os.fstat(out.fileno())
            env["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT, fmt],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=SUBPROCESS_TIMEOUT_S,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    return out_path.read_text().splitlines()


def test_auto_under_journald_is_json_lines_with_syslog_prefixes(tmp_path: Path) -> None:
    lines = run_to_file(tmp_path, "auto", journal_stream="this file")

    # One line per record (the newline in a value and the traceback stay inside the JSON).
    assert len(lines) == len(EXPECTED), lines
    seen = []
    for line in lines:
        match = PREFIXED.match(line)
        assert match is not None, line
        record = json.loads(match.group(2))
        seen.append((record["level"], int(match.group(1))))
    assert seen == EXPECTED
    info = json.loads(PREFIXED.match(lines[2]).group(2))  # type: ignore[union-attr]
    assert (info["event"], info["credit"], info["note"]) == ("coin accepted", 150, "two\nlines")
    failed = json.loads(PREFIXED.match(lines[6]).group(2))  # type: ignore[union-attr]
    assert "ZeroDivisionError" in failed["exception"]


def test_auto_with_stdout_not_the_journal_stream_is_plain_json(tmp_path: Path) -> None:
    # systemd set JOURNAL_STREAM, but stdout was redirected since (another file): no prefixes.
    other = tmp_path / "other"
    other.write_text("")
    status = other.stat()
    lines = run_to_file(tmp_path, "auto", journal_stream=f"{status.st_dev}:{status.st_ino}")
    assert [json.loads(line)["level"] for line in lines] == [level for level, _ in EXPECTED]

    # Without JOURNAL_STREAM, or with a malformed one: plain JSON as well.
    for value in (None, "garbage", "1:x"):
        lines = run_to_file(tmp_path, "auto", journal_stream=value)
        assert json.loads(lines[0])["event"] == "bytes on the bus"


def test_an_explicit_format_wins_under_journald(tmp_path: Path) -> None:
    lines = run_to_file(tmp_path, "json", journal_stream="this file")
    assert json.loads(lines[3])["event"] == "changer offline"
    lines = run_to_file(tmp_path, "journal", journal_stream=None)
    assert lines[3].startswith('<4>{"ts":')
    lines = run_to_file(tmp_path, "console", journal_stream="this file")
    assert not lines[3].startswith(("<", "{")) and "changer offline" in lines[3]


def test_auto_on_a_terminal_is_human_readable_with_colours(tmp_path: Path) -> None:
    leader, follower = os.openpty()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, "auto"],
        stdout=follower,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    os.close(follower)
    output = b""
    try:
        output = _read_until_closed(leader, proc)
    finally:
        os.close(leader)
        proc.wait(SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0
    text = output.decode()
    assert "\x1b[" in text  # colours
    plain = ANSI.sub("", text)
    coin_line = next(line for line in plain.splitlines() if "coin accepted" in line)
    assert "info" in coin_line and "credit=150" in coin_line
    assert not coin_line.lstrip().startswith(("{", "<"))
    assert "warning" in next(line for line in plain.splitlines() if "changer offline" in line)


def _read_until_closed(fd: int, proc: subprocess.Popen[bytes]) -> bytes:
    """Everything the child writes to the pty, until it closed its side (EIO on Linux)."""
    chunks: list[bytes] = []
    deadline_polls = int(SUBPROCESS_TIMEOUT_S / PTY_READ_STEP_S)
    for _ in range(deadline_polls):
        ready, _, _ = select.select([fd], [], [], PTY_READ_STEP_S)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the pty
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_resolve_format_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="log format must be one of"):
        resolve_format("xml", sys.stdout)


# --------------------------------------------------------------------------------------------
# FailureLog
# --------------------------------------------------------------------------------------------


def test_failure_log_warns_once_then_debug_then_info_once() -> None:
    with structlog.testing.capture_logs() as logs:
        failing = FailureLog(structlog.get_logger("vmc.test"))
        assert failing.recovered("link up again") is False  # nothing failed: no line
        assert failing.failed("link down", detail="refused") is True
        assert failing.failed("link down", detail="timed out") is False
        assert failing.failed("link down", detail="timed out") is False
        assert failing.failing and failing.failures == 3
        assert failing.recovered("link up again", detail="ok") is True
        assert failing.recovered("link up again") is False
        assert failing.failed("link down", detail="refused") is True  # a new episode
    assert [(e["log_level"], e["event"], e.get("failures")) for e in logs] == [
        ("warning", "link down", None),
        ("debug", "link down", 2),
        ("debug", "link down", 3),
        ("info", "link up again", 3),
        ("warning", "link down", None),
    ]
    assert logs[1]["detail"] == "timed out"


def test_failure_log_on_a_stdlib_logger_puts_the_fields_on_the_record() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("drivers.test.failure_log")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = Keep()
    logger.addHandler(handler)
    try:
        failing = FailureLog(logger)
        failing.failed("changer offline: 100% silent", device="coin")
        failing.failed("changer offline: 100% silent", device="coin")
        failing.recovered("changer answers again", device="coin")
    finally:
        logger.removeHandler(handler)
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "changer offline: 100% silent"),
        (logging.DEBUG, "changer offline: 100% silent"),
        (logging.INFO, "changer answers again"),
    ]
    assert [getattr(r, "device", None) for r in records] == ["coin"] * 3
    assert [getattr(r, "failures", None) for r in records] == [None, 2, 2]


# --------------------------------------------------------------------------------------------
# Flow ids
# --------------------------------------------------------------------------------------------


async def test_bound_ids_restore_what_was_bound_and_tasks_keep_their_copy() -> None:
    seen: list[dict[str, Any]] = []

    async def later() -> None:
        await asyncio.sleep(0)
        seen.append(current_ids())

    with bound_ids(session_id="s1"):
        with bound_ids(vend_id="v1", order_id=None):
            bind_ids(cmd_id="c1")  # bound inside: ends with the block too
            task = asyncio.create_task(later())
            assert current_ids() == {"session_id": "s1", "vend_id": "v1", "cmd_id": "c1"}
        assert current_ids() == {"session_id": "s1"}
    assert current_ids() == {}
    await task
    # A task copies the context at creation: its lines carry the flow that started it.
    assert seen == [{"session_id": "s1", "vend_id": "v1", "cmd_id": "c1"}]
    with pytest.raises(ValueError, match="not a flow id"):
        bind_ids(sesion_id="typo")


def _ids(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: entry[key] for key in FLOW_IDS if key in entry}


async def _probe_actor(rig: Rig, event: str) -> None:
    """A step of the actor that only logs: what it carries is what a later step would."""

    async def probe() -> None:
        structlog.get_logger("vmc.test").info(event)

    await rig.machine.submit(probe)


async def test_a_cash_sale_binds_its_session_and_vend_ids_and_leaves_none_behind(
    tmp_path: Path,
) -> None:
    rig = await Rig(tmp_path, cash=True).start()
    try:
        with structlog.testing.capture_logs(processors=[merge_contextvars]) as logs:
            for _ in range(2):
                assert rig.coin_sim.control({"cmd": "insert", "value": 100})["result"] == "tubes"
            await until(lambda: rig.machine.credit == 200, "two coins credited")
            answer = await rig.machine.select("A1")  # 1.50: 0.50 change
            assert answer["ok"] is True and answer["change"] == 50
            await _probe_actor(rig, "probe after the sale")
            structlog.get_logger("vmc.test").info("the test's own line")
            # The next customer: a session of its own.
            coin = rig.coin
            assert coin is not None
            await until(lambda: coin.accepting, "coins accepted again")
            assert rig.coin_sim.control({"cmd": "insert", "value": 100})["result"] == "tubes"
            await until(lambda: rig.machine.credit == 100, "a coin credited")
            assert (await rig.machine.cancel())["paid"] == 100
            await _probe_actor(rig, "probe after the refund")
        (intent,) = await rig.records("vend_intent")
    finally:
        await rig.stop()

    vend_id = intent.data["intent_id"]
    events = [e["event"] for e in logs]
    started = [e for e in logs if e["event"] == "cash session started"]
    ended = [e for e in logs if e["event"] == "cash session ended"]
    assert len(started) == len(ended) == 2, events
    first, second = started[0]["session_id"], started[1]["session_id"]
    assert first != second
    # Every line from the first session's start to its end carries it; the vend's lines
    # carry the vend id too, which is the journal's intent_id.
    begin, end = logs.index(started[0]), logs.index(ended[0])
    assert all(e.get("session_id") == first for e in logs[begin : end + 1]), logs[begin:end]
    in_vend = [e for e in logs if e.get("vend_id") == vend_id]
    assert {"vend started", "sold"} <= {e["event"] for e in in_vend}
    assert all(e["session_id"] == first for e in in_vend)
    assert _ids(ended[0]) == {"session_id": first}  # the vend's id ended with the vend
    # Nothing after a session carries its ids.
    for event in ("probe after the sale", "the test's own line", "probe after the refund"):
        (line,) = [e for e in logs if e["event"] == event]
        assert _ids(line) == {}, line
    assert all(e.get("session_id") != first for e in logs[end + 1 :])


async def test_a_qr_vend_by_command_carries_cmd_order_and_vend_ids(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, cash=False).start()
    try:
        with structlog.testing.capture_logs(processors=[merge_contextvars]) as logs:
            order = (await rig.qr.create_order("A1"))["order"]
            result = await rig.vend(order)
            assert result["ok"] is True
            await _probe_actor(rig, "probe after the command")
        assert current_ids() == {}  # the test task handed the command over: nothing stuck
        (intent,) = await rig.records("vend_intent")
    finally:
        await rig.stop()

    order_id, vend_id, cmd_id = order["order_id"], intent.data["intent_id"], result["cmd_id"]
    (created,) = [e for e in logs if e["event"] == "QR order created"]
    assert _ids(created) == {"order_id": order_id}
    for event in ("vend started", "sold"):
        (line,) = [e for e in logs if e["event"] == event]
        assert _ids(line) == {"cmd_id": cmd_id, "order_id": order_id, "vend_id": vend_id}
    (done,) = [e for e in logs if e["event"] == "command done"]
    assert _ids(done) == {"cmd_id": cmd_id}
    (probe,) = [e for e in logs if e["event"] == "probe after the command"]
    assert _ids(probe) == {}


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------

#: hil/sim/coin.py DEFAULT_COINS: coin type 4 is 1.00.
COIN_100 = 4


@pytest.fixture
def journald_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """The daemon with ``log.format = "auto"`` and JOURNAL_STREAM naming its stdout, as systemd
    starts it with StandardOutput=journal."""
    state = tmp_path / "state"
    config = write_config(tmp_path / "vmc.toml", state)
    config.write_text(config.read_text().replace('format = "json"', 'format = "auto"'))
    d = Daemon(config, state)
    d.log_path.write_bytes(b"")  # the daemon appends to this file: its inode is the stream's
    status = d.log_path.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
    with d.running():
        yield d


@pytest.mark.slow
def test_daemon_under_journald_logs_a_cash_sale_with_its_ids(journald_daemon: Daemon) -> None:
    daemon = journald_daemon
    daemon.insert_coins(COIN_100, COIN_100)
    daemon.wait_state(lambda s: s["credit"] == 200, "two coins credited")
    assert daemon.control({"op": "select", "slot": "A1"})["ok"] is True
    daemon.wait_state(lambda s: s["credit"] == 0, "the change paid")
    code, _elapsed = daemon.stop()
    assert code == 0

    records = []
    for line in daemon.log_path.read_text().splitlines():
        if '"ts":' not in line:
            continue  # the simulators the daemon starts print their port on the same stdout
        match = PREFIXED.match(line)
        assert match is not None, line  # every line of the daemon has its priority
        record = json.loads(match.group(2))
        assert int(match.group(1)) == {"trace": 7, "debug": 7, "info": 6, "warning": 4}.get(
            record["level"], int(match.group(1))
        )
        records.append(record)
    (intent,) = [r for r in journal_records(daemon.state_dir) if r["type"] == "vend_intent"]
    vend_id = intent["data"]["intent_id"]
    (sold,) = [r for r in records if r["event"] == "sold"]
    assert sold["vend_id"] == vend_id and sold["session_id"]
    (started,) = [r for r in records if r["event"] == "cash session started"]
    assert started["session_id"] == sold["session_id"]
    ended_at = next(i for i, r in enumerate(records) if r["event"] == "cash session ended")
    stopped = [r for r in records[ended_at + 1 :] if r["event"].startswith("vmc st")]
    assert stopped and all(_ids(r) == {} for r in stopped)
