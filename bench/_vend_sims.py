"""Simulators for ``bench/vend.py`` that timestamp what they see, with ``time.perf_counter_ns``.

``perf_counter_ns`` reads CLOCK_MONOTONIC on Linux, the clock behind the daemon's
``time.monotonic`` and asyncio's loop time, so these stamps compare directly with stamps taken
in other processes on the same machine.

* ``TimedCoinChanger``: the project's coin changer simulator; records when ``answer`` hands
  the bus a POLL reply that carries a coin-deposited item (``01yyxxxx``). A reply sent again
  because the VMC's ACK was lost is not a new deposit and is not recorded again.
* ``TimedVmc96Simulator``: the VMC96 board simulator whose model records when a RUN frame for
  one motor arrives. The model's ``handle`` is the first place a decoded frame reaches, right
  after the serving thread reads the bytes off the pty.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from drivers.mdb.block import CommandReceived
from drivers.motor import vmc96 as proto
from hil.sim.coin import CoinChangerSim
from hil.sim.vmc96 import (
    BEAM_BLOCK_S,
    FALL_TIME_FAST_S,
    TURN_TIME_FAST_S,
    Slot,
    Vmc96Model,
    Vmc96Simulator,
)

#: mdb.md "Coin changer", POLL activity: ``01yyxxxx`` coin deposited, routing ``yy``.
ROUTE_CASHBOX, ROUTE_TUBES, ROUTE_REJECTED = 0b00, 0b01, 0b11


@dataclass(frozen=True, slots=True)
class Deposit:
    """One coin-deposited item as the changer reported it."""

    at_ns: int  # perf_counter_ns when the POLL reply carrying it left ``answer``
    coin_type: int
    route: int  # ROUTE_*


@dataclass(frozen=True, slots=True)
class RunSeen:
    """One RUN frame for a single motor, as the board received it."""

    at_ns: int
    motor: int  # the motor id byte of the frame


def deposits_in(reply: bytes) -> list[tuple[int, int]]:
    """(coin type, route) of every coin-deposited item in a coin changer's POLL reply.

    Item sizes (mdb.md "Coin changer" POLL): ``1yyyxxxx n`` manually dispensed (2 bytes),
    ``01yyxxxx n`` deposited (2 bytes), ``001xxxxx`` slugs (1 byte), ``0000xxxx`` status
    (1 byte).
    """
    found: list[tuple[int, int]] = []
    i = 0
    while i < len(reply):
        first = reply[i]
        if first & 0x80:
            i += 2
        elif first & 0x40:
            found.append((first & 0x0F, (first >> 4) & 0x03))
            i += 2
        else:
            i += 1
    return found


class TimedCoinChanger(CoinChangerSim):
    """The coin changer simulator, recording every deposit it reports (first sending only)."""

    def __init__(self) -> None:
        self._deposits: list[Deposit] = []
        self._deposits_lock = threading.Lock()
        super().__init__()

    def answer(self, command: CommandReceived) -> bytes | None:
        with self.lock:
            resends = self.counters.resends_after_lost_ack
            reply = super().answer(command)
            again = self.counters.resends_after_lost_ack != resends
        if reply and not again and command.addr_cmd & 0x07 == self.POLL_CMD:
            found = deposits_in(reply)
            if found:
                now = time.perf_counter_ns()
                with self._deposits_lock:
                    self._deposits.extend(Deposit(now, t, r) for t, r in found)
        return reply

    def accepts(self, coin_type: int) -> bool:
        """Whether the VMC's last COIN TYPE enabled this coin type."""
        with self.lock:
            return bool(self.accept_mask >> coin_type & 1)

    def take_deposits(self) -> list[Deposit]:
        """The deposits recorded since the last call, oldest first."""
        with self._deposits_lock:
            taken, self._deposits = self._deposits, []
        return taken


class TimedVmc96Model(Vmc96Model):
    """The VMC96 model, recording each RUN frame for one motor as it arrives."""

    def __init__(
        self,
        *,
        turn_time_s: float,
        fall_time_s: float,
        beam_block_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._runs: list[RunSeen] = []
        self._runs_lock = threading.Lock()
        super().__init__(
            turn_time_s=turn_time_s, fall_time_s=fall_time_s, beam_block_s=beam_block_s, clock=clock
        )

    def handle(self, frame: proto.Frame) -> proto.Frame | None:
        if (
            frame.controller == proto.CONTROLLER_MOTOR_ARRAY
            and frame.code == proto.RUN.code
            and len(frame.payload) == proto.RUN.request_len
        ):
            seen = RunSeen(time.perf_counter_ns(), frame.payload[0])
            with self._runs_lock:
                self._runs.append(seen)
        return super().handle(frame)

    def take_runs(self) -> list[RunSeen]:
        """The RUN frames recorded since the last call, oldest first."""
        with self._runs_lock:
            taken, self._runs = self._runs, []
        return taken


class TimedVmc96Simulator(Vmc96Simulator):
    """The VMC96 board simulator serving a ``TimedVmc96Model``."""

    model: TimedVmc96Model

    def __init__(
        self,
        *,
        turn_time_s: float = TURN_TIME_FAST_S,
        fall_time_s: float = FALL_TIME_FAST_S,
        beam_block_s: float = BEAM_BLOCK_S,
        stock: Mapping[Slot, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            turn_time_s=turn_time_s, fall_time_s=fall_time_s, beam_block_s=beam_block_s, clock=clock
        )
        # Swapped in before start(): the serving thread only ever sees the timed model.
        self.model = TimedVmc96Model(
            turn_time_s=turn_time_s, fall_time_s=fall_time_s, beam_block_s=beam_block_s, clock=clock
        )
        for (row, col), count in (stock or {}).items():
            self.model.set_stock(row, col, count)

    def take_runs(self) -> list[RunSeen]:
        return self.model.take_runs()
