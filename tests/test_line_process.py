"""The MDB line served from its own process: the daemon's bus master, against a simulated
peripheral on a real pty."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import tty
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.errors import LinkClosed, LinkConfigError, NoResponse
from drivers.mdb import line_spawn
from drivers.mdb.coin import CoinChanger
from drivers.mdb.line_process import LineProcessMaster
from drivers.mdb.master import Priority, Timing, set_realtime_priority
from drivers.mdb.pcap import Direction, read_pcap
from hil.sim.bus import SimBus
from hil.sim.coin import CoinChangerSim
from tests.waiting import wait_until

COIN_RESET, COIN_SETUP, COIN_POLL = 0x08, 0x09, 0x0B


@pytest.fixture
async def changer() -> AsyncIterator[tuple[LineProcessMaster, SimBus, CoinChangerSim]]:
    sim = CoinChangerSim()
    bus = SimBus.on_pty([sim])
    bus.start()
    master = LineProcessMaster("stream", bus.port, timing=Timing(slack_s=0.03))
    await master.open()
    try:
        yield master, bus, sim
    finally:
        await master.close()
        bus.stop()


async def test_exchanges_are_served_and_acked_by_the_child(
    changer: tuple[LineProcessMaster, SimBus, CoinChangerSim],
) -> None:
    master, _bus, sim = changer
    assert (await master.request(COIN_RESET, priority=Priority.RESET)).is_ack
    just_reset = await master.request(COIN_POLL, priority=Priority.POLL)
    assert just_reset.data == b"\x0b" and just_reset.ack_ns >= just_reset.reply_ns > 0
    setup = await master.request(COIN_SETUP)
    assert setup.data[0] == 3  # level 3
    assert master.stats.exchanges == 3
    # The simulator heard our ACKs (the last one reaches it after our request returned).
    await wait_until(lambda: sim.counters.acks == 2, "the sim to hear both ACKs")


async def test_errors_come_back_as_the_same_exception_types(
    changer: tuple[LineProcessMaster, SimBus, CoinChangerSim],
) -> None:
    master, _bus, sim = changer
    sim.faults.unplugged = True
    with pytest.raises(NoResponse) as caught:
        await master.request(COIN_POLL, max_attempts=2)
    assert caught.value.address == 0x08 and caught.value.attempts == 2
    sim.faults.unplugged = False
    assert (await master.request(COIN_RESET)).is_ack


async def test_ack_is_not_delayed_by_a_blocked_event_loop(
    changer: tuple[LineProcessMaster, SimBus, CoinChangerSim],
) -> None:
    master, bus, sim = changer
    await master.request(COIN_RESET)
    sim.queue_item(bytes((0x51, 0x05)))  # a coin to the tubes
    bus.record_samples = True
    pending = asyncio.ensure_future(master.request(COIN_POLL))
    await asyncio.sleep(0.05)
    # This process is stuck in a long C call; the child ACKs regardless.
    json.dumps([{"k": list(range(50))} for _ in range(20000)])
    time.sleep(0.2)  # noqa: ASYNC251 - blocking the loop is the point of this test
    reply = await pending
    assert reply.data  # the JUST RESET or the coin
    assert bus.samples.ack_turnaround_ns, "the simulator saw no ACK"
    assert max(bus.samples.ack_turnaround_ns) < 50_000_000  # well under the 200 ms block


async def test_a_bad_port_fails_open_with_a_config_error() -> None:
    master = LineProcessMaster("stream", "/dev/nonexistent-mdb-port")
    with pytest.raises(LinkConfigError):
        await master.open()


async def test_requests_fail_with_link_closed_when_the_child_dies(
    changer: tuple[LineProcessMaster, SimBus, CoinChangerSim],
) -> None:
    master, _bus, _sim = changer
    proc = master._proc
    assert proc is not None
    os.kill(proc.pid, 9)
    await proc.wait()
    with pytest.raises(LinkClosed):
        await master.request(COIN_POLL)


async def test_cancelled_request_leaves_nothing_behind(
    changer: tuple[LineProcessMaster, SimBus, CoinChangerSim],
) -> None:
    master, _bus, sim = changer
    sim.faults.late_replies, sim.faults.late_by_s = 1, 0.3
    task = asyncio.ensure_future(master.request(COIN_RESET))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert master._pending == {}
    assert (await master.request(COIN_RESET)).is_ack  # the line is usable afterwards


async def test_pcap_is_written_by_the_child(tmp_path: Path) -> None:
    path = tmp_path / "bus.pcap"
    sim = CoinChangerSim()
    bus = SimBus.on_pty([sim])
    bus.start()
    master = LineProcessMaster("stream", bus.port, pcap=path)
    await master.open()
    try:
        await master.request(COIN_RESET)
        await master.request(COIN_POLL)
    finally:
        await master.close()
        bus.stop()
    packets = [p for _ts, p in read_pcap(path)]
    assert packets[0] == bytes((0, 0xFF, COIN_RESET, COIN_RESET))  # RESET + CHK
    assert any(p[:3] == bytes((0, 0xFE, 0x08)) for p in packets)  # the changer's reply


async def test_the_child_reports_how_it_is_scheduled_and_it_is_true() -> None:
    sim = CoinChangerSim()
    bus = SimBus.on_pty([sim])
    bus.start()
    master = LineProcessMaster("stream", bus.port, realtime_priority=10)
    await master.open()
    try:
        assert master._proc is not None
        actual = os.sched_getscheduler(master._proc.pid)
        if master.scheduling == "SCHED_FIFO 10":
            assert actual == os.SCHED_FIFO
            assert os.sched_getparam(master._proc.pid).sched_priority == 10
        else:  # no RLIMIT_RTPRIO or CAP_SYS_NICE where this runs
            assert master.scheduling.startswith("normal (SCHED_FIFO 10 refused: ")
            assert actual == os.SCHED_OTHER
        assert (await master.request(COIN_RESET)).is_ack
    finally:
        await master.close()
        bus.stop()


async def test_without_a_realtime_priority_the_child_stays_normal(
    changer: tuple[LineProcessMaster, SimBus, CoinChangerSim],
) -> None:
    master, _bus, _sim = changer
    assert master._proc is not None
    assert master.scheduling == "normal"
    assert os.sched_getscheduler(master._proc.pid) == os.SCHED_OTHER


def test_a_refused_realtime_priority_is_reported_not_raised() -> None:
    # 100 is outside SCHED_FIFO's 1..99: the kernel refuses it whatever our privileges.
    assert set_realtime_priority(100).startswith("normal (SCHED_FIFO 100 refused: ")
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


async def test_a_bus_reset_on_a_uart_goes_into_the_capture(tmp_path: Path) -> None:
    # A pty slave takes the UART set-up and a BREAK (tcsendbreak), so the whole path runs.
    master_fd, slave_fd = os.openpty()
    tty.setraw(master_fd)
    capture = tmp_path / "bus.pcap"
    master = LineProcessMaster("uart", os.ttyname(slave_fd), pcap=capture)
    await master.open()
    try:
        assert await master.bus_reset(0.0) is True
    finally:
        await master.close()
        os.close(master_fd)
        os.close(slave_fd)
    packets = [p for _ts, p in read_pcap(capture)]
    assert packets == [bytes((0, Direction.BUS_RESET))]


async def test_the_child_outlives_a_terminal_ctrl_c_and_a_unit_wide_sigterm(
    changer: tuple[LineProcessMaster, SimBus, CoinChangerSim],
) -> None:
    master, _bus, _sim = changer
    assert master._proc is not None
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        os.kill(master._proc.pid, stop_signal)
    # Still serving: only the parent ends the line (close() sends "stop", then SIGKILL).
    assert (await master.request(COIN_RESET)).is_ack
    assert master._proc.returncode is None


async def test_a_lost_port_is_reopened_and_devices_come_back() -> None:
    """Seen with an independent emulator: the MDB port went away (as a ser2net bridge restart
    or an unplugged USB adapter does) and the daemon stayed deaf for good. The master reports
    the link down, reopens the same port with backoff, and the device starts up again."""
    from drivers.mdb.coin import CoinChanger
    from drivers.mdb.device import DeviceState

    def serve(port: int) -> SimBus:
        bus = SimBus.on_tcp([CoinChangerSim()], "127.0.0.1", port)
        bus.start()
        return bus

    bus = SimBus.on_tcp([CoinChangerSim()], "127.0.0.1", 0)
    port = int(bus.port.rsplit(":", 1)[1])
    bus.start()
    master = LineProcessMaster("stream", bus.port, timing=Timing(slack_s=0.03))
    changes: list[tuple[bool, str]] = []
    master.add_link_listener(lambda up, detail: changes.append((up, detail)))
    await master.open()
    device = CoinChanger(master, poll_interval_s=0.02, on_event=lambda _e: None)
    task = asyncio.create_task(device.run())
    try:
        await wait_until(lambda: device.state is DeviceState.READY, "READY", timeout_s=10)
        assert master.link_up and changes == [(True, bus.port)]
        bus.stop()  # the port goes away
        await wait_until(lambda: not master.link_up, "the link reported down", timeout_s=10)
        assert "went away" in master.link_detail or "ended" in master.link_detail
        with pytest.raises(LinkClosed):
            await master.request(COIN_POLL, priority=Priority.POLL)
        await asyncio.sleep(0.5)  # a few reopenings fail while nothing listens
        bus = serve(port)  # back on the same path
        await wait_until(lambda: master.link_up, "the link back up", timeout_s=15)
        assert master.reconnects == 1
        starts = len([c for c in changes if c[0]])
        assert starts == 2 and changes[-1] == (True, master.port)
        # The device went through its start-up again on the new link.
        await wait_until(
            lambda: device.state is DeviceState.READY and bus.peripheral("coin").counters.polls > 0,
            "the changer polled again",
            timeout_s=15,
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await master.close()
        bus.stop()


async def test_a_line_process_started_early_is_taken_over_once() -> None:
    """``vmc run`` starts the line process before the daemon's imports (drivers/mdb/line_spawn):
    the master with the same settings serves the bus through that very process; a master with
    other settings, or a second start, gets a process of its own, and the early one is stopped."""
    sim = CoinChangerSim()
    bus = SimBus.on_pty([sim])
    bus.start()
    timing = Timing(slack_s=0.03)
    level = logging.getLogger("drivers.mdb").getEffectiveLevel()
    settings = line_spawn.LineSettings("stream", bus.port, timing.slack_s, level)
    masters: list[LineProcessMaster] = []
    try:
        line_spawn.prespawn(settings)
        early = line_spawn._waiting
        assert early is not None
        master = LineProcessMaster("stream", bus.port, timing=timing)
        masters.append(master)
        await master.open()
        assert line_spawn._waiting is None
        assert master._proc is not None and master._proc.pid == early.process.pid
        assert (await master.request(COIN_RESET, priority=Priority.RESET)).is_ack

        # Other settings: the early process is not used, and does not outlive the claim.
        line_spawn.prespawn(line_spawn.LineSettings("stream", bus.port, 0.5, level))
        unused = line_spawn._waiting
        assert unused is not None
        other = LineProcessMaster("stream", bus.port, timing=timing)
        masters.append(other)
        await other.open()
        assert other._proc is not None and other._proc.pid != unused.process.pid
        assert unused.process.poll() is not None
    finally:
        for m in masters:
            await m.close()
        line_spawn._kill_unclaimed()
        bus.stop()


@contextlib.asynccontextmanager
async def _started_early(
    sim: CoinChangerSim, early: tuple[line_spawn.EarlyDevice, ...], capture: Path | None = None
) -> AsyncIterator[tuple[LineProcessMaster, list[asyncio.Task[None]]]]:
    """A line process started early (as ``vmc run`` does) with ``early``, taken over by a
    master; device tasks the test adds to the list are stopped at the end."""
    bus = SimBus.on_pty([sim])
    bus.start()
    timing = Timing(slack_s=0.03)
    level = logging.getLogger("drivers.mdb").getEffectiveLevel()
    pcap = str(capture or "")
    settings = line_spawn.LineSettings("stream", bus.port, timing.slack_s, level, pcap)
    master = LineProcessMaster("stream", bus.port, timing=timing, pcap=capture)
    tasks: list[asyncio.Task[None]] = []
    try:
        line_spawn.prespawn(settings, early)
        await master.open()
        yield master, tasks
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await master.close()
        line_spawn._kill_unclaimed()
        bus.stop()


async def _changer_started(
    master: LineProcessMaster, tasks: list[asyncio.Task[None]], caplog: pytest.LogCaptureFixture
) -> None:
    device = CoinChanger(master, poll_interval_s=0.05, on_event=lambda _e: None)
    device.set_enabled(True)
    with caplog.at_level(logging.INFO, logger="drivers.mdb.device"):
        tasks.append(asyncio.create_task(device.run()))
        await wait_until(lambda: device.accepting, "the changer started and enabled")


async def test_a_line_process_started_early_resets_the_devices_and_polls_to_just_reset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Started early with the devices to start (``vmc run``), the line process RESETs each
    while the daemon imports and POLLs it at its interval; the JUST RESET that brings waits for
    the device as an autopoll result, and the device's start-up goes on from there without a
    second RESET. A device that did not ACK its RESET (absent here) is left to its own
    start-up."""
    sim = CoinChangerSim()
    capture = tmp_path / "bus.pcap"
    coin = line_spawn.EarlyDevice(0x08, 0x03, 0.05)
    bill = line_spawn.EarlyDevice(0x30, 0x03, 0.05)  # no bill validator on this bus
    async with _started_early(sim, (coin, bill), capture) as (master, tasks):
        assert master.started_early and not master.early_bus_reset  # a pty carries no BREAK
        assert not master.take_early_reset(0x30)  # it did not ACK: its own start-up RESETs it
        # The changer's JUST RESET came to an early POLL and waits for the device.
        await wait_until(lambda: master._polled_queue(0x08).qsize() == 1, "the JUST RESET")
        assert sim.counters.resets == 1
        await _changer_started(master, tasks, caplog)
        assert "coin: JUST RESET after the line's early RESET" in caplog.messages
        assert sim.counters.resets == 1
        assert not master.take_early_reset(0x08)  # taken once, by the device's start-up
    resets = [
        packet[2]
        for _ts, packet in read_pcap(capture)
        if packet[1] == Direction.MASTER_TO_PERIPHERAL and len(packet) > 3 and packet[2] & 0x07 == 0
    ]
    # The line's early RESETs (the absent validator's three attempts), and no other.
    assert resets == [0x08, 0x30, 0x30, 0x30], resets


async def test_a_device_whose_early_polls_fail_is_started_up_from_its_own_reset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The early RESET was ACKed, but the POLLs after it go unanswered: the device's
    start-up does not take that for a start, and RESETs the device itself."""
    sim = CoinChangerSim()
    early_poll_s = 0.5  # long enough to set the fault between the RESET and the first POLL
    async with _started_early(sim, (line_spawn.EarlyDevice(0x08, 0x03, early_poll_s),)) as (
        master,
        tasks,
    ):
        assert sim.counters.resets == 1
        with sim.lock:
            sim.faults.drop_replies = 3  # every attempt of the first early POLL
        await _changer_started(master, tasks, caplog)
        assert "coin: no JUST RESET after the line's early RESET; resetting it" in caplog.messages
        assert sim.counters.resets == 2


def test_the_early_start_table_names_each_device_as_its_class_does() -> None:
    """``vmc run`` builds the early start before the device classes are imported, from
    line_spawn's light table; it must say what the classes say."""
    from drivers.mdb.bill import BillValidator
    from drivers.mdb.cashless import CashlessReader

    classes = {"coin": CoinChanger, "bill": BillValidator, "cashless": CashlessReader}
    assert set(line_spawn.DEVICE_ADDRESSES) == set(classes) == set(line_spawn.POLL_COMMANDS)
    for name, cls in classes.items():
        assert line_spawn.DEVICE_ADDRESSES[name] == cls.ADDRESS, name
        assert line_spawn.POLL_COMMANDS[name] == cls.POLL_CMD, name
        assert cls.RESET_CMD == 0x00, name
