"""The device layer (drivers.mdb.device) driving a simulated changer over a real pty.

A minimal ``MdbDevice`` subclass stands in for the real coin changer class (written
elsewhere); it does what every device does: start-up, POLL parsing, enable. Time is controlled
two ways: the module's settle/retry pauses are patched small, and the device's clock (which
decides when a silent device counts as gone) is a manual clock the test advances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import ClassVar

import pytest

from bench._peripheral import (
    COIN_TYPE,
    SETUP,
    MiniChangerSim,
    coin_deposited,
)
from drivers.mdb import device as device_module
from drivers.mdb.block import CommandReceived
from drivers.mdb.device import (
    DeviceEvent,
    DeviceState,
    JustReset,
    MdbDevice,
    StateChanged,
    StatusReported,
)
from drivers.mdb.master import DEFAULT_MAX_ATTEMPTS, BusMaster
from tests.mdb_harness import sim_and_master
from tests.waiting import stop_task, wait_until

POLL_INTERVAL_S = 0.01
ENABLE_MASK = bytes.fromhex("000F0000")
DISABLE_MASK = bytes(4)
#: Slack the master adds to the 5 ms response window: generous, so a loaded machine does not
#: make a start-up exchange fail by accident and change the sequence of states a test expects.
SLACK_S = 0.1


@dataclass(frozen=True, slots=True)
class CoinDeposited(DeviceEvent):
    coin_type: int
    routing: int
    tube_count: int


class ManualClock:
    """The device's clock, advanced only by the test (``step`` > 0: each reading advances)."""

    def __init__(self, step: float = 0.0) -> None:
        self.now = 1000.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MiniChangerDevice(MdbDevice):
    """Just enough of a coin changer for the shared device mechanics."""

    NAME = "changer"
    ADDRESS = 0x08
    POLL_CMD = 0x03
    NON_RESPONSE_S: ClassVar[float] = 0.3

    def __init__(
        self, master: BusMaster, on_event: Callable[[DeviceEvent], None], clock: ManualClock
    ) -> None:
        super().__init__(master, poll_interval_s=POLL_INTERVAL_S, on_event=on_event, clock=clock)
        self.setups = 0

    async def initialise(self) -> None:
        reply = await self.request(SETUP.command)
        self.info.level = reply.data[0]
        self.info.details["scaling"] = reply.data[3]
        self.setups += 1

    def parse_poll(self, data: bytes) -> list[DeviceEvent]:
        events: list[DeviceEvent] = []
        i = 0
        while i < len(data):
            item = data[i]
            if item & 0xC0 == 0x40 and i + 1 < len(data):
                events.append(
                    CoinDeposited(self.NAME, item & 0x0F, (item >> 4) & 0x03, data[i + 1])
                )
                i += 2
                continue
            if item == 0x0B:
                events.append(JustReset(self.NAME))
            else:
                events.append(StatusReported(self.NAME, item, f"status 0x{item:02X}"))
            i += 1
        return events

    async def apply_enable(self, enabled: bool) -> None:
        await self.request(COIN_TYPE.command, ENABLE_MASK if enabled else DISABLE_MASK)


@pytest.fixture(autouse=True)
def short_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "RESET_SETTLE_S", 0.01)
    monkeypatch.setattr(device_module, "OFFLINE_RETRY_S", 0.05)


@contextlib.asynccontextmanager
async def supervised(device: MdbDevice) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``device.run()``; on exit cancel it, and surface any error it died of."""
    task = asyncio.create_task(device.run(), name=f"{device.NAME}-run")
    try:
        yield task
    finally:
        if task.done():
            task.result()  # raise what killed it
        await stop_task(task)  # cancels again while it runs on (3.11), raises what it died of


def states(events: list[DeviceEvent]) -> list[DeviceState]:
    return [e.state for e in events if isinstance(e, StateChanged)]


class Rig:
    def __init__(self) -> None:
        self.events: list[DeviceEvent] = []
        self.clock = ManualClock()

    def of(self, kind: type[DeviceEvent]) -> list[DeviceEvent]:
        return [e for e in self.events if isinstance(e, kind)]


async def test_start_up_brings_the_device_ready_and_enabled() -> None:
    sim, rig = MiniChangerSim(), Rig()
    async with sim_and_master([sim], slack_s=SLACK_S) as (master, _bus):
        device = MiniChangerDevice(master, rig.events.append, rig.clock)
        device.set_enabled(True)
        async with supervised(device):
            await wait_until(lambda: device.state is DeviceState.READY, "READY")
            assert states(rig.events) == [DeviceState.STARTING, DeviceState.READY]
            assert sim.seen_commands()[:4] == [0x08, 0x0B, 0x09, 0x0C]
            assert device.info.level == 3 and device.info.details["scaling"] == 5
            await wait_until(lambda: sim.coin_type == ENABLE_MASK, "the enable to reach the sim")
            device.set_enabled(False)
            await wait_until(lambda: sim.coin_type == DISABLE_MASK, "the disable")
            assert device.state is DeviceState.READY
            assert rig.of(JustReset) == []  # the start-up JUST RESET is not an event


class BusyAfterResetSim(MiniChangerSim):
    """A changer still busy with its reset: silent to the first ``silent_polls`` POLLs after
    each RESET (a real one may take up to its non-response time, mdb.md "Timing")."""

    def __init__(self, silent_polls: int) -> None:
        super().__init__()
        self.silent_polls = silent_polls
        self.unanswered = 0  # POLLs it let go by (``seen_commands`` has only those answered)
        self._silent_left = 0

    def answer(self, command: CommandReceived) -> bytes | None:
        cmd = command.addr_cmd & 0x07
        if cmd == self.RESET_CMD:
            self._silent_left = self.silent_polls
        elif cmd == self.POLL_CMD and self._silent_left > 0:
            self._silent_left -= 1
            self.unanswered += 1
            return None
        return super().answer(command)


async def test_a_device_busy_after_reset_is_polled_again_not_reset_again() -> None:
    # The first POLL goes one poll interval after the RESET, not after a fixed settle time:
    # that is safe only because an unanswered POLL is sent again within the non-response time.
    silent_polls = 2 * DEFAULT_MAX_ATTEMPTS  # two whole POLL requests go unanswered
    sim, rig = BusyAfterResetSim(silent_polls), Rig()
    async with sim_and_master([sim], slack_s=SLACK_S) as (master, _bus):
        device = MiniChangerDevice(master, rig.events.append, rig.clock)
        async with supervised(device):
            await wait_until(lambda: device.state is DeviceState.READY, "READY")
            seen = sim.seen_commands()
            assert seen.count(0x08) == 1  # one RESET: the silence did not restart start-up
            assert seen[:2] == [0x08, 0x0B]  # RESET, then the first POLL it answered
            assert sim.unanswered == silent_polls
            assert master.stats.timeouts >= silent_polls
            assert states(rig.events) == [DeviceState.STARTING, DeviceState.READY]


async def test_poll_events_are_emitted() -> None:
    sim, rig = MiniChangerSim(), Rig()
    async with sim_and_master([sim], slack_s=SLACK_S) as (master, _bus):
        device = MiniChangerDevice(master, rig.events.append, rig.clock)
        async with supervised(device):
            await wait_until(lambda: device.state is DeviceState.READY, "READY")
            sim.queue_item(coin_deposited(2, 1, 7))
            sim.queue_item(b"\x02")  # payout busy
            await wait_until(lambda: len(rig.of(StatusReported)) == 1, "the status")
            assert rig.of(CoinDeposited) == [CoinDeposited("changer", 2, 1, 7)]
            assert rig.of(StatusReported) == [StatusReported("changer", 2, "status 0x02")]


async def test_identical_replies_in_a_row_are_each_an_event() -> None:
    # mdb.md "Wire": the base device never drops a reply for matching the one before (two
    # coins of one type to the cashbox look the same); a device class may, on a device fact.
    sim, rig = MiniChangerSim(), Rig()
    async with sim_and_master([sim], slack_s=SLACK_S) as (master, _bus):
        device = MiniChangerDevice(master, rig.events.append, rig.clock)
        async with supervised(device):
            await wait_until(lambda: device.state is DeviceState.READY, "READY")
            sim.faults.lose_acks = 1
            sim.queue_item(coin_deposited(3, 1, 2))
            await wait_until(lambda: sim.counters.resends_after_lost_ack == 1, "the repeat")
            await wait_until(lambda: sim.poll_items == [], "the repeat to be ACKed")
            # A later, different event still comes through, so polling went on after the repeat.
            sim.queue_item(coin_deposited(3, 1, 3))
            await wait_until(lambda: len(rig.of(CoinDeposited)) >= 3, "the next coin")
            assert rig.of(CoinDeposited) == [
                CoinDeposited("changer", 3, 1, 2),
                CoinDeposited("changer", 3, 1, 2),
                CoinDeposited("changer", 3, 1, 3),
            ]


async def test_just_reset_while_running_restarts_start_up() -> None:
    sim, rig = MiniChangerSim(), Rig()
    async with sim_and_master([sim], slack_s=SLACK_S) as (master, _bus):
        device = MiniChangerDevice(master, rig.events.append, rig.clock)
        device.set_enabled(True)
        async with supervised(device):
            await wait_until(lambda: device.state is DeviceState.READY, "READY")
            await wait_until(lambda: sim.coin_type == ENABLE_MASK, "the enable")
            resets_before = sim.seen_commands().count(0x08)
            sim.reset_itself()  # brown-out: forgets its set-up, reports JUST RESET
            assert sim.coin_type is None
            await wait_until(lambda: device.setups == 2, "the second start-up's SETUP")
            await wait_until(lambda: device.state is DeviceState.READY, "READY again")
            await wait_until(lambda: sim.coin_type == ENABLE_MASK, "the enable re-applied")
            assert rig.of(JustReset) == [JustReset("changer")]
            assert states(rig.events) == [
                DeviceState.STARTING,
                DeviceState.READY,
                DeviceState.STARTING,
                DeviceState.READY,
            ]
            restart = [e for e in rig.of(StateChanged) if isinstance(e, StateChanged)][2]
            assert restart.detail == "peripheral reset itself"
            assert sim.seen_commands().count(0x08) == resets_before + 1  # start-up sent RESET


async def test_silence_shorter_than_non_response_time_keeps_the_device_ready() -> None:
    sim, rig = MiniChangerSim(), Rig()
    async with sim_and_master([sim], slack_s=SLACK_S) as (master, _bus):
        device = MiniChangerDevice(master, rig.events.append, rig.clock)
        async with supervised(device):
            await wait_until(lambda: device.state is DeviceState.READY, "READY")
            sim.faults.unplugged = True
            timeouts = master.stats.timeouts
            # The clock stands still: however long this takes in real time, the device has
            # been silent for less than NON_RESPONSE_S.
            await wait_until(lambda: master.stats.timeouts >= timeouts + 6, "two failed polls")
            assert device.state is DeviceState.READY
            sim.faults.unplugged = False
            polls = sim.counters.polls
            await wait_until(lambda: sim.counters.polls > polls + 2, "polling to go on")
            assert states(rig.events) == [DeviceState.STARTING, DeviceState.READY]


async def test_silent_device_goes_offline_and_comes_back() -> None:
    sim, rig = MiniChangerSim(), Rig()
    async with sim_and_master([sim], slack_s=SLACK_S) as (master, _bus):
        device = MiniChangerDevice(master, rig.events.append, rig.clock)
        async with supervised(device):
            await wait_until(lambda: device.state is DeviceState.READY, "READY")
            sim.faults.unplugged = True
            timeouts = master.stats.timeouts
            await wait_until(lambda: master.stats.timeouts > timeouts, "a failed poll")
            rig.clock.advance(MiniChangerDevice.NON_RESPONSE_S + 0.01)
            await wait_until(lambda: device.state is DeviceState.OFFLINE, "OFFLINE")
            offline = [e for e in rig.of(StateChanged) if isinstance(e, StateChanged)][-1]
            assert offline.state is DeviceState.OFFLINE
            assert "no response" in offline.detail
            setups = device.setups
            sim.faults.unplugged = False
            await wait_until(lambda: device.setups > setups, "a new start-up")
            await wait_until(lambda: device.state is DeviceState.READY, "READY again")
            seen = states(rig.events)
            assert seen[:3] == [DeviceState.STARTING, DeviceState.READY, DeviceState.OFFLINE]
            assert seen[-2:] == [DeviceState.STARTING, DeviceState.READY]


async def test_device_that_never_was_there_stays_offline() -> None:
    sim, rig = MiniChangerSim(), Rig()
    sim.faults.unplugged = True
    async with sim_and_master([sim], slack_s=SLACK_S) as (master, _bus):
        device = MiniChangerDevice(master, rig.events.append, rig.clock)
        async with supervised(device):
            # mdb.md "Timing": not gone before its non-response time, however many attempts.
            await wait_until(
                lambda: master.stats.timeouts >= 3 * DEFAULT_MAX_ATTEMPTS, "three RESETs"
            )
            assert states(rig.events) == []
            rig.clock.advance(MiniChangerDevice.NON_RESPONSE_S + 0.01)
            await wait_until(lambda: device.state is DeviceState.OFFLINE and rig.events, "gone")
            timeouts = master.stats.timeouts
            await wait_until(
                lambda: master.stats.timeouts >= timeouts + 2 * DEFAULT_MAX_ATTEMPTS,
                "two more start-up attempts",
            )
            # Said once, with the reason; no OFFLINE -> STARTING -> OFFLINE flapping.
            assert states(rig.events) == [DeviceState.OFFLINE]
            offline = rig.of(StateChanged)[0]
            assert isinstance(offline, StateChanged) and "no response" in offline.detail
            assert device.state is DeviceState.OFFLINE
            assert sim.counters.commands == 0


async def test_one_unanswered_command_at_start_up_is_sent_again_not_a_fault() -> None:
    # Seen with an independent emulator: one command failing its three attempts (~30 ms) at
    # start-up put the device offline and raised a machine fault.
    sim, rig = MiniChangerSim(), Rig()
    async with sim_and_master([sim], slack_s=SLACK_S) as (master, _bus):
        sim.faults.drop_replies = DEFAULT_MAX_ATTEMPTS + 1  # RESET unanswered, then a 4th time
        device = MiniChangerDevice(master, rig.events.append, rig.clock)
        async with supervised(device):
            await wait_until(lambda: device.state is DeviceState.READY, "READY")
            assert states(rig.events) == [DeviceState.STARTING, DeviceState.READY]
            assert master.stats.timeouts == DEFAULT_MAX_ATTEMPTS + 1


class NoJustResetSim(MiniChangerSim):
    """A peripheral that never reports JUST RESET (mdb.md: some do not)."""

    def on_reset(self) -> None:
        super().on_reset()
        self.poll_items.clear()


async def test_start_up_goes_on_without_just_reset(caplog: pytest.LogCaptureFixture) -> None:
    sim, rig = NoJustResetSim(), Rig()
    rig.clock.step = 0.5  # every reading of the clock is half a second later
    caplog.set_level(logging.WARNING, logger="drivers.mdb.device")
    async with sim_and_master([sim], slack_s=SLACK_S) as (master, _bus):
        device = MiniChangerDevice(master, rig.events.append, rig.clock)
        async with supervised(device):
            await wait_until(lambda: device.state is DeviceState.READY, "READY")
    assert device.setups == 1
    assert any("no JUST RESET" in r.getMessage() for r in caplog.records)
