"""Idle POLLs served by the MDB line process (drivers/mdb/autopoll.py, docs/autopoll.md): the
daemon's ``LineProcessMaster`` and the coin changer's device class against the simulated
changer on a real pty, each bus byte carried by the line process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.errors import NoResponse
from drivers.mdb.cashless import CashlessReader, SessionCancelRequest, SessionPhase
from drivers.mdb.coin import POLL, TUBE_STATUS, CoinChanger, CoinDeposited
from drivers.mdb.device import DeviceEvent, DeviceState, StateChanged
from drivers.mdb.line_process import LineProcessMaster
from drivers.mdb.master import Priority, Reply, Timing
from drivers.mdb.pcap import Direction, read_pcap
from hil.sim.bus import SimBus
from hil.sim.cashless import CashlessReaderSim
from hil.sim.coin import CoinChangerSim
from tests.waiting import stop_task, wait_until

COIN = 0x08
COIN_RESET, COIN_POLL, COIN_TUBE_STATUS = COIN | 0x00, COIN | POLL.command, COIN | 0x02
#: Autopoll interval of the master-level tests: short, so a test sees many POLLs quickly.
FAST_POLL_S = 0.01
#: Poll interval of the device-level tests (config/sim.toml polls every 100 ms).
DEVICE_POLL_S = 0.05
#: Timing slack of the line on a loaded test machine (as tests/test_line_process.py).
SLACK_S = 0.03


class QuickChanger(CoinChanger):
    """The coin changer with a non-response time short enough for a test (mdb.md: 2 s)."""

    NON_RESPONSE_S = 0.6


@pytest.fixture
async def line(tmp_path: Path) -> AsyncIterator[tuple[LineProcessMaster, CoinChangerSim, Path]]:
    sim = CoinChangerSim()
    bus = SimBus.on_pty([sim])
    bus.start()
    capture = tmp_path / "bus.pcap"
    master = LineProcessMaster("stream", bus.port, timing=Timing(slack_s=SLACK_S), pcap=capture)
    await master.open()
    try:
        yield master, sim, capture
    finally:
        await master.close()
        bus.stop()


async def _reset(master: LineProcessMaster) -> None:
    assert (await master.request(COIN_RESET, priority=Priority.RESET)).is_ack
    just_reset = await master.request(COIN_POLL, priority=Priority.POLL, expect=POLL.reply)
    assert just_reset.data == b"\x0b"


def _deposit_reply_then_commands(capture: Path) -> tuple[int, list[bytes]]:
    """How many POLL replies reported a coin deposit, and the command blocks sent after the
    last one, in wire order."""
    deposits, after = 0, []
    last_command = b""
    for _ts, packet in read_pcap(capture):
        if packet[1] == Direction.MASTER_TO_PERIPHERAL and len(packet) > 3:
            last_command = packet[2:]
            after.append(last_command)
        elif (
            packet[1] == Direction.PERIPHERAL_TO_MASTER
            and len(packet) > 4
            and last_command[:1] == bytes((COIN_POLL,))
            and packet[3] & 0xC0 == 0x40
        ):
            deposits, after = deposits + 1, []
    return deposits, after


async def test_bare_acks_stay_in_the_line_process(
    line: tuple[LineProcessMaster, CoinChangerSim, Path],
) -> None:
    master, sim, _capture = line
    await _reset(master)
    frames = master.frames_received
    polls = sim.counters.polls
    await master.autopoll(COIN_POLL, FAST_POLL_S, POLL.reply)
    await wait_until(lambda: sim.counters.polls >= polls + 20, "20 autopolled POLLs")
    # Twenty POLLs answered with a bare ACK, and not one frame crossed to this process.
    assert master.frames_received == frames
    assert master.take_polled(COIN) is None
    await master.autopoll(COIN_POLL, None)
    assert master.frames_received == frames + 1  # the disarm's answer only
    stopped_at = sim.counters.polls
    # The parent owns the address's POLLs again: its own request is served, none goes alone.
    assert (await master.request(COIN_POLL, expect=POLL.reply)).is_ack
    assert sim.counters.polls == stopped_at + 1


async def test_activity_suspends_the_autopoll_until_it_is_armed_again(
    line: tuple[LineProcessMaster, CoinChangerSim, Path],
) -> None:
    master, sim, capture = line
    await _reset(master)
    await master.autopoll(COIN_POLL, FAST_POLL_S, POLL.reply)
    sim.control({"cmd": "insert", "coin_type": 0})
    polled = await asyncio.wait_for(master.next_polled(COIN), 5.0)
    assert isinstance(polled.result, Reply) and polled.result.data[0] & 0xC0 == 0x40
    assert polled.last_answer_ns <= time.monotonic_ns()
    polls = sim.counters.polls
    # Ten intervals in which an autopoll still armed would have polled ten times.
    await asyncio.sleep(10 * FAST_POLL_S)
    assert sim.counters.polls == polls
    # The daemon's follow-up command, then the POLLs resume once armed again.
    await master.request(COIN_TUBE_STATUS)
    await master.autopoll(COIN_POLL, FAST_POLL_S, POLL.reply)
    await wait_until(lambda: sim.counters.polls >= polls + 3, "the autopoll to resume")
    await master.autopoll(COIN_POLL, None)
    await master.close()  # flushes the capture
    deposits, after = _deposit_reply_then_commands(capture)
    # Between the deposit's reply and the follow-up command: no POLL.
    assert deposits == 1
    assert after[0] == bytes((COIN_TUBE_STATUS, COIN_TUBE_STATUS))
    assert after[1] == bytes((COIN_POLL, COIN_POLL))


async def test_disarm_waits_for_an_autopoll_in_flight(
    line: tuple[LineProcessMaster, CoinChangerSim, Path],
) -> None:
    master, sim, _capture = line
    await _reset(master)
    sim.faults.drop_replies = 3  # the next POLL goes unanswered, all its attempts
    await master.autopoll(COIN_POLL, FAST_POLL_S, POLL.reply)
    await wait_until(lambda: sim.faults.drop_replies < 3, "an autopoll POLL on the wire")
    await master.autopoll(COIN_POLL, None)
    # Its result came before the disarm's answer: there without waiting.
    polled = master.take_polled(COIN)
    assert polled is not None and isinstance(polled.result, NoResponse)
    assert polled.result.address == COIN and polled.result.attempts == 3
    assert master.take_polled(COIN) is None
    assert master.stats.timeouts >= 3


async def _changer(
    master: LineProcessMaster, events: list[DeviceEvent], poll_s: float = DEVICE_POLL_S
) -> tuple[QuickChanger, asyncio.Task[None]]:
    device = QuickChanger(master, poll_interval_s=poll_s, on_event=events.append)
    device.set_enabled(True)
    task = asyncio.create_task(device.run(), name="coin")
    await wait_until(lambda: device.accepting, "the changer started and enabled")
    return device, task


async def _wait_autopolled(
    master: LineProcessMaster,
    sim: CoinChangerSim | CashlessReaderSim,
    polls: int = 5,
    timeout_s: float = 10.0,
) -> None:
    """Until ``polls`` POLLs in a row reached the changer with no frame crossing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        frames, target = master.frames_received, sim.counters.polls + polls
        await wait_until(lambda t=target: sim.counters.polls >= t, f"{polls} POLLs")
        if master.frames_received == frames:
            return
        assert loop.time() < deadline, "the changer was never left to the autopoll"


async def test_a_coin_inserted_while_autopolled_is_credited_once_in_todays_order(
    line: tuple[LineProcessMaster, CoinChangerSim, Path],
) -> None:
    master, sim, capture = line
    events: list[DeviceEvent] = []
    device, task = await _changer(master, events)
    try:
        await _wait_autopolled(master, sim)
        sim.control({"cmd": "insert", "coin_type": 1})
        await wait_until(
            lambda: any(isinstance(e, CoinDeposited) for e in events), "the deposit event"
        )
        # After the deposit: the quiet POLL and TUBE STATUS, then the line polls alone again.
        await wait_until(lambda: not device.needs_every_poll(), "the tubes refreshed")
        await _wait_autopolled(master, sim)
    finally:
        await stop_task(task)
    deposits = [e for e in events if isinstance(e, CoinDeposited)]
    assert len(deposits) == 1 and deposits[0].coin_type == 1 and deposits[0].route.credited
    assert sim.ledger()["acked_deposited"]["count"] == 1
    await master.close()
    deposits, after = _deposit_reply_then_commands(capture)
    poll = bytes((COIN_POLL, COIN_POLL))
    tube_status = bytes((COIN | TUBE_STATUS.command, COIN | TUBE_STATUS.command))
    # As the device's own loop sent them before autopoll: after the deposit's reply one quiet
    # POLL, then TUBE STATUS (``after_poll``), then the POLLs again.
    assert deposits == 1
    assert after[:3] == [poll, tube_status, poll]


async def test_a_silent_changer_goes_offline_after_its_non_response_time(
    line: tuple[LineProcessMaster, CoinChangerSim, Path],
) -> None:
    master, sim, _capture = line
    events: list[DeviceEvent] = []
    offline_at: list[float] = []

    def on_event(event: DeviceEvent) -> None:
        events.append(event)
        if isinstance(event, StateChanged) and event.state is DeviceState.OFFLINE:
            offline_at.append(time.monotonic())

    device = QuickChanger(master, poll_interval_s=DEVICE_POLL_S, on_event=on_event)
    device.set_enabled(True)
    task = asyncio.create_task(device.run(), name="coin")
    try:
        await wait_until(lambda: device.accepting, "the changer started and enabled")
        await _wait_autopolled(master, sim)
        silent_from = time.monotonic()
        sim.faults.unplugged = True
        await wait_until(lambda: bool(offline_at), "the changer declared offline")
    finally:
        await stop_task(task)
    silent_s = offline_at[0] - silent_from
    # Not before its non-response time (from its last answer, an autopolled ACK the daemon
    # never saw), and not much later: one POLL's attempts and a retry pause.
    assert QuickChanger.NON_RESPONSE_S <= silent_s < QuickChanger.NON_RESPONSE_S + 1.0


async def test_acks_longer_than_the_non_response_time_then_one_missed_poll_is_not_offline(
    line: tuple[LineProcessMaster, CoinChangerSim, Path],
) -> None:
    master, sim, _capture = line
    events: list[DeviceEvent] = []
    device, task = await _changer(master, events)
    try:
        # Answered only with ACKs the daemon never saw, for longer than the non-response time.
        ack_polls = int(1.5 * QuickChanger.NON_RESPONSE_S / DEVICE_POLL_S)
        await _wait_autopolled(master, sim, polls=ack_polls)
        frames = master.frames_received
        sim.faults.drop_replies = 3  # one POLL unanswered
        await wait_until(lambda: master.frames_received > frames, "the missed POLL sent up")
        await wait_until(lambda: sim.faults.drop_replies == 0, "the missed POLL")
        await _wait_autopolled(master, sim)
        assert device.state is DeviceState.READY
    finally:
        await stop_task(task)
    offline = [e for e in events if isinstance(e, StateChanged) and e.state is DeviceState.OFFLINE]
    assert offline == []


async def test_acceptors_follow_set_enabled_promptly_while_autopolled(
    line: tuple[LineProcessMaster, CoinChangerSim, Path],
) -> None:
    master, sim, _capture = line
    slow_poll_s = 1.0  # a switch that waited for a POLL result would take up to this
    events: list[DeviceEvent] = []
    device, task = await _changer(master, events, poll_s=slow_poll_s)
    try:
        await _wait_autopolled(master, sim, polls=2)
        for wanted in (False, True):
            asked_at = time.monotonic()
            device.set_enabled(wanted)
            await wait_until(
                lambda w=wanted: bool(sim.accept_mask) is w and device.accepting is w,
                f"accepting={wanted} on the wire and in the device",
            )
            assert time.monotonic() - asked_at < slow_poll_s / 2
    finally:
        await stop_task(task)


class QuickReader(CashlessReader):
    """The cashless reader with a non-response time short enough for a test."""

    @property
    def NON_RESPONSE_S(self) -> float:  # type: ignore[override]  # as CashlessReader's
        return 0.5


@pytest.fixture
async def reader_line() -> AsyncIterator[tuple[LineProcessMaster, CashlessReaderSim]]:
    sim = CashlessReaderSim(sends_end_session=False)
    bus = SimBus.on_pty([sim])
    bus.start()
    master = LineProcessMaster("stream", bus.port, timing=Timing(slack_s=SLACK_S))
    await master.open()
    try:
        yield master, sim
    finally:
        await master.close()
        bus.stop()


async def test_a_reader_session_is_cancelled_and_closed_while_autopolled(
    reader_line: tuple[LineProcessMaster, CashlessReaderSim],
) -> None:
    """The reader's customer cancel comes in an autopolled reply and is answered with SESSION
    COMPLETE; a reader that never confirms with END SESSION gets its session closed after its
    non-response time by a turn of the supervisor's own, with no POLL result to wake it."""
    master, sim = reader_line
    events: list[DeviceEvent] = []
    reader = QuickReader(master, poll_interval_s=DEVICE_POLL_S, on_event=events.append)
    reader.set_enabled(True)
    task = asyncio.create_task(reader.run(), name="cashless")
    try:
        await wait_until(lambda: reader.accepting, "the reader started and enabled")
        await _wait_autopolled(master, sim)
        assert sim.control({"cmd": "tap", "funds": 500})["accepted"]
        await wait_until(lambda: reader.session is SessionPhase.IDLE, "the session begun")
        assert sim.control({"cmd": "cancel"})["accepted"]
        await wait_until(lambda: reader.session is SessionPhase.ENDING, "SESSION COMPLETE sent")
        ending_from = time.monotonic()
        await wait_until(lambda: reader.session is SessionPhase.NONE, "the session closed")
        closed_after_s = time.monotonic() - ending_from
    finally:
        await stop_task(task)
    assert any(isinstance(e, SessionCancelRequest) for e in events)
    assert sim.ledger()["customer_cancellations"] == 1
    # Closed by the timer: not before the reader's non-response time, and well before the
    # next thing that could have woken the supervisor (nothing else happened).
    assert 0.5 - DEVICE_POLL_S <= closed_after_s < 0.5 + 1.0


async def _polls_during(sim: CoinChangerSim, window_s: float) -> int:
    before = sim.counters.polls
    await asyncio.sleep(window_s)
    return sim.counters.polls - before


async def test_a_quiet_interval_slows_the_autopoll_and_lifting_it_restores_it(
    line: tuple[LineProcessMaster, CoinChangerSim, Path],
) -> None:
    """While nobody is at the machine the daemon gives the devices a longer interval for
    their idle POLLs (``mdb.idle_poll_interval_ms``); it applies at once, both ways."""
    master, sim, _capture = line
    events: list[DeviceEvent] = []
    device, task = await _changer(master, events)  # its own interval: 50 ms
    quiet_s = 0.4
    window_s = 1.2
    try:
        await _wait_autopolled(master, sim)
        changes_before = len([e for e in events if isinstance(e, StateChanged)])
        own = await _polls_during(sim, window_s)
        device.set_quiet_poll_interval(quiet_s)
        assert device.autopoll_interval_s() == quiet_s
        await asyncio.sleep(DEVICE_POLL_S * 2)  # the POLL armed before the change may go
        quiet = await _polls_during(sim, window_s)
        device.set_quiet_poll_interval(None)
        await asyncio.sleep(DEVICE_POLL_S * 2)
        restored = await _polls_during(sim, window_s)
        # 24 POLLs expected at 50 ms, 3 at 400 ms: far apart on any machine.
        assert own >= 10, own
        assert quiet <= window_s / quiet_s + 2, quiet
        assert restored >= 10, restored
        # Still the same device, never offline, no state change for the cadence's.
        assert device.state is DeviceState.READY
        assert len([e for e in events if isinstance(e, StateChanged)]) == changes_before
    finally:
        await stop_task(task)


async def test_a_quiet_interval_shorter_than_the_devices_own_changes_nothing(
    line: tuple[LineProcessMaster, CoinChangerSim, Path],
) -> None:
    master, _sim, _capture = line
    device = QuickChanger(master, poll_interval_s=0.15, on_event=lambda _e: None)
    device.set_quiet_poll_interval(0.1)
    assert device.autopoll_interval_s() == 0.15
