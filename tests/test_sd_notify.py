"""sd_notify (vmc/sd_notify.py) and the watchdog and STATUS logic (vmc/service.py), over real
AF_UNIX datagram sockets, with a real journal whose writer thread is held up."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from hil.notify_socket import NotifySocket
from tests.waiting import wait_until
from vmc.journal import Journal
from vmc.sd_notify import Notifier, notify_address, watchdog_interval_s
from vmc.service import ServiceReporter, journal_check, status_line

#: The watchdog interval these tests run with (WATCHDOG_USEC/2): short, so a held-up writer
#: thread shows within a few of them.
TEST_INTERVAL_S = 0.1
#: Intervals without a ping that prove pings stopped (one more than a late ping could explain).
SILENT_INTERVALS = 4


def test_notify_address_forms() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@vmc-test") == b"\0vmc-test"
    assert notify_address("vsock:2:1234") is None
    assert notify_address("@") is None


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid_only() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000"}, 42) == 5.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "42"}, 42) == 5.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval_s({}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, 42) is None


def test_notifier_sends_to_a_path_and_to_an_abstract_address(tmp_path: Path) -> None:
    for listener in (NotifySocket(tmp_path / "notify"), NotifySocket()):
        try:
            notifier = Notifier.from_environment({"NOTIFY_SOCKET": listener.address})
            assert notifier.send({"READY": "1", "STATUS": "two\nlines"})
            [note] = listener.drain(wait_s=1.0)
            assert note.fields == {"READY": "1", "STATUS": "two lines"}
            notifier.close()
        finally:
            listener.close()


def test_notifier_without_socket_sends_nothing_and_a_gone_manager_does_not_raise(
    tmp_path: Path,
) -> None:
    assert not Notifier.from_environment({}).enabled
    assert not Notifier.from_environment({}).send({"READY": "1"})
    gone = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert gone.enabled
    assert not gone.send({"WATCHDOG": "1"})  # ENOENT: lost, not raised
    assert not gone.send({"WATCHDOG": "1"})


def test_status_lines_read_like_sentences() -> None:
    selling = {
        "credit": 150,
        "decimal_places": 2,
        "in_service": True,
        "faults": {},
        "devices": {"coin": "ready", "bill": "ready", "cashless": "offline"},
    }
    assert status_line(selling, "up") == (
        "selling · credit 1.50 · coin ok, bill ok, reader offline · cloud up"
    )
    down = {**selling, "credit": 0, "in_service": False, "faults": {"mdb": "MDB link down: x"}}
    assert status_line(down, None) == (
        "out of service: mdb link down · coin ok, bill ok, reader offline"
    )
    both = {**down, "faults": {"coin": "coin changer offline", "mdb": "MDB link down: x"}}
    assert status_line(both, "down").startswith(
        "out of service: mdb link down; coin: coin changer offline · "
    )


async def test_watchdog_pings_stop_while_the_journal_writer_is_held_and_resume(
    tmp_path: Path,
) -> None:
    listener = NotifySocket(tmp_path / "notify")
    journal = await Journal.open(tmp_path / "state")
    reporter = ServiceReporter(
        Notifier.from_environment({"NOTIFY_SOCKET": listener.address}),
        watchdog_interval_s=TEST_INTERVAL_S,
        status=lambda: "selling",
        checks=[journal_check(journal)],
    )
    release = threading.Event()
    task = asyncio.create_task(reporter.run())
    held: asyncio.Task[bool] | None = None
    try:
        reporter.ready()
        await wait_until(lambda: reporter.pings >= 3, "three watchdog pings")
        # The writer thread runs a job that does not return: it takes nothing else.
        stuck = asyncio.create_task(journal._call_writer(lambda _conn: release.wait()))
        held = stuck
        await asyncio.sleep(TEST_INTERVAL_S)  # a check already running may still pass
        before = reporter.pings
        await asyncio.sleep(SILENT_INTERVALS * TEST_INTERVAL_S)
        assert reporter.pings == before, "pinged while the journal writer was stuck"
        release.set()
        await stuck
        await wait_until(lambda: reporter.pings >= before + 2, "pings again")
    finally:
        release.set()
        reporter.stopping()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if held is not None:
            await held
        await journal.close()
    fields = [note.fields for note in listener.drain(wait_s=1.0)]
    listener.close()
    assert fields[0] == {"READY": "1", "STATUS": "selling"}
    assert sum(1 for f in fields if f == {"WATCHDOG": "1"}) == reporter.pings
    assert fields[-1] == {"STOPPING": "1", "STATUS": "stopping"}
