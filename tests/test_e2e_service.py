"""End to end, the daemon's own service behaviour: how it stops (acceptors off on the wire, the
control clients answered), when it says it runs, what it says about its journal, the embedded
simulators' state across restarts and the MDB link state. The daemon runs as a subprocess
against the real simulators (hil/harness.py), as in tests/test_e2e_cash.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hil.harness import (
    START_TIMEOUT_S,
    Daemon,
    ExternalSims,
    journal_records,
    wait_until,
    write_config,
)
from hil.sim.control import JsonLineClient

pytestmark = pytest.mark.slow

COIN_50, COIN_100 = 3, 4
BILL_500 = 0
#: vmc run promises to stop within this after SIGTERM (README).
STOP_PROMISE_S = 2.0


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[ExternalSims]:
    s = ExternalSims(tmp_path / "sims", "coin,bill,cashless")
    try:
        yield s
    finally:
        s.stop()


def external_daemon(tmp_path: Path, sims: ExternalSims, extra: str = "") -> Daemon:
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "vmc.toml",
        state,
        mdb_port=sims.mdb_port,
        motor_port=sims.motor_port,
        devices=("coin", "bill", "cashless"),
        extra=extra,
    )
    return Daemon(config, state, sims)


def sim_status(d: Daemon) -> dict[str, Any]:
    answer = JsonLineClient(d.mdb_control, 10.0)
    try:
        reply = answer.call({"cmd": "status"})
    finally:
        answer.close()
    assert reply["ok"], reply
    result: dict[str, Any] = reply["result"]
    return result


def log_events(d: Daemon) -> list[dict[str, Any]]:
    return list(d.log_lines())


def assert_no_traceback(d: Daemon) -> None:
    for line in d.log_lines():
        assert "exception" not in line and "exc_info" not in line, line
    assert "Traceback" not in d.log_path.read_text(errors="replace")


# --- 1: acceptors off on the wire at stop ------------------------------------------------------


def test_sigterm_leaves_every_acceptor_disabled_on_the_wire(
    tmp_path: Path, sims: ExternalSims
) -> None:
    d = external_daemon(tmp_path, sims)
    d.start()
    d.wait_state(lambda s: s["devices"].get("cashless") == "ready", "the reader ready")
    assert sim_status(d)["bill"]["bill"]["enable_mask"] != 0  # enabled while running

    code, elapsed = d.stop(signal.SIGTERM)

    assert code == 0
    assert elapsed < STOP_PROMISE_S, f"took {elapsed:.2f} s to stop"
    # The simulators outlive the daemon, as hardware does: what it was told last holds.
    status = sim_status(d)
    assert status["bill"]["bill"]["enable_mask"] == 0
    assert status["bill"]["bill"]["accepting"] is False
    # The coin simulator does not show its COIN TYPE accept mask: a coin inserted now shows it
    # (a coin whose accept bit is off is rejected).
    inserted = d.mdb_sim("coin", "insert", coin_type=COIN_100)
    assert inserted["result"] == "rejected", inserted
    assert d.mdb_sim("cashless", "state")["state"] != "enabled"
    assert "vmc stopped" in [line.get("event") for line in d.log_lines()]


def test_coin_inserted_just_before_sigterm_is_journaled(tmp_path: Path, sims: ExternalSims) -> None:
    d = external_daemon(tmp_path, sims)
    d.start()
    d.insert_coins(COIN_100)
    code, elapsed = d.stop(signal.SIGTERM)  # the coin may still be in the changer's POLL queue
    assert code == 0 and elapsed < STOP_PROMISE_S
    cash_in = [r["data"] for r in journal_records(d.state_dir) if r["type"] == "cash_in"]
    assert [(c["device"], c["amount"]) for c in cash_in] == [("coin", 100)]


# --- 2: subscribers get "closing" ----------------------------------------------------------------


def test_subscriber_gets_closing_before_the_stream_ends(tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = Daemon(write_config(tmp_path / "vmc.toml", state), state)
    d.start()
    client = JsonLineClient(d.control_socket, 10.0)
    try:
        assert client.call({"op": "subscribe"})["ok"] is True
        code, _elapsed = d.stop(signal.SIGTERM)
        assert code == 0
        events: list[dict[str, Any]] = []
        with contextlib.suppress(ConnectionError):
            while True:
                events.append(client.read())
    finally:
        client.close()
    assert events and events[-1]["event"] == "closing", events
    assert isinstance(events[-1]["ts_mono"], float)


# --- 3: SIGTERM during a vend -------------------------------------------------------------------


def test_sigterm_during_a_vend_answers_the_select_and_logs_no_traceback(tmp_path: Path) -> None:
    sims = ExternalSims(tmp_path / "sims", motor_args=("--turn-time", "2.5"))
    try:
        d = cash_daemon(tmp_path, sims)
        d.start()
        d.insert_coins(COIN_100)
        d.wait_state(lambda s: s["credit"] == 100, "credit")
        selection = d.select_until_vending("A1")
        code, elapsed = d.stop(signal.SIGTERM)
        answer = selection.answer(10)

        assert code == 0
        assert elapsed < STOP_PROMISE_S, f"took {elapsed:.2f} s to stop"
        # The motor turn takes longer than the stop budget: the vend cannot finish.
        assert answer["ok"] is False and answer["error"] == "closing", answer
        assert answer["message"]
        assert_no_traceback(d)
        assert not [line for line in d.log_lines() if line.get("level") == "error"]
    finally:
        sims.stop()


def cash_daemon(tmp_path: Path, sims: ExternalSims) -> Daemon:
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "vmc.toml", state, mdb_port=sims.mdb_port, motor_port=sims.motor_port
    )
    return Daemon(config, state, sims)


def test_sigterm_during_a_short_vend_answers_with_the_result(tmp_path: Path) -> None:
    sims = ExternalSims(tmp_path / "sims", motor_args=("--turn-time", "0.2"))
    try:
        d = cash_daemon(tmp_path, sims)
        d.start()
        d.insert_coins(COIN_100)
        d.wait_state(lambda s: s["credit"] == 100, "credit")
        selection = d.select_until_vending("A1")
        code, elapsed = d.stop(signal.SIGTERM)
        answer = selection.answer(10)
        assert code == 0 and elapsed < STOP_PROMISE_S
        assert answer == {"ok": True, "slot": "A1", "price": 100, "change": 0, "credit": 0}
        assert [r["type"] for r in journal_records(d.state_dir) if r["type"] == "sale"] == ["sale"]
        assert_no_traceback(d)
    finally:
        sims.stop()


# --- 4: "vmc running" once money is really accepted -------------------------------------------


def test_vmc_running_is_logged_only_once_money_is_accepted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "vmc.toml", state)
    # Slow polling: the enable would go out a long time after start-up finished.
    config.write_text(config.read_text().replace("poll_interval_ms = 50", "poll_interval_ms = 600"))
    d = Daemon(config, state)
    d.start(wait_in_service=False)
    try:
        wait_until(
            lambda: any(line.get("event") == "vmc running" for line in d.log_lines()),
            START_TIMEOUT_S,
            '"vmc running" in the log',
        )
        # A customer who inserts money the moment the machine says it runs.
        inserted = d.mdb_sim("coin", "insert", coin_type=COIN_50)
        assert inserted["result"] != "rejected", inserted
        assert sim_status(d)["bill"]["bill"]["accepting"] is True
        running = next(line for line in d.log_lines() if line.get("event") == "vmc running")
        assert running["level"] == "info"
        assert running["accepting"] == {"coin": True, "bill": True}
    finally:
        assert d.stop()[0] == 0


def test_vmc_running_says_why_it_takes_no_money(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "vmc.toml", state, devices=())  # no acceptor at all
    d = Daemon(config, state)
    d.start(wait_in_service=False)
    try:
        wait_until(
            lambda: any(line.get("event", "").startswith("vmc running") for line in d.log_lines()),
            START_TIMEOUT_S,
            '"vmc running" in the log',
        )
        running = next(
            line for line in d.log_lines() if line.get("event", "").startswith("vmc running")
        )
        assert running["level"] == "warning"
        assert running["event"] == "vmc running, not taking money"
        assert running["why"]
    finally:
        assert d.stop()[0] == 0


# --- 5: a deleted journal is not a silent fresh start -------------------------------------------


def test_deleted_journal_is_reported_loudly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = Daemon(write_config(tmp_path / "vmc.toml", state), state)
    d.start()
    first_j = json.loads(
        subprocess.run(
            [
                sys.executable,
                *("-m", "vmc", "journal", "export", "--format", "json"),
                "--state-dir",
                str(state),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
    )["journal"]
    assert d.stop()[0] == 0
    created = [line for line in d.log_lines() if line.get("event") == "new journal created"]
    assert [(c["level"], c["journal_id"]) for c in created] == [("warning", first_j)]
    assert not [line for line in d.log_lines() if line.get("level") == "error"]

    (state / "journal.sqlite3").unlink()  # an operator's mistake, a bad SD card, a script
    d.log_path.unlink()
    d.start()
    assert d.stop()[0] == 0

    lines = list(d.log_lines())
    created = [line for line in lines if line.get("event") == "new journal created"]
    assert len(created) == 1 and created[0]["journal_id"] != first_j
    gone = [line for line in lines if line.get("event") == "previous journal is missing"]
    assert len(gone) == 1, lines
    assert gone[0]["level"] == "error"
    assert gone[0]["previous_journal_id"] == first_j
    assert gone[0]["journal_id"] == created[0]["journal_id"]
    # The backend is told too, in the new journal.
    notes = [
        r["data"]
        for r in journal_records(state)
        if r["type"] == "device" and r["data"]["device"] == "journal"
    ]
    assert len(notes) == 1 and first_j in notes[0]["detail"], notes


# --- 6: the embedded simulators keep their state across restarts ---------------------------------


def _sim_has_state_flag() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "hil.sim", "--help"], capture_output=True, text=True, timeout=60
    )
    return "--state" in out.stdout


def test_restart_on_the_embedded_sim_journals_no_correction(tmp_path: Path) -> None:
    if not _sim_has_state_flag():
        pytest.skip("python -m hil.sim has no --state yet")
    state = tmp_path / "state"
    d = Daemon(write_config(tmp_path / "vmc.toml", state), state)
    d.start()
    d.insert_coins(COIN_100, COIN_50)
    d.wait_state(lambda s: s["credit"] == 150, "credit")
    assert d.control({"op": "select", "slot": "A1"})["ok"] is True  # 0.50 change paid
    assert d.stop()[0] == 0
    assert (state / "sim-mdb.state.json").exists()
    # The first start of a new journal learns the tube counts as corrections; after that the
    # journal follows every coin.
    first = len(journal_records(state))

    d.start()
    assert d.state()["state"]["credit"] == 0
    assert d.stop()[0] == 0
    second_run = journal_records(state)[first:]
    assert [r["type"] for r in second_run][:1] == ["boot"]
    assert [r for r in second_run if r["type"] == "correction"] == []


# --- 7: MDB link state -------------------------------------------------------------------------


def _master_has_link_state() -> bool:
    from drivers.mdb.line_process import LineProcessMaster

    return hasattr(LineProcessMaster, "add_link_listener")


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TcpMdbSim:
    """``python -m hil.sim --tcp``: a bus that can be taken away and brought back on the same
    address, as a ser2net bridge or an unplugged adapter would."""

    def __init__(self, workdir: Path, port: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.control = workdir / "mdb-tcp.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "hil.sim", "--devices", "coin,bill"),
                *("--tcp", f"127.0.0.1:{self.port}", "--control", str(self.control)),
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
        )
        wait_until(self.control.exists, START_TIMEOUT_S, "the TCP simulator")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def test_mdb_link_down_takes_the_machine_out_of_service_and_back(tmp_path: Path) -> None:
    if not _master_has_link_state():
        pytest.skip("LineProcessMaster has no link state API yet (add_link_listener)")
    motor = ExternalSims(tmp_path / "sims", devices="coin")  # its motor simulator only
    bus = TcpMdbSim(tmp_path / "tcp", _free_tcp_port())
    bus.start()
    try:
        state = tmp_path / "state"
        config = write_config(
            tmp_path / "vmc.toml",
            state,
            mdb_port=f"socket://127.0.0.1:{bus.port}",
            motor_port=motor.motor_port,
        )
        d = Daemon(config, state)
        d.start()
        assert d.state()["state"]["mdb_link"]["state"] == "up"
        watcher = JsonLineClient(d.control_socket, 30.0)
        try:
            assert watcher.call({"op": "subscribe"})["ok"] is True
            bus.stop()  # the bridge goes away
            down = d.wait_state(
                lambda s: s["mdb_link"]["state"] == "down", "link down", timeout_s=20
            )
            assert down["in_service"] is False and "mdb" in down["faults"]
            assert down["mdb_link"]["detail"]
            bus.start()
            d.wait_state(
                lambda s: s["mdb_link"]["state"] == "up" and s["in_service"],
                "link back, in service",
                timeout_s=40,
            )
            links: list[dict[str, Any]] = []
            deadline = time.monotonic() + 10
            while len(links) < 2 and time.monotonic() < deadline:
                event = watcher.read()
                if event.get("event") == "link":
                    links.append(event)
            assert [e["state"] for e in links] == ["down", "up"]
        finally:
            watcher.close()
        assert d.stop()[0] == 0
        records = [
            r["data"]
            for r in journal_records(state)
            if r["type"] == "device" and r["data"]["device"] == "mdb"
        ]
        assert [r["state"] for r in records] == ["offline", "recovered"]
        lines = list(d.log_lines())
        down_lines = [line for line in lines if line.get("event") == "mdb link down"]
        up_lines = [line for line in lines if line.get("event") == "mdb link up again"]
        # The loss at WARNING; failed reopenings, the same condition, at DEBUG.
        levels = [line["level"] for line in down_lines]
        assert levels[:1] == ["warning"] and set(levels[1:]) <= {"debug"}, levels
        assert [line["level"] for line in up_lines] == ["info"]
    finally:
        bus.stop()
        motor.stop()
