"""End to end: ``vmc run`` as a subprocess on the simulated machine, under a real datagram
NOTIFY_SOCKET and WATCHDOG_USEC as systemd sets them: READY once running, STATUS lines,
WATCHDOG pings that stop while the MDB line process is stopped (SIGSTOP) and resume after
SIGCONT, an "out of service" STATUS (and pings still) once the MDB port went away, STOPPING on
SIGTERM."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.harness import START_TIMEOUT_S, Daemon, write_config
from hil.notify_socket import NotifySocket

pytestmark = pytest.mark.slow

#: WATCHDOG_USEC for the test: pings every 0.5 s.
WATCHDOG_USEC = 1_000_000
PING_INTERVAL_S = WATCHDOG_USEC / 2 / 1_000_000
#: How long the line process stays stopped: long enough for several missed pings.
STOPPED_S = 6 * PING_INTERVAL_S
#: Delivery and scheduling slack of a datagram on a loaded machine.
ARRIVAL_SLACK_S = 0.2
#: Pings resume within this after SIGCONT (the line's backlog, then the next interval).
RESUME_TIMEOUT_S = 10.0


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    listener = NotifySocket()  # abstract address: as systemd's own may be
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield listener
    listener.close()


def line_process_of(pid: int) -> int:
    """The daemon's MDB line process: its child running drivers.mdb.line_child."""
    return child_running(pid, b"drivers.mdb.line_child")


def child_running(pid: int, module: bytes) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and module in cmdline.split(b"\0"):
            return int(entry.name)
    raise AssertionError(f"no {module.decode()} process under pid {pid}")


def is_ping(note_fields: dict[str, str]) -> bool:
    return note_fields.get("WATCHDOG") == "1"


def test_ready_status_watchdog_and_stopping_under_a_notify_socket(
    tmp_path: Path, notify: NotifySocket
) -> None:
    state = tmp_path / "state"
    daemon = Daemon(write_config(tmp_path / "vmc.toml", state), state)
    daemon.start()
    try:
        ready = notify.wait_for(lambda n: "READY" in n.fields, START_TIMEOUT_S, "READY=1")
        assert ready.fields["READY"] == "1"
        notify.wait_for(
            lambda n: n.fields.get("STATUS", "").startswith("selling · credit 0.00 · coin ok"),
            START_TIMEOUT_S,
            "a STATUS line saying it sells",
        )
        first = notify.wait_for(lambda n: is_ping(n.fields), 5.0, "a first ping")
        notify.wait_for(lambda n: is_ping(n.fields) and n.at > first.at, 5.0, "a second ping")

        assert daemon.proc is not None
        line = line_process_of(daemon.proc.pid)
        os.kill(line, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            deadline = stopped_at + STOPPED_S
            while time.monotonic() < deadline:
                notify.drain(deadline - time.monotonic())
            # A check that passed just before the stop may still ping; none may after that.
            grace = stopped_at + PING_INTERVAL_S + ARRIVAL_SLACK_S
            late = [n for n in notify.received if is_ping(n.fields) and n.at > grace]
            assert late == [], "pinged while the line process was stopped"
            resumed_from = len(notify.received)
        finally:
            os.kill(line, signal.SIGCONT)
        notify.wait_for(
            lambda n: is_ping(n.fields), RESUME_TIMEOUT_S, "pings after SIGCONT", resumed_from
        )

        # The MDB port goes away (the simulator ends): out of service, said in STATUS; the
        # daemon reopens the port itself, so the watchdog keeps pinging (docs/service.md).
        os.kill(child_running(daemon.proc.pid, b"hil.sim"), signal.SIGKILL)
        link_down = notify.wait_for(
            lambda n: n.fields.get("STATUS", "").startswith("out of service: mdb link down"),
            RESUME_TIMEOUT_S,
            "a STATUS line saying the MDB link is down",
        )
        down_at = notify.received.index(link_down)
        notify.wait_for(lambda n: is_ping(n.fields), 5.0, "a ping with the link down", down_at)

        code, _elapsed = daemon.stop(signal.SIGTERM)
        assert code == 0
        notify.drain(wait_s=0.5)
        stopping = [n for n in notify.received if "STOPPING" in n.fields]
        assert [n.fields for n in stopping] == [{"STOPPING": "1", "STATUS": "stopping"}]
        after = [n for n in notify.received if n.at > stopping[0].at and is_ping(n.fields)]
        assert after == []
    finally:
        daemon.kill()
