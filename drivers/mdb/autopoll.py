"""Idle POLLs served by the MDB line process ("autopoll"); see docs/autopoll.md.

A device that has nothing to report answers POLL with a bare ACK, some 27 times a second on
an idle machine. Carrying each of those exchanges across the socket pair to the daemon cost
both processes a wake-up and a JSON frame each way (docs/footprint.md). Instead the daemon
*arms* a device's POLL in the line process, which then sends that POLL at the device's cadence
itself and tells the daemon only what is not a bare ACK: a data reply (already ACKed, as every
reply is) or an error. That result also *suspends* the device's autopoll, so after any activity
the daemon drives the device exactly as before (parse, events, its own commands) until it arms
the POLL again: the order of events on the wire does not change.

This module holds what both sides share: the line process's schedule (``AutopollSchedule``,
run by the line thread of drivers/mdb/line_child.py), what the daemon receives (``Polled``),
and the capability a bus master offers when it can autopoll (``AutopollBus``). It imports no
asyncio: the line process does not load it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from drivers.errors import MdbError
from drivers.mdb.block import address_of
from drivers.mdb.commands import ACK_OR_DATA, ReplyShape
from drivers.mdb.master import DEFAULT_MAX_ATTEMPTS, BusMaster, Reply

#: The op of the arm/disarm frame (parent → child) and of an unsolicited result (child → parent).
ARM_OP = "autopoll"
POLLED_OP = "polled"


@dataclass(frozen=True, slots=True)
class Polled:
    """One autopoll result sent up: a data reply (ACKed) or the error the POLL ended with.

    ``last_answer_ns``: ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every process of
    the machine) of the device's latest answer to an autopoll POLL, bare ACKs included, which
    are not sent up; 0 if it never answered one. The daemon's non-response time counts from it.
    """

    addr_cmd: int  # the POLL's address and command byte
    result: Reply | MdbError
    last_answer_ns: int


@runtime_checkable
class AutopollBus(Protocol):
    """A bus master that can hand a device's idle POLLs to its line (``LineProcessMaster``).
    The in-process ``BusMaster`` has no such thing; ``MdbDevice`` then polls as before."""

    async def autopoll(
        self, addr_cmd: int, every_s: float | None, expect: ReplyShape = ACK_OR_DATA
    ) -> None:
        """Arm (``every_s``: the interval) or disarm (None) the POLL ``addr_cmd``. Arming
        returns at once; disarming returns once the line holds no autopoll POLL of that
        address in flight, every result before it delivered to ``next_polled``."""

    async def next_polled(self, address: int) -> Polled:
        """The next result of the address's autopoll, in the order the line got them."""

    def take_polled(self, address: int) -> Polled | None:
        """A result already received and not yet taken, without waiting."""

    def take_early_reset(self, address: int) -> bool:
        """True, once, when the line RESET the device at ``address`` before the daemon was up
        and armed its POLL (drivers/mdb/line_spawn.py ``EarlyDevice``)."""


@dataclass(slots=True)
class _Armed:
    addr_cmd: int
    expect: ReplyShape
    every_s: float
    due: float  # time.monotonic() of its next POLL


class AutopollSchedule:
    """The line process's armed POLLs: one per address, each at its own interval, sent only
    when no request of the daemon waits (the line thread asks ``wait_s`` how long it may wait
    for one, then ``poll_due``)."""

    def __init__(self) -> None:
        self._armed: dict[int, _Armed] = {}
        self._last_answer_ns: dict[int, int] = {}

    def arm(self, addr_cmd: int, expect: ReplyShape, every_s: float, now: float) -> None:
        """The first POLL goes one interval from now: the daemon arms when it would have
        started its own wait for the next POLL."""
        self._armed[address_of(addr_cmd)] = _Armed(addr_cmd, expect, every_s, now + every_s)

    def disarm(self, addr_cmd: int) -> None:
        self._armed.pop(address_of(addr_cmd), None)

    def wait_s(self, now: float) -> float | None:
        """How long until the next POLL is due (0: overdue); None when nothing is armed."""
        if not self._armed:
            return None
        return max(0.0, min(armed.due for armed in self._armed.values()) - now)

    def poll_due(self, engine: BusMaster, now: float) -> Polled | None:
        """Send the POLL that is due first, if one is. A bare ACK stays here (None); anything
        else is returned for the parent, and that address's autopoll is suspended."""
        due = [armed for armed in self._armed.values() if armed.due <= now]
        if not due:
            return None
        armed = min(due, key=lambda a: a.due)
        address = address_of(armed.addr_cmd)
        try:
            reply = engine.exchange_blocking(
                armed.addr_cmd, b"", DEFAULT_MAX_ATTEMPTS, armed.expect
            )
        except MdbError as exc:
            del self._armed[address]
            return Polled(armed.addr_cmd, exc, self._last_answer_ns.get(address, 0))
        answered_ns = time.monotonic_ns()
        self._last_answer_ns[address] = answered_ns
        if not reply.data:
            # The next one an interval after this one ended, as the daemon's own loop paced it.
            armed.due = time.monotonic() + armed.every_s
            return None
        del self._armed[address]
        return Polled(armed.addr_cmd, reply, answered_ns)
