"""Test harness: simulated peripherals on a real pty, and a started BusMaster talking to them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from drivers.mdb.link import StreamLink
from drivers.mdb.master import BusMaster, Timing
from hil.sim.bus import SimBus
from hil.sim.peripheral import SimPeripheral

#: Generous scheduling slack for a loaded CI machine; the MDB limits themselves stay as named
#: in drivers.mdb.master, and the benchmark measures how close we really are.
TEST_SLACK_S = 0.03


@asynccontextmanager
async def sim_and_master(
    peripherals: list[SimPeripheral], *, timing: bool = False, slack_s: float = TEST_SLACK_S
) -> AsyncIterator[tuple[BusMaster, SimBus]]:
    bus = SimBus.on_pty(peripherals, timing=timing)
    bus.start()
    master = BusMaster(StreamLink(bus.port), timing=Timing(slack_s=slack_s))
    master.start()
    try:
        yield master, bus
    finally:
        await master.close()
        bus.stop()
