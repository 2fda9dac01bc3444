"""The motor board as the vend cycle sees it: run one slot's motor for one turn, watch the drop
sensor, stop everything.

A board implementation (``drivers.motor.vmc96.Vmc96Board`` is the first) owns the wire protocol;
this module only fixes the contract and the errors every implementation raises, so the vend cycle
and its tests do not depend on a particular board.

Slots are addressed by motor matrix ``(row, col)``, both counted from 0; the planogram maps a
product slot to its motor coordinates.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass

from drivers.errors import MotorError


class MotorOutcome(enum.Enum):
    """How one motor turn ended (what the motor did, not whether a product fell)."""

    #: The motor made its turn and stopped on its home switch.
    TURNED = "turned"
    #: The motor drew stall current or could not finish its turn: the spiral is blocked.
    JAMMED = "jammed"
    #: No motor answers at that matrix position (unplugged, burnt, never fitted).
    NO_MOTOR = "no_motor"
    #: The turn did not end within the allowed time with nothing else to explain it.
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class TurnResult:
    """The outcome of one turn, whether the drop sensor saw a product fall, and a short human
    description for the journal and logs."""

    outcome: MotorOutcome
    dropped: bool
    detail: str


class MotorBoardOffline(MotorError):
    """The board does not answer (unplugged, powered off, port gone)."""


class MotorProtocolError(MotorError):
    """The board answered, but not as the protocol says it should."""


class SlotOutOfRange(MotorError):
    """A (row, col) outside the board's motor matrix."""

    def __init__(self, row: int, col: int, rows: int, cols: int) -> None:
        super().__init__(f"slot ({row}, {col}) outside the {rows}x{cols} motor matrix")
        self.row = row
        self.col = col


class TurnAborted(MotorError):
    """``stop_all`` was called while ``run_slot`` was turning a motor."""

    def __init__(self, row: int, col: int, dropped: bool) -> None:
        super().__init__(f"turn of slot ({row}, {col}) aborted by stop_all (dropped={dropped})")
        self.row = row
        self.col = col
        self.dropped = dropped


class TurnOutcomeUnknown(MotorError):
    """The board failed (no answer, a broken frame, the port gone) after a RUN it may have
    carried out: whether the motor turned and the product fell is not known. A vend cycle must
    count such a vend as interrupted, never as one that certainly failed."""

    def __init__(self, row: int, col: int, cause: MotorError) -> None:
        super().__init__(f"slot ({row}, {col}): turn outcome unknown: {cause}")
        self.row = row
        self.col = col
        self.cause = cause


class MotorBoard(abc.ABC):
    """A board that drives the spiral motors of one machine and reads its drop sensor.

    Implementations serialise access themselves: callers may share one instance between tasks.
    Every method that talks to the board raises ``MotorBoardOffline`` when the board does not
    answer in time and ``MotorProtocolError`` when it answers nonsense; none of them hangs.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Open the link to the board. Raises ``MotorBoardOffline`` if the port cannot open."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the link. Idempotent; safe to call on a board that never opened."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the board answers a ping; False when it is silent or answers nonsense."""

    @abc.abstractmethod
    async def run_slot(
        self, row: int, col: int, *, turn_timeout_s: float, drop_timeout_s: float
    ) -> TurnResult:
        """Turn the motor at (row, col) once while watching the drop sensor.

        Returns when the turn ended and either a drop was seen or ``drop_timeout_s`` passed
        after the turn. A turn still running after ``turn_timeout_s`` is stopped.
        """

    @abc.abstractmethod
    async def drop_sensor_blocked(self) -> bool:
        """True when the drop sensor beam is interrupted right now (dirty, obstructed, or a
        product passing). A vend should not start on a blocked sensor: it could not see a drop.
        """

    @abc.abstractmethod
    async def stop_all(self) -> None:
        """De-energise every motor. A ``run_slot`` in progress raises ``TurnAborted``."""
