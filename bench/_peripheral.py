"""A minimal coin-changer-like simulated peripheral, shared by the MDB link tests and benchmark.

It is deliberately not the project's coin changer (``hil/sim/coin.py`` is written elsewhere):
just enough of one to exercise the link layer: RESET, a SETUP reply, POLL activity items, one
command with data (COIN TYPE), and an expansion command with sub-commands (to exercise the
command framer's sub-command lookup).
"""

from __future__ import annotations

import threading

from drivers.mdb.block import CommandReceived
from drivers.mdb.commands import CommandDef, CommandTable
from hil.sim.peripheral import SimPeripheral

CHANGER_ADDRESS = 0x08

RESET = CommandDef("RESET", 0x00)
SETUP = CommandDef("SETUP", 0x01)
POLL = CommandDef("POLL", 0x03)
COIN_TYPE = CommandDef("COIN TYPE", 0x04, data_len=4)  # accept mask(2), manual-dispense mask(2)
EXPANSION_ID = CommandDef("EXPANSION ID", 0x07, sub=0x00, data_len=1)
FEATURE_ENABLE = CommandDef("FEATURE ENABLE", 0x07, sub=0x01, data_len=5)

MINI_CHANGER_TABLE = CommandTable(
    CHANGER_ADDRESS, [RESET, SETUP, POLL, COIN_TYPE, EXPANSION_ID, FEATURE_ENABLE]
)

#: mdb.md "Coin changer": level 3, currency 0x1978 (EUR), scaling 5, 2 decimals, routing 0x0003,
#: coin credits 1, 2, 4, 10 (x scaling: 5, 10, 20, 50 cents).
SETUP_REPLY = bytes((0x03, 0x19, 0x78, 0x05, 0x02, 0x00, 0x03, 0x01, 0x02, 0x04, 0x0A))
EXPANSION_ID_REPLY = b"VMC" + b"000000000001" + b"MINICHANGER " + b"\x01\x00" + b"\x00\x00\x00\x00"
JUST_RESET = b"\x0b"


def coin_deposited(coin_type: int, routing: int, tube_count: int) -> bytes:
    """mdb.md: ``01yyxxxx n``: coin ``xxxx`` routed ``yy`` (00 cashbox, 01 tubes); n in tube."""
    return bytes((0x40 | (routing & 0x03) << 4 | (coin_type & 0x0F), tube_count & 0xFF))


class MiniChangerSim(SimPeripheral):
    """Coin-changer-like peripheral at 0x08 that records every command it answers, in order.

    With ``auto_report`` set, every POLL finds a fresh coin-deposited item waiting (a different
    tube count each time, so no two replies are identical): each exchange then carries data and
    is ACKed, as the benchmark needs.
    """

    NAME = "minichanger"
    ADDRESS = CHANGER_ADDRESS
    POLL_CMD = POLL.command
    JUST_RESET_ITEM = JUST_RESET

    def __init__(self, *, auto_report: bool = False) -> None:
        self.seen: list[int] = []  # addr|cmd of every good command addressed to us
        self.coin_type: bytes | None = None  # last COIN TYPE data, None after RESET
        self.auto_report = auto_report
        self._reported = 0
        self._seen_lock = threading.Lock()
        super().__init__(MINI_CHANGER_TABLE)

    def answer(self, command: CommandReceived) -> bytes | None:
        with self._seen_lock:
            self.seen.append(command.addr_cmd)
        if self.auto_report and command.addr_cmd & 0x07 == POLL.command:
            with self.lock:
                if not self.poll_items:
                    self._reported += 1
                    self.poll_items.append(coin_deposited(1, 1, self._reported % 200))
        return super().answer(command)

    def seen_commands(self) -> list[int]:
        with self._seen_lock:
            return list(self.seen)

    def on_reset(self) -> None:
        self.coin_type = None

    def handle(self, command: CommandReceived) -> bytes | None:
        found = self.table.lookup(command.block)
        if found is SETUP:
            return SETUP_REPLY
        if found is COIN_TYPE:
            self.coin_type = command.data
            return b""
        if found is EXPANSION_ID:
            return EXPANSION_ID_REPLY
        if found is FEATURE_ENABLE:
            return b""
        return None
