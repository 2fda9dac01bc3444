"""MDB bill validator (address 0x30), levels 1 and 2: commands, replies, POLL items, device.

Three layers in one place, kept apart:

* commands as data: ``LEVEL1_TABLE`` / ``LEVEL2_TABLE`` (level 2 adds FEATURE ENABLE and the
  level-2 identification with option bits);
* pure codecs: every reply and request payload is a frozen dataclass with ``encode`` and
  ``decode``, and ``parse_poll_items`` turns a POLL reply into events. The simulator
  (``hil.sim.bill``) encodes with these same functions, so both sides share one definition of
  every byte;
* ``BillValidator``: the VMC-side device (start-up, enable, POLL digestion, ESCROW, STACKER).

Wire facts (mdb.md "Bill validator"; MDB 4.2 §6): SETUP reply is level, currency (BCD, 2),
scaling (2), decimal places, stacker capacity (2), security levels (2), escrow capability
(0xFF yes / 0x00 no), then up to 16 bill type credits; value = credit × scaling, in minor
units. STACKER reply: bit 15 stacker full, bits 14..0 number of bills. Expansion ID: manufacturer
(3 ASCII), serial (12 ASCII), model (12 ASCII), software version (2 BCD), and at level 2 four
bytes of option bits (b0 file transport layer, b1 bill recycling).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from drivers.errors import FramingError, MdbError, NakReceived, NoResponse
from drivers.mdb.commands import ACK_ONLY, CommandDef, CommandTable, ReplyShape, data_reply
from drivers.mdb.device import (
    Clock,
    DeviceEvent,
    DeviceState,
    EventSink,
    JustReset,
    MdbDevice,
    StatusReported,
)
from drivers.mdb.master import MdbBus, Reply

log = logging.getLogger("drivers.mdb.bill")

BILL_ADDRESS = 0x30
#: MDB 4.2 §6: a validator has at most 16 bill types (one bit each in every 16-bit mask).
MAX_BILL_TYPES = 16
#: MDB 4.2 §6: the 15 low bits of the STACKER reply count bills; bit 15 says "full".
STACKER_FULL_BIT = 0x8000
STACKER_COUNT_MASK = 0x7FFF
#: SETUP Z11: escrow capability.
ESCROW_CAPABLE = 0xFF
ESCROW_NOT_CAPABLE = 0x00
#: ESCROW Y1 (mdb.md: 01 stack, 00 return).
ESCROW_STACK = 0x01
ESCROW_RETURN = 0x00

# --- commands as data ------------------------------------------------------------------------

# Reply shapes from MDB 4.2 §6: SETUP 11 bytes + up to 16 bill credits; a POLL reply up to 16
# bytes of items; STACKER 2 bytes; EXPANSION ID 29 bytes (level 1) or 33 (level 2, with the
# feature bits); every other command is answered by a lone ACK.
RESET = CommandDef("RESET", 0x00, reply=ACK_ONLY)
SETUP = CommandDef("SETUP", 0x01, reply=data_reply(11, 11 + MAX_BILL_TYPES))
SECURITY = CommandDef("SECURITY", 0x02, data_len=2, reply=ACK_ONLY)
POLL = CommandDef("POLL", 0x03, reply=ReplyShape(ack=True, min_data=1, max_data=16))
BILL_TYPE = CommandDef("BILL TYPE", 0x04, data_len=4, reply=ACK_ONLY)
ESCROW = CommandDef("ESCROW", 0x05, data_len=1, reply=ACK_ONLY)
STACKER = CommandDef("STACKER", 0x06, reply=data_reply(2))
EXPANSION_ID_L1 = CommandDef(
    "EXPANSION LEVEL 1 ID", 0x07, sub=0x00, data_len=1, reply=data_reply(29)
)
FEATURE_ENABLE = CommandDef("EXPANSION FEATURE ENABLE", 0x07, sub=0x01, data_len=5, reply=ACK_ONLY)
EXPANSION_ID_L2 = CommandDef(
    "EXPANSION LEVEL 2 ID", 0x07, sub=0x02, data_len=1, reply=data_reply(33)
)

_LEVEL1_COMMANDS = (RESET, SETUP, SECURITY, POLL, BILL_TYPE, ESCROW, STACKER, EXPANSION_ID_L1)
LEVEL1_TABLE = CommandTable(BILL_ADDRESS, _LEVEL1_COMMANDS)
LEVEL2_TABLE = CommandTable(BILL_ADDRESS, (*_LEVEL1_COMMANDS, FEATURE_ENABLE, EXPANSION_ID_L2))

#: Option bits of the level-2 identification and FEATURE ENABLE (MDB 4.2 §6).
FEATURE_FTL = 0x0000_0001
FEATURE_RECYCLING = 0x0000_0002
#: Features this driver knows how to use: none yet (no FTL, no recycler commands).
SUPPORTED_FEATURES = 0


def table_for_level(level: int) -> CommandTable:
    """The command table of a validator at ``level`` (1, or 2 and above)."""
    return LEVEL1_TABLE if level <= 1 else LEVEL2_TABLE


# --- errors ----------------------------------------------------------------------------------


class BillReplyError(FramingError):
    """A bill validator reply (or request payload) whose length or content does not fit."""


class EscrowInProgress(MdbError):
    """``escrow`` was called while another ``escrow`` is still waiting for its outcome."""


# --- POLL items ------------------------------------------------------------------------------

STATUS_DEFECTIVE_MOTOR = 0x01
STATUS_SENSOR_PROBLEM = 0x02
STATUS_BUSY = 0x03
STATUS_ROM_CHECKSUM = 0x04
STATUS_JAMMED = 0x05
STATUS_JUST_RESET = 0x06
STATUS_BILL_REMOVED = 0x07
STATUS_CASHBOX_OUT = 0x08
STATUS_DISABLED = 0x09
STATUS_INVALID_ESCROW = 0x0A
STATUS_BILL_REJECTED = 0x0B
STATUS_CREDITED_BILL_REMOVAL = 0x0C

STATUS_TEXT: dict[int, str] = {
    STATUS_DEFECTIVE_MOTOR: "defective motor",
    STATUS_SENSOR_PROBLEM: "sensor problem",
    STATUS_BUSY: "validator busy",
    STATUS_ROM_CHECKSUM: "ROM checksum error",
    STATUS_JAMMED: "validator jammed",
    STATUS_JUST_RESET: "validator was reset",
    STATUS_BILL_REMOVED: "bill removed",
    STATUS_CASHBOX_OUT: "cash box out of position",
    STATUS_DISABLED: "validator disabled",
    STATUS_INVALID_ESCROW: "invalid escrow request",
    STATUS_BILL_REJECTED: "bill rejected",
    STATUS_CREDITED_BILL_REMOVAL: "possible credited bill removal",
}
#: Statuses that stop the validator taking money until someone fixes it.
FAULT_STATUSES = frozenset(
    {
        STATUS_DEFECTIVE_MOTOR,
        STATUS_SENSOR_PROBLEM,
        STATUS_ROM_CHECKSUM,
        STATUS_JAMMED,
        STATUS_CASHBOX_OUT,
    }
)
#: Statuses that describe a standing condition: a validator repeats them in every POLL while
#: the condition holds (observed for "cash box out"; assumed for the others, verify), so the
#: device reports each at its onset and again when a POLL no longer carries it.
CONDITION_STATUSES = frozenset(FAULT_STATUSES | {STATUS_BUSY, STATUS_DISABLED})

ROUTING_FLAG = 0x80  # 1yyyxxxx
ATTEMPTS_MASK = 0xE0  # 010xxxxx
ATTEMPTS_FLAG = 0x40
MAX_ATTEMPTS_COUNT = 0x1F


class BillRoute(enum.IntEnum):
    """The ``yyy`` of a bill routing item ``1yyyxxxx``."""

    STACKED = 0b000
    ESCROW = 0b001
    RETURNED = 0b010
    TO_RECYCLER = 0b011
    DISABLED_REJECTED = 0b100
    TO_RECYCLER_MANUAL_FILL = 0b101
    MANUAL_DISPENSE = 0b110
    RECYCLER_TO_CASHBOX = 0b111


def status_item(code: int) -> bytes:
    """The one-byte POLL item of a status (0x01..0x0C)."""
    if code not in STATUS_TEXT:
        raise ValueError(f"not a bill validator status: 0x{code:02X}")
    return bytes((code,))


def routing_item(route: BillRoute, bill_type: int) -> bytes:
    """The POLL item ``1yyyxxxx`` for a bill of ``bill_type`` taking ``route``."""
    if not 0 <= bill_type < MAX_BILL_TYPES:
        raise ValueError(f"bill type out of range: {bill_type}")
    return bytes((ROUTING_FLAG | (int(route) << 4) | bill_type,))


def attempts_item(count: int) -> bytes:
    """The POLL item ``010xxxxx``: bills offered while disabled (saturates at 31)."""
    if count < 1:
        raise ValueError(f"attempt count must be positive: {count}")
    return bytes((ATTEMPTS_FLAG | min(count, MAX_ATTEMPTS_COUNT),))


# --- replies and request payloads ------------------------------------------------------------


def _u16(data: bytes, offset: int) -> int:
    return (data[offset] << 8) | data[offset + 1]


def _bcd_to_int(raw: int, digits: int) -> int | None:
    """A packed-BCD number, or None when a nibble is not a decimal digit."""
    value = 0
    for shift in range((digits - 1) * 4, -4, -4):
        nibble = (raw >> shift) & 0xF
        if nibble > 9:
            return None
        value = value * 10 + nibble
    return value


def _ascii_field(data: bytes) -> str:
    # Identification fields are ASCII padded with spaces; keep anything odd visible, never fail.
    return data.decode("ascii", errors="replace").rstrip(" \x00")


@dataclass(frozen=True, slots=True)
class BillSetup:
    """The SETUP reply (MDB 4.2 §6, 0x31): what the validator is and which bills it knows."""

    level: int
    currency_code: int  # raw 2-byte BCD (0x1978 = ISO 4217 978, EUR)
    scaling: int  # 2 bytes: every bill value is credit × scaling, in minor units
    decimals: int
    stacker_capacity: int
    security_levels: int  # bit n: bill type n at high security
    escrow_capable: bool
    credits: tuple[int, ...]  # credit byte per bill type, index = type; 0 = type not used

    MIN_LEN: ClassVar[int] = 11

    def __post_init__(self) -> None:
        if len(self.credits) > MAX_BILL_TYPES:
            raise ValueError(f"at most {MAX_BILL_TYPES} bill types, got {len(self.credits)}")

    def encode(self) -> bytes:
        return (
            bytes((self.level,))
            + self.currency_code.to_bytes(2, "big")
            + self.scaling.to_bytes(2, "big")
            + bytes((self.decimals,))
            + self.stacker_capacity.to_bytes(2, "big")
            + self.security_levels.to_bytes(2, "big")
            + bytes((ESCROW_CAPABLE if self.escrow_capable else ESCROW_NOT_CAPABLE,))
            + bytes(self.credits)
        )

    @classmethod
    def decode(cls, data: bytes) -> BillSetup:
        if len(data) < cls.MIN_LEN:
            raise BillReplyError(f"SETUP reply of {len(data)} bytes, need {cls.MIN_LEN}", data)
        # Tolerate fewer than 16 credits (validators with few bill types send fewer) and
        # ignore anything past 16.
        credits = tuple(data[cls.MIN_LEN : cls.MIN_LEN + MAX_BILL_TYPES])
        return cls(
            level=data[0],
            currency_code=_u16(data, 1),
            scaling=_u16(data, 3),
            decimals=data[5],
            stacker_capacity=_u16(data, 6),
            security_levels=_u16(data, 8),
            escrow_capable=data[10] != ESCROW_NOT_CAPABLE,
            credits=credits,
        )

    @property
    def currency_numeric(self) -> int | None:
        """ISO 4217 numeric code when the leading BCD digit is 1, else None (a country code)."""
        if self.currency_code >> 12 != 1:
            return None
        return _bcd_to_int(self.currency_code & 0x0FFF, 3)

    def credit_of(self, bill_type: int) -> int:
        """The credit byte of ``bill_type``; 0 when the validator does not define it."""
        return self.credits[bill_type] if 0 <= bill_type < len(self.credits) else 0

    def value_of(self, bill_type: int) -> int:
        """The value of ``bill_type`` in minor units; 0 when the type is not defined."""
        return self.credit_of(bill_type) * self.scaling

    @property
    def known_types_mask(self) -> int:
        """A BILL TYPE mask with a bit for every type that has a value."""
        return sum(1 << t for t, credit in enumerate(self.credits) if credit)


@dataclass(frozen=True, slots=True)
class BillIdentity:
    """The EXPANSION ID reply: level-1 form (29 bytes) or level-2 form with option bits (33)."""

    manufacturer: str  # 3 ASCII
    serial: str  # 12 ASCII
    model: str  # 12 ASCII
    software_version: int  # raw 2-byte BCD (0x0425 = version 4.25)
    features: int | None = None  # level-2 option bits; None for the level-1 form

    L1_LEN: ClassVar[int] = 29
    L2_LEN: ClassVar[int] = 33

    def encode(self) -> bytes:
        out = (
            _ascii_fixed(self.manufacturer, 3)
            + _ascii_fixed(self.serial, 12)
            + _ascii_fixed(self.model, 12)
            + self.software_version.to_bytes(2, "big")
        )
        if self.features is not None:
            out += self.features.to_bytes(4, "big")
        return out

    @classmethod
    def decode(cls, data: bytes, *, with_features: bool) -> BillIdentity:
        want = cls.L2_LEN if with_features else cls.L1_LEN
        if len(data) < want:
            raise BillReplyError(f"EXPANSION ID reply of {len(data)} bytes, need {want}", data)
        return cls(
            manufacturer=_ascii_field(data[0:3]),
            serial=_ascii_field(data[3:15]),
            model=_ascii_field(data[15:27]),
            software_version=_u16(data, 27),
            features=int.from_bytes(data[29:33], "big") if with_features else None,
        )


def _ascii_fixed(text: str, width: int) -> bytes:
    raw = text.encode("ascii")
    if len(raw) > width:
        raise ValueError(f"{text!r} is longer than {width} characters")
    return raw.ljust(width, b" ")


@dataclass(frozen=True, slots=True)
class StackerStatus:
    """The STACKER reply: is the stacker full, and how many bills it holds."""

    full: bool
    count: int

    def encode(self) -> bytes:
        if not 0 <= self.count <= STACKER_COUNT_MASK:
            raise ValueError(f"stacker count out of range: {self.count}")
        return ((STACKER_FULL_BIT if self.full else 0) | self.count).to_bytes(2, "big")

    @classmethod
    def decode(cls, data: bytes) -> StackerStatus:
        if len(data) < 2:
            raise BillReplyError(f"STACKER reply of {len(data)} bytes, need 2", data)
        raw = _u16(data, 0)
        return cls(bool(raw & STACKER_FULL_BIT), raw & STACKER_COUNT_MASK)


@dataclass(frozen=True, slots=True)
class BillTypeSetting:
    """The BILL TYPE payload: which types are accepted, and which of those stop in escrow."""

    enable_mask: int
    escrow_mask: int

    def encode(self) -> bytes:
        return self.enable_mask.to_bytes(2, "big") + self.escrow_mask.to_bytes(2, "big")

    @classmethod
    def decode(cls, payload: bytes) -> BillTypeSetting:
        if len(payload) != 4:
            raise BillReplyError(f"BILL TYPE payload of {len(payload)} bytes, need 4", payload)
        return cls(_u16(payload, 0), _u16(payload, 2))


def encode_mask16(mask: int) -> bytes:
    """A 16-bit bill type mask (SECURITY), high byte first (types 15..8, then 7..0)."""
    return mask.to_bytes(2, "big")


def decode_mask16(payload: bytes) -> int:
    if len(payload) != 2:
        raise BillReplyError(f"mask payload of {len(payload)} bytes, need 2", payload)
    return _u16(payload, 0)


def encode_escrow(stack: bool) -> bytes:
    return bytes((ESCROW_STACK if stack else ESCROW_RETURN,))


def decode_escrow(payload: bytes) -> bool:
    """True for stack, False for return; anything else is not an ESCROW request."""
    if payload == bytes((ESCROW_STACK,)):
        return True
    if payload == bytes((ESCROW_RETURN,)):
        return False
    raise BillReplyError("ESCROW payload is neither 00 nor 01", payload)


def encode_features(features: int) -> bytes:
    return features.to_bytes(4, "big")


def decode_features(payload: bytes) -> int:
    if len(payload) != 4:
        raise BillReplyError(f"FEATURE ENABLE payload of {len(payload)} bytes, need 4", payload)
    return int.from_bytes(payload, "big")


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BillEvent(DeviceEvent):
    """A bill that went somewhere. ``value`` in minor units = ``credit`` × scaling; both 0 when
    the validator's SETUP does not define ``bill_type`` (or SETUP is not known yet)."""

    bill_type: int
    value: int
    credit: int


@dataclass(frozen=True, slots=True)
class BillInEscrow(BillEvent):
    """A bill waits in the escrow position for ESCROW (stack or return)."""


@dataclass(frozen=True, slots=True)
class BillStacked(BillEvent):
    """A bill went into the cash box: the money is the machine's."""


@dataclass(frozen=True, slots=True)
class BillReturned(BillEvent):
    """A bill went back to the customer (after ESCROW return, or by the validator itself)."""


@dataclass(frozen=True, slots=True)
class BillRouted(BillEvent):
    """A recycler routing (to recycler, manual fill, manual dispense, recycler to cash box)."""

    route: BillRoute


class RejectReason(enum.Enum):
    UNRECOGNISED = "unrecognised"  # status 0x0B: detected but not identified
    TYPE_DISABLED = "type disabled"  # routing 100: a known type the VMC has not enabled


@dataclass(frozen=True, slots=True)
class BillRejected(DeviceEvent):
    """A bill went back because it was not identified, or its type is not enabled."""

    reason: RejectReason
    bill_type: int | None = None
    value: int = 0


@dataclass(frozen=True, slots=True)
class AttemptsWhileDisabled(DeviceEvent):
    """Bills offered while the validator was disabled (``010xxxxx``), since the last report."""

    count: int


@dataclass(frozen=True, slots=True)
class StatusCleared(DeviceEvent):
    """A standing condition (jam, cash box out, disabled, ...) is no longer reported."""

    code: int
    text: str
    fault: bool = False


def _status_event(device: str, code: int) -> StatusReported:
    return StatusReported(device, code, STATUS_TEXT[code], fault=code in FAULT_STATUSES)


def parse_poll_items(data: bytes, setup: BillSetup | None, device: str) -> list[DeviceEvent]:
    """Decode a POLL reply into events. Pure; never raises.

    Every bill validator item is one byte, so a byte that is none of them means the reply is
    not what we think it is: it is reported as a ``StatusReported`` "unknown item" and the rest
    of the reply is dropped (its layout is unknown).
    """
    events: list[DeviceEvent] = []
    for index, item in enumerate(data):
        if item & ROUTING_FLAG:
            route = BillRoute((item >> 4) & 0x07)
            bill_type = item & 0x0F
            credit = setup.credit_of(bill_type) if setup is not None else 0
            value = credit * setup.scaling if setup is not None else 0
            if route is BillRoute.ESCROW:
                events.append(BillInEscrow(device, bill_type, value, credit))
            elif route is BillRoute.STACKED:
                events.append(BillStacked(device, bill_type, value, credit))
            elif route is BillRoute.RETURNED:
                events.append(BillReturned(device, bill_type, value, credit))
            elif route is BillRoute.DISABLED_REJECTED:
                events.append(BillRejected(device, RejectReason.TYPE_DISABLED, bill_type, value))
            else:
                events.append(BillRouted(device, bill_type, value, credit, route))
        elif item & ATTEMPTS_MASK == ATTEMPTS_FLAG:
            events.append(AttemptsWhileDisabled(device, item & MAX_ATTEMPTS_COUNT))
        elif item == STATUS_JUST_RESET:
            events.append(JustReset(device))
        elif item == STATUS_BILL_REJECTED:
            events.append(BillRejected(device, RejectReason.UNRECOGNISED))
        elif item in STATUS_TEXT:
            events.append(_status_event(device, item))
        else:
            rest = data[index:]
            log.debug("%s: unknown POLL item 0x%02X in %s", device, item, data.hex(" "))
            events.append(
                StatusReported(device, item, f"unknown item 0x{item:02X} ({rest.hex(' ')})")
            )
            break
    return events


# --- the device ------------------------------------------------------------------------------


class EscrowOutcome(enum.Enum):
    """What became of the bill in escrow after ``BillValidator.escrow``."""

    STACKED = "stacked"
    RETURNED = "returned"
    INVALID_REQUEST = "invalid request"  # no bill was in escrow (0x0A)
    JAMMED = "jammed"  # jam on the way: neither stacked nor returned yet (0x05)
    BILL_REMOVED = "bill removed"  # the escrowed bill was pulled out (0x07)
    REFUSED = "refused"  # the validator NAKed ESCROW: it did not take the command
    UNKNOWN = "unknown"  # no outcome within the timeout (or the validator reset)


#: mdb.md "Timing" (verify): a bill validator counts as gone after 5 s without an answer.
BILL_NON_RESPONSE_S = 5.0
#: How long ``escrow`` waits for the routing item that confirms the outcome. Moving a bill from
#: escrow to the cash box takes 1–3 s on common validators (field observation, verify); twice
#: the non-response time leaves room for a slow stacker and a few lost POLLs.
ESCROW_OUTCOME_S = 10.0
#: ESCROW moves money: sent once, never retransmitted blindly; a lost reply is settled by the
#: routing item of a following POLL instead.
ESCROW_ATTEMPTS = 1


@dataclass(slots=True)
class BillDetails:
    """What start-up and later commands learned about the validator (typed; mirrored into
    ``info.details`` as plain values for logs and the status API)."""

    setup: BillSetup | None = None
    identity: BillIdentity | None = None
    features_enabled: int = 0
    stacker: StackerStatus | None = None
    conditions: frozenset[int] = field(default_factory=frozenset)


class BillValidator(MdbDevice):
    """The MDB bill validator, levels 1 and 2, as seen from the VMC.

    Start-up: SETUP, SECURITY, EXPANSION ID (level 1: 0x37 00; level 2: 0x37 02 and FEATURE
    ENABLE 0x37 01), STACKER; then BILL TYPE. When enabled, every accepted bill type is also
    escrowed, so a bill stops in escrow (``BillInEscrow``) and the vend cycle decides with
    ``escrow(stack)``. Standing statuses (jam, cash box out, ...) are reported once at onset
    (``StatusReported``) and once when they end (``StatusCleared``); while a fault stands the
    device is in ``DeviceState.FAULT``.
    """

    NAME: ClassVar[str] = "bill"
    ADDRESS: ClassVar[int] = BILL_ADDRESS
    POLL_CMD: ClassVar[int] = POLL.command
    POLL_REPLY: ClassVar[ReplyShape] = POLL.reply
    NON_RESPONSE_S: ClassVar[float] = BILL_NON_RESPONSE_S

    def __init__(
        self,
        master: MdbBus,
        *,
        poll_interval_s: float,
        on_event: EventSink,
        clock: Clock = time.monotonic,
        security_mask: int = 0,
        accepted_mask: int | None = None,
    ) -> None:
        super().__init__(master, poll_interval_s=poll_interval_s, on_event=on_event, clock=clock)
        self.security_mask = security_mask & 0xFFFF
        #: Bill types to accept when enabled; None: every type the validator defines.
        self.accepted_mask = None if accepted_mask is None else accepted_mask & 0xFFFF
        self.details = BillDetails()
        #: The bill now waiting in escrow, as last reported; None when there is none.
        self.escrowed: BillInEscrow | None = None
        self._bill_type_sent: BillTypeSetting | None = None
        self._escrow_waiter: asyncio.Future[EscrowOutcome] | None = None
        self._escrow_sent = False  # an ESCROW went out since the bill in escrow was reported

    # --- helpers ---------------------------------------------------------------------------

    async def _query(self, command: CommandDef, payload: bytes = b"") -> bytes:
        data = (await self.send(command, payload)).data
        if not data:
            raise BillReplyError(f"{command.name}: ACK where data was expected")
        return data

    @property
    def setup(self) -> BillSetup | None:
        return self.details.setup

    @property
    def level(self) -> int:
        """The level we talk at: the validator's, capped at the 2 this driver knows."""
        setup = self.details.setup
        return 0 if setup is None else min(setup.level, 2)

    def _publish_details(self) -> None:
        d = self.details
        out: dict[str, object] = {"security_mask": self.security_mask}
        if d.setup is not None:
            s = d.setup
            out.update(
                currency_code=s.currency_code,
                currency_numeric=s.currency_numeric,
                scaling=s.scaling,
                decimals=s.decimals,
                stacker_capacity=s.stacker_capacity,
                security_levels=s.security_levels,
                escrow_capable=s.escrow_capable,
                bill_credits=list(s.credits),
                bill_values=[s.value_of(t) for t in range(len(s.credits))],
            )
        if d.identity is not None:
            out.update(features=d.identity.features, features_enabled=d.features_enabled)
        if d.stacker is not None:
            out.update(stacker_full=d.stacker.full, stacker_count=d.stacker.count)
        self.info.details = out

    # --- MdbDevice -------------------------------------------------------------------------

    async def initialise(self) -> None:
        """SETUP, SECURITY, EXPANSION ID (+ FEATURE ENABLE at level 2), STACKER."""
        self.details = BillDetails()
        self.escrowed = None
        self._bill_type_sent = None
        setup = BillSetup.decode(await self._query(SETUP))
        self.details.setup = setup
        self.info.level = setup.level
        await self.send(SECURITY, encode_mask16(self.security_mask))
        if self.level >= 2:
            identity = BillIdentity.decode(await self._query(EXPANSION_ID_L2), with_features=True)
            wanted = (identity.features or 0) & SUPPORTED_FEATURES
            await self.send(FEATURE_ENABLE, encode_features(wanted))
            self.details.features_enabled = wanted
        else:
            identity = BillIdentity.decode(await self._query(EXPANSION_ID_L1), with_features=False)
        self.details.identity = identity
        self.info.manufacturer = identity.manufacturer
        self.info.serial = identity.serial
        self.info.model = identity.model
        self.info.version = identity.software_version
        await self.stacker()
        self._publish_details()

    def parse_poll(self, data: bytes) -> list[DeviceEvent]:
        return parse_poll_items(data, self.details.setup, self.NAME)

    async def apply_enable(self, enabled: bool) -> None:
        await self._send_bill_type(self._wanted_bill_types(enabled))

    def _wanted_bill_types(self, enabled: bool) -> BillTypeSetting:
        setup = self.details.setup
        if not enabled or setup is None:
            return BillTypeSetting(0, 0)
        known = setup.known_types_mask
        mask = known if self.accepted_mask is None else self.accepted_mask & known
        # Escrow every accepted bill: the vend cycle decides whether to stack it.
        return BillTypeSetting(mask, mask if setup.escrow_capable else 0)

    async def _send_bill_type(self, setting: BillTypeSetting) -> None:
        await self.send(BILL_TYPE, setting.encode())
        self._bill_type_sent = setting

    def handle_poll_reply(self, reply: Reply) -> list[DeviceEvent]:
        events = self.parse_poll(reply.data) if reply.data else []
        return self._digest(events)

    def needs_every_poll(self) -> bool:
        # A bare ACK clears the standing conditions (``_digest``).
        return bool(self.details.conditions)

    def _digest(self, events: Iterable[DeviceEvent]) -> list[DeviceEvent]:
        """Track standing conditions and the escrowed bill; settle a waiting ``escrow``."""
        out: list[DeviceEvent] = []
        standing: set[int] = set()
        previous = self.details.conditions
        for event in events:
            if isinstance(event, StatusReported) and event.code in CONDITION_STATUSES:
                standing.add(event.code)
                if event.code in previous:
                    continue  # still standing: reported at its onset
            if self._is_repeat(event):
                log.info(
                    "%s: escrow report repeated (bill already in escrow); not a new bill", self.NAME
                )
                continue
            out.append(event)
            self._track(event)
        for code in sorted(previous - standing):
            out.append(
                StatusCleared(self.NAME, code, STATUS_TEXT[code], fault=code in FAULT_STATUSES)
            )
        self.details.conditions = frozenset(standing)
        faults = standing & FAULT_STATUSES
        if faults and self.state is DeviceState.READY:
            self._set_state(DeviceState.FAULT, ", ".join(STATUS_TEXT[c] for c in sorted(faults)))
        elif not faults and self.state is DeviceState.FAULT:
            self._set_state(DeviceState.READY, "faults cleared")
        return out

    def _is_repeat(self, event: DeviceEvent) -> bool:
        """A device fact proves a repeat (mdb.md "Wire"): a validator holds one bill in escrow,
        so "bill in escrow" again, for the same type, with no ESCROW sent since, is the
        validator sending its report again after missing our ACK, not a second bill."""
        return (
            isinstance(event, BillInEscrow)
            and self.escrowed is not None
            and self.escrowed.bill_type == event.bill_type
            and not self._escrow_sent
        )

    def _track(self, event: DeviceEvent) -> None:
        outcome: EscrowOutcome | None = None
        if isinstance(event, BillInEscrow):
            self.escrowed = event
            self._escrow_sent = False
        elif isinstance(event, BillStacked):
            outcome = EscrowOutcome.STACKED
        elif isinstance(event, BillReturned):
            outcome = EscrowOutcome.RETURNED
        elif isinstance(event, JustReset):
            outcome = EscrowOutcome.UNKNOWN
        elif isinstance(event, StatusReported):
            if event.code == STATUS_INVALID_ESCROW:
                outcome = EscrowOutcome.INVALID_REQUEST
            elif event.code == STATUS_JAMMED:
                outcome = EscrowOutcome.JAMMED
            elif event.code == STATUS_BILL_REMOVED:
                outcome = EscrowOutcome.BILL_REMOVED
        if outcome is None:
            return
        # Whatever the outcome, no bill waits in escrow any more (a jammed one is in transport).
        self.escrowed = None
        waiter = self._escrow_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    # --- commands for the vend cycle -------------------------------------------------------

    async def escrow(self, stack: bool, *, timeout_s: float = ESCROW_OUTCOME_S) -> EscrowOutcome:
        """Stack (True) or return (False) the bill in escrow, and say what became of it.

        ESCROW is sent once (it moves money); the outcome is the routing item of a following
        POLL, so the supervisor loop (``run``) must be polling. If ESCROW got no answer the
        outcome still tells whether the validator took it; ``UNKNOWN`` means nothing came
        within ``timeout_s``. Calling ``escrow`` again is safe: a validator holds one bill in
        escrow, and one with none answers ``INVALID_REQUEST``.
        """
        if self._escrow_waiter is not None:
            raise EscrowInProgress("an ESCROW is already waiting for its outcome")
        waiter: asyncio.Future[EscrowOutcome] = asyncio.get_running_loop().create_future()
        self._escrow_waiter = waiter  # registered before sending: no outcome can slip past
        self._escrow_sent = True
        try:
            try:
                await self.send(ESCROW, encode_escrow(stack), max_attempts=ESCROW_ATTEMPTS)
            except NakReceived:
                log.warning("%s: ESCROW %s refused (NAK)", self.NAME, "stack" if stack else "ret")
                return EscrowOutcome.REFUSED
            except NoResponse as exc:
                # It may have been taken with its ACK lost: the POLL routing item will say.
                log.warning("%s: ESCROW unanswered (%s); waiting for POLL to tell", self.NAME, exc)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel that
                # arrives just as the awaited future completes.
                async with asyncio.timeout(timeout_s):
                    return await waiter
            except TimeoutError:
                log.warning("%s: no outcome %.1f s after ESCROW", self.NAME, timeout_s)
                return EscrowOutcome.UNKNOWN
        finally:
            self._escrow_waiter = None
            if not waiter.done():
                waiter.cancel()

    async def stacker(self) -> StackerStatus:
        """STACKER: is the stacker full, and how many bills it holds."""
        status = StackerStatus.decode(await self._query(STACKER))
        self.details.stacker = status
        self._publish_details()
        return status

    async def set_accepted(self, mask: int) -> None:
        """Accept only these bill types (bit n = type n). Applied at once when enabled."""
        self.accepted_mask = mask & 0xFFFF
        if self._bill_type_sent is not None and self._bill_type_sent.enable_mask:
            await self._send_bill_type(self._wanted_bill_types(True))

    @property
    def conditions(self) -> frozenset[int]:
        """Status codes standing as of the last POLL (jam, cash box out, disabled, ...)."""
        return self.details.conditions
