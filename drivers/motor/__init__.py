"""Spiral motor boards: the ``MotorBoard`` contract and its implementations (VMC96 first)."""

from drivers.motor.base import (
    MotorBoard,
    MotorBoardOffline,
    MotorOutcome,
    MotorProtocolError,
    SlotOutOfRange,
    TurnAborted,
    TurnOutcomeUnknown,
    TurnResult,
)
from drivers.motor.vmc96 import Vmc96Board, Vmc96CommandRejected, Vmc96FramingError

__all__ = [
    "MotorBoard",
    "MotorBoardOffline",
    "MotorOutcome",
    "MotorProtocolError",
    "SlotOutOfRange",
    "TurnAborted",
    "TurnOutcomeUnknown",
    "TurnResult",
    "Vmc96Board",
    "Vmc96CommandRejected",
    "Vmc96FramingError",
]
