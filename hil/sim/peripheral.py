"""Base of every simulated MDB peripheral.

A simulator is built on the project's own protocol classes: the same ``CommandTable`` delimits
the VMC's command blocks, and replies are encoded with the same block and codec functions the
VMC decodes them with. The base class does what every MDB peripheral does the same way:

* POLL: report queued activity items; keep them until the VMC ACKs; if the next POLL comes
  without an ACK in between (the ACK was lost), send the very same data again;
* RET from the VMC: send the last reply again;
* RESET: forget set-up, queue JUST RESET;
* several activity items in one POLL reply, up to the device's ``MAX_POLL_BYTES``; with
  ``Faults.batch_items`` queued items are held back until that many are waiting (or ``flush``);
* a self-reset a set number of commands from now (``Faults.reset_after_commands``);
* fault injection (``Faults``), applied by the bus when it sends the reply;
* the physical state that outlives a power cycle (``physical_state``), saved by
  ``hil.sim.state`` when the simulators run with ``--state``.

Subclasses implement ``handle`` for their other commands and keep a ledger of what physically
happened (coins in and out, bills stacked, ...), which tests compare with the VMC's journal.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

from drivers.mdb.block import MAX_BLOCK_LEN, CommandReceived, LengthOf
from drivers.mdb.commands import CommandTable

#: Most activity items one POLL reply carries (MDB 4.2 §5.3: up to 16 for a coin changer).
MAX_POLL_ITEMS = 16
#: Most bytes of activity items one POLL reply carries when the device's section of the
#: standard sets no lower limit: a whole block less its CHK.
MAX_POLL_BYTES_IN_A_BLOCK = MAX_BLOCK_LEN - 1


@dataclass(slots=True)
class Faults:
    """Faults to inject; counters count down as they are used."""

    drop_replies: int = 0  # the next N commands get no reply at all
    bad_checksum: int = 0  # the next N data replies carry a wrong CHK
    late_replies: int = 0  # the next N replies are sent late ...
    late_by_s: float = 0.02  # ... by this much (MDB allows 5 ms)
    lose_acks: int = 0  # the next N ACKs from the VMC go unheard: the data is sent again
    garbage: bytes = b""  # written once, before the next reply
    unplugged: bool = False  # silent to everything
    nak_replies: int = 0  # the next N commands are refused with NAK (and not carried out)
    reset_after_commands: int = 0  # the device resets itself after N more commands (0: never)
    batch_items: int = 0  # a setting, not a counter: hold POLL items until N are queued

    def as_dict(self) -> dict[str, Any]:
        return {
            "drop_replies": self.drop_replies,
            "bad_checksum": self.bad_checksum,
            "late_replies": self.late_replies,
            "late_by_s": self.late_by_s,
            "lose_acks": self.lose_acks,
            "garbage": self.garbage.hex(),
            "unplugged": self.unplugged,
            "nak_replies": self.nak_replies,
            "reset_after_commands": self.reset_after_commands,
            "batch_items": self.batch_items,
        }


@dataclass(slots=True)
class PeripheralCounters:
    commands: int = 0
    polls: int = 0
    acks: int = 0
    rets: int = 0
    resends_after_lost_ack: int = 0
    resets: int = 0
    naks_sent: int = 0
    self_resets: int = 0  # resets of its own (reset_itself, reset_after_commands)


class SimPeripheral(abc.ABC):
    """One simulated peripheral on a ``SimBus``. All state changes happen under ``lock``."""

    NAME: ClassVar[str]
    ADDRESS: ClassVar[int]
    POLL_CMD: ClassVar[int]  # command offset of POLL for this class
    RESET_CMD: ClassVar[int] = 0x00
    JUST_RESET_ITEM: ClassVar[bytes]  # the POLL item that reports JUST RESET
    #: Most bytes of activity items in one POLL reply (a coin changer and a bill validator
    #: report at most 16, MDB 4.2 §5.3 and §6.3 Z1-Z16).
    MAX_POLL_BYTES: ClassVar[int] = MAX_POLL_BYTES_IN_A_BLOCK

    def __init__(self, table: CommandTable) -> None:
        self.table = table
        self.lock = threading.RLock()
        self.faults = Faults()
        self.counters = PeripheralCounters()
        self.poll_items: list[bytes] = []
        self._in_flight: list[bytes] | None = None  # items sent in a POLL reply, not ACKed
        self._in_flight_data: bytes | None = None
        self.last_reply: bytes | None = None  # for RET
        self._awaiting_ack = False
        self._release_held_items = False  # ``flush``: send held items without a full batch
        self._self_reset_due = False  # reset_after_commands ran out: reset before the next one
        self.power_up()

    # --- for subclasses ------------------------------------------------------------------

    @abc.abstractmethod
    def handle(self, command: CommandReceived) -> bytes | None:
        """Answer a command other than RESET and POLL: data (no CHK), b"" for ACK, None for
        silence (a real peripheral ignores what it cannot take)."""

    def on_reset(self) -> None:  # noqa: B027 - optional hook
        """RESET or power-up: forget set-up (subclasses clear enables, levels, ...)."""

    def on_items_acked(self, items: list[bytes]) -> None:  # noqa: B027 - optional hook
        """The VMC ACKed a POLL reply carrying these items."""

    def on_data_acked(self, data: bytes) -> None:  # noqa: B027 - optional hook
        """The VMC ACKed a non-POLL data reply."""

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Device-specific controls (insert a coin, press the lever, ...)."""
        raise KeyError(f"{self.NAME}: unknown control {request.get('cmd')!r}")

    def ledger(self) -> dict[str, Any]:
        """What physically happened, for comparison with the VMC's records."""
        return {}

    def physical_state(self) -> dict[str, Any]:
        """What a power cycle does not change (tube contents, a stacker's count, a jam): saved
        with ``--state`` and given back to ``load_physical_state`` at the next start. JSON-able;
        empty for a device with nothing physical to keep."""
        return {}

    def load_physical_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Take back what ``physical_state`` returned in an earlier run."""

    # --- shared mechanics ----------------------------------------------------------------

    def length_of(self) -> LengthOf:
        return self.table.length_of()

    def power_up(self) -> None:
        """Power-on or RESET: JUST RESET is the first thing the next POLL reports."""
        with self.lock:
            self.poll_items = [self.JUST_RESET_ITEM]
            self._in_flight = None
            self._in_flight_data = None
            self._awaiting_ack = False
            self.on_reset()

    def reset_itself(self) -> None:
        """An unsolicited reset (brown-out, watchdog): the VMC must notice and start us up."""
        with self.lock:
            self.counters.resets += 1
            self.counters.self_resets += 1
            self._self_reset_due = False
            self.power_up()

    def reset_if_due(self) -> None:
        """The bus calls this before each command: a self-reset armed by
        ``reset_after_commands`` happens between the N-th command's exchange and the next one,
        so the N-th reply is whole and its ACK heard."""
        with self.lock:
            if self._self_reset_due:
                self.reset_itself()

    def command_taken(self) -> None:
        """The bus calls this after each command answered: count towards a self-reset."""
        with self.lock:
            if self.faults.reset_after_commands > 0:
                self.faults.reset_after_commands -= 1
                self._self_reset_due = self.faults.reset_after_commands == 0

    def flush(self) -> int:
        """Let the next POLL carry the items held back by ``batch_items``; returns how many
        are queued."""
        with self.lock:
            self._release_held_items = bool(self.poll_items)
            return len(self.poll_items)

    def queue_item(self, item: bytes) -> None:
        with self.lock:
            self.poll_items.append(item)

    def answer(self, command: CommandReceived) -> bytes | None:
        """The bus calls this for every good command addressed to us."""
        with self.lock:
            self.counters.commands += 1
            cmd = command.addr_cmd & 0x07
            if cmd == self.RESET_CMD:
                self.counters.resets += 1
                self.power_up()
                return self._sent(b"")
            if cmd == self.POLL_CMD:
                self.counters.polls += 1
                if self._in_flight is not None and self._in_flight_data is not None:
                    # Our last POLL reply was never ACKed: send the same data again.
                    self.counters.resends_after_lost_ack += 1
                    return self._sent(self._in_flight_data, awaiting=True)
                items = self._take_items()
                if not items:
                    return self._sent(b"")
                data = b"".join(items)
                self._in_flight = items
                self._in_flight_data = data
                return self._sent(data, awaiting=True)
            self._in_flight = None
            self._in_flight_data = None
            reply = self.handle(command)
            if reply is None:
                return None
            return self._sent(reply, awaiting=bool(reply))

    def _take_items(self) -> list[bytes]:
        batch = self.faults.batch_items
        if batch > 1 and len(self.poll_items) < batch and not self._release_held_items:
            return []  # held back: the device reports in batches
        items: list[bytes] = []
        size = 0
        for item in self.poll_items:
            if len(items) >= MAX_POLL_ITEMS or size + len(item) > self.MAX_POLL_BYTES:
                break
            items.append(item)
            size += len(item)
        if items:
            # A released batch flows out whole, over as many replies as it takes.
            self._release_held_items = len(items) < len(self.poll_items)
        return items

    def _sent(self, data: bytes, awaiting: bool = False) -> bytes:
        self.last_reply = data
        self._awaiting_ack = awaiting
        return data

    def control_word(self, value: int) -> bytes | None:
        """The VMC's ACK/RET/NAK after our data reply; returns data to resend on RET."""
        with self.lock:
            if value == 0xAA:  # RET: send the same reply again
                self.counters.rets += 1
                return self.last_reply
            if value == 0x00 and self._awaiting_ack:
                if self.faults.lose_acks > 0:
                    self.faults.lose_acks -= 1
                    return None
                self.counters.acks += 1
                self._awaiting_ack = False
                if self._in_flight is not None:
                    acked = self._in_flight
                    del self.poll_items[: len(acked)]
                    self._in_flight = None
                    self._in_flight_data = None
                    self.on_items_acked(acked)
                elif self.last_reply:
                    self.on_data_acked(self.last_reply)
            return None

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "name": self.NAME,
                "address": self.ADDRESS,
                "faults": self.faults.as_dict(),
                "pending_items": [i.hex() for i in self.poll_items],
                "counters": {
                    k: getattr(self.counters, k) for k in PeripheralCounters.__dataclass_fields__
                },
            }
