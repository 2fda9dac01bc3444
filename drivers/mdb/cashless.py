"""MDB cashless reader (address 0x10; reader #2 at 0x60), levels 1-3.

Three layers, as for every MDB device here:

* **Tables**: the reader's commands as ``CommandDef`` data, one table for the standard money
  format and one for "expanded currency mode" (32-bit money / multi-currency), whose requests
  carry longer price fields.
* **Codecs**: pure functions and frozen dataclasses for every request payload and every POLL
  item. The simulator (``hil/sim/cashless.py``) encodes with the same functions the VMC decodes
  with, so each byte has one definition. Money on the wire is in scaled units; events carry
  both the raw value and integer minor units (raw × scaling factor).
* **Device**: ``CashlessReader`` brings the reader up (SETUP config, max/min prices, EXPANSION
  REQUEST ID, OPTIONAL FEATURE ENABLE at level 3, READER ENABLE) and offers the session commands
  the vend cycle calls (``vend_request``, ``vend_success`` ...). Outcomes (VEND APPROVED/DENIED,
  END SESSION ...) arrive as events from POLL; the device tracks the session phase so it can
  tolerate readers that repeat BEGIN SESSION or end a session on their own.

Facts: ../shared/reference/mdb.md "Cashless"; MDB/ICP 4.2 §7. Field layouts marked (verify) come
from a single secondary source.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from drivers.errors import MdbError, NakReceived
from drivers.mdb.commands import ACK_ONLY, CommandDef, CommandTable
from drivers.mdb.device import (
    Clock,
    DeviceEvent,
    DeviceState,
    EventSink,
    JustReset,
    MdbDevice,
    StatusReported,
)
from drivers.mdb.master import MdbBus

log = logging.getLogger("drivers.mdb.cashless")

CASHLESS1_ADDRESS = 0x10
CASHLESS2_ADDRESS = 0x60

#: Non-response time until the reader tells us its own: 5 s for a cashless device (device
#: brief; mdb.md "Timing"), then SETUP config's "maximum response time" replaces it.
DEFAULT_NON_RESPONSE_S = 5.0
#: How long start-up polls for a SETUP / EXPANSION ID answer that a reader gave as a lone ACK
#: and reports in a later POLL (some readers never answer inline). Bounded by the default
#: non-response time: a reader silent for longer counts as gone anyway.
DEFERRED_REPLY_WAIT_S = DEFAULT_NON_RESPONSE_S

# --- command offsets (MDB 4.2 §7, cashless) --------------------------------------------------

CMD_RESET = 0x00
CMD_SETUP = 0x01
CMD_POLL = 0x02
CMD_VEND = 0x03
CMD_READER = 0x04
CMD_REVALUE = 0x05
CMD_EXPANSION = 0x07

#: Largest raw money value per format; all ones means "not known" (max price, funds).
MONEY16_MAX = 0xFFFF
MONEY32_MAX = 0xFFFF_FFFF
ITEM_MAX = 0xFFFF


class Cmd:
    """Every cashless command the VMC sends, as data. ``*_X`` are the expanded-currency forms."""

    RESET = CommandDef("RESET", CMD_RESET, reply=ACK_ONLY)
    # Y1=00, Y2 VMC feature level, Y3 display columns, Y4 display rows, Y5 display info.
    SETUP_CONFIG = CommandDef("SETUP CONFIG DATA", CMD_SETUP, 0x00, 5)
    # Y1=01, max price (2), min price (2); expanded: max (4), min (4), currency code (2).
    SETUP_PRICES = CommandDef("SETUP MAX/MIN PRICES", CMD_SETUP, 0x01, 5)
    SETUP_PRICES_X = CommandDef("SETUP MAX/MIN PRICES", CMD_SETUP, 0x01, 11)
    POLL = CommandDef("POLL", CMD_POLL)
    # Y1=00, item price (2), item number (2); expanded: price (4), item (2).
    VEND_REQUEST = CommandDef("VEND REQUEST", CMD_VEND, 0x00, 5)
    VEND_REQUEST_X = CommandDef("VEND REQUEST", CMD_VEND, 0x00, 7)
    VEND_CANCEL = CommandDef("VEND CANCEL", CMD_VEND, 0x01, 1)
    VEND_SUCCESS = CommandDef("VEND SUCCESS", CMD_VEND, 0x02, 3)
    VEND_FAILURE = CommandDef("VEND FAILURE", CMD_VEND, 0x03, 1)
    SESSION_COMPLETE = CommandDef("SESSION COMPLETE", CMD_VEND, 0x04, 1)
    # Y1=05, price (2), item (2); expanded: price (4), item (2), currency code (2).
    CASH_SALE = CommandDef("CASH SALE", CMD_VEND, 0x05, 5)
    CASH_SALE_X = CommandDef("CASH SALE", CMD_VEND, 0x05, 9)
    NEGATIVE_VEND = CommandDef("NEGATIVE VEND REQUEST", CMD_VEND, 0x06, 5)
    NEGATIVE_VEND_X = CommandDef("NEGATIVE VEND REQUEST", CMD_VEND, 0x06, 7)
    READER_DISABLE = CommandDef("READER DISABLE", CMD_READER, 0x00, 1)
    READER_ENABLE = CommandDef("READER ENABLE", CMD_READER, 0x01, 1)
    READER_CANCEL = CommandDef("READER CANCEL", CMD_READER, 0x02, 1)
    # Y1=03, Y2-Y9 data entered by the customer (level 3 data entry).
    DATA_ENTRY_RESPONSE = CommandDef("DATA ENTRY RESPONSE", CMD_READER, 0x03, 9)
    REVALUE_REQUEST = CommandDef("REVALUE REQUEST", CMD_REVALUE, 0x00, 3)
    REVALUE_REQUEST_X = CommandDef("REVALUE REQUEST", CMD_REVALUE, 0x00, 5)
    REVALUE_LIMIT_REQUEST = CommandDef("REVALUE LIMIT REQUEST", CMD_REVALUE, 0x01, 1)
    # Y1=00, VMC manufacturer (3), serial (12), model (12), software version (2, BCD).
    EXPANSION_REQUEST_ID = CommandDef("EXPANSION REQUEST ID", CMD_EXPANSION, 0x00, 30)
    # Y1=03, Y2-Y11 time/date (verify: layout not decoded here, the bytes pass through).
    EXPANSION_WRITE_TIME_DATE = CommandDef("EXPANSION WRITE TIME/DATE", CMD_EXPANSION, 0x03, 11)
    # Y1=04, Y2-Y5 optional feature bits the VMC enables (level 3).
    EXPANSION_FEATURE_ENABLE = CommandDef(
        "EXPANSION OPTIONAL FEATURE ENABLE", CMD_EXPANSION, 0x04, 5
    )


_COMMON_COMMANDS = (
    Cmd.RESET,
    Cmd.SETUP_CONFIG,
    Cmd.POLL,
    Cmd.VEND_CANCEL,
    Cmd.VEND_SUCCESS,
    Cmd.VEND_FAILURE,
    Cmd.SESSION_COMPLETE,
    Cmd.READER_DISABLE,
    Cmd.READER_ENABLE,
    Cmd.READER_CANCEL,
    Cmd.DATA_ENTRY_RESPONSE,
    Cmd.REVALUE_LIMIT_REQUEST,
    Cmd.EXPANSION_REQUEST_ID,
    Cmd.EXPANSION_WRITE_TIME_DATE,
    Cmd.EXPANSION_FEATURE_ENABLE,
)
STANDARD_COMMANDS = (
    *_COMMON_COMMANDS,
    Cmd.SETUP_PRICES,
    Cmd.VEND_REQUEST,
    Cmd.CASH_SALE,
    Cmd.NEGATIVE_VEND,
    Cmd.REVALUE_REQUEST,
)
EXPANDED_COMMANDS = (
    *_COMMON_COMMANDS,
    Cmd.SETUP_PRICES_X,
    Cmd.VEND_REQUEST_X,
    Cmd.CASH_SALE_X,
    Cmd.NEGATIVE_VEND_X,
    Cmd.REVALUE_REQUEST_X,
)


def command_table(address: int = CASHLESS1_ADDRESS, *, expanded: bool = False) -> CommandTable:
    """The reader's commands at ``address``, in the standard or expanded-currency format."""
    return CommandTable(address, EXPANDED_COMMANDS if expanded else STANDARD_COMMANDS)


# --- codes and bits -------------------------------------------------------------------------


class PollCode(enum.IntEnum):
    """First byte of each POLL item (mdb.md "Cashless"; MDB 4.2 §7)."""

    JUST_RESET = 0x00
    READER_CONFIG = 0x01
    DISPLAY_REQUEST = 0x02
    BEGIN_SESSION = 0x03
    SESSION_CANCEL_REQUEST = 0x04
    VEND_APPROVED = 0x05
    VEND_DENIED = 0x06
    END_SESSION = 0x07
    CANCELLED = 0x08
    PERIPHERAL_ID = 0x09
    MALFUNCTION = 0x0A
    OUT_OF_SEQUENCE = 0x0B
    REVALUE_APPROVED = 0x0D
    REVALUE_DENIED = 0x0E
    REVALUE_LIMIT = 0x0F
    USER_FILE_DATA = 0x10
    TIME_DATE_REQUEST = 0x11
    DATA_ENTRY_REQUEST = 0x12
    DATA_ENTRY_CANCEL = 0x13
    # File transport layer (0x1B-0x1F) and diagnostics (0xFF). Note: the project brief names
    # 0x1B "diagnostics response"; the public sources give 0x1B = FTL REQ TO RCV and 0xFF =
    # DIAGNOSTICS RESPONSE, which is what is decoded here.
    FTL_REQ_TO_RCV = 0x1B
    FTL_RETRY_DENY = 0x1C
    FTL_SEND_BLOCK = 0x1D
    FTL_OK_TO_SEND = 0x1E
    FTL_REQ_TO_SEND = 0x1F
    DIAGNOSTICS = 0xFF


class ReaderOption(enum.IntFlag):
    """SETUP config reply, Z8 "miscellaneous options"."""

    REFUNDS = 0x01  # the reader can restore funds to the payment media
    MULTIVEND = 0x02  # more than one vend per session (verify)
    DISPLAY = 0x04  # the reader has its own display
    CASH_SALE = 0x08  # the reader takes VEND/CASH SALE


class Feature(enum.IntFlag):
    """Level-3 optional feature bits (PERIPHERAL ID Z31-Z34, OPTIONAL FEATURE ENABLE Y2-Y5)."""

    FTL = 0x01
    MONEY_32BIT = 0x02
    MULTI_CURRENCY = 0x04
    NEGATIVE_VEND = 0x08
    DATA_ENTRY = 0x10
    ALWAYS_IDLE = 0x20


#: Features that switch the reader into expanded currency mode (longer money fields).
EXPANDED_FEATURES = Feature.MONEY_32BIT | Feature.MULTI_CURRENCY
#: What this VMC implements and may enable when the reader offers it.
SUPPORTED_FEATURES = Feature.MONEY_32BIT | Feature.NEGATIVE_VEND | Feature.ALWAYS_IDLE


class ReaderStatus(enum.IntEnum):
    """COMMAND OUT OF SEQUENCE Z2 at level 2+: the reader's state (verify)."""

    INACTIVE = 0x01
    DISABLED = 0x02
    ENABLED = 0x03


#: MALFUNCTION Z2 upper nibble -> kind (MDB 4.2 §7, verify). The lower nibble is a
#: manufacturer sub-code.
MALFUNCTION_KINDS: dict[int, str] = {
    0x0: "payment media error",
    0x1: "invalid payment media",
    0x2: "tamper error",
    0x3: "manufacturer defined error 1",
    0x4: "communications error 2",
    0x5: "reader requires service",
    0x6: "unassigned",
    0x7: "manufacturer defined error 2",
    0x8: "reader failure",
    0x9: "communications error 3",
    0xA: "payment media jammed",
    0xB: "manufacturer defined error 3",
    0xC: "refund error",
}
#: Malfunction kinds after which the reader cannot take payments without service.
FATAL_MALFUNCTIONS = frozenset({0x5, 0x8, 0x9, 0xA})


class CashlessError(MdbError):
    """Root of the cashless reader's own errors."""


class InvalidSettings(CashlessError):
    """A setting or argument out of range (names the field)."""


class PriceNotRepresentable(CashlessError):
    """A money amount that is no whole multiple of the scaling factor, or too large."""


class SessionStateError(CashlessError):
    """A session command asked for in a session phase where the reader would refuse it."""


class ReaderResetDuringStartUp(CashlessError):
    """JUST RESET arrived while the reader was being set up: start again."""


# --- small codec helpers --------------------------------------------------------------------


def _u(data: bytes) -> int:
    return int.from_bytes(data, "big")


def _be(value: int, width: int, name: str) -> bytes:
    if not 0 <= value < (1 << (8 * width)):
        raise InvalidSettings(f"{name}={value} does not fit {width} bytes")
    return value.to_bytes(width, "big")


def _ascii_field(text: str, width: int, name: str) -> bytes:
    if not text.isascii():
        raise InvalidSettings(f"{name}={text!r} is not ASCII")
    raw = text.encode("ascii")
    if len(raw) > width:
        raise InvalidSettings(f"{name}={text!r} longer than {width} characters")
    return raw.ljust(width, b" ")


def _ascii_text(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").rstrip(" \x00")


def bcd_value(raw: int, digits: int = 4) -> int | None:
    """A packed-BCD number, or None when a nibble is not a decimal digit."""
    value = 0
    for shift in range(4 * (digits - 1), -4, -4):
        nibble = (raw >> shift) & 0xF
        if nibble > 9:
            return None
        value = value * 10 + nibble
    return value


def to_bcd(value: int, digits: int = 4) -> int:
    if not 0 <= value < 10**digits:
        raise InvalidSettings(f"{value} does not fit {digits} BCD digits")
    out = 0
    for i, ch in enumerate(reversed(str(value))):
        out |= int(ch) << (4 * i)
    return out


def iso4217_of(currency_code: int) -> int | None:
    """ISO 4217 numeric code from an MDB currency code (0x1978 -> 978), None for a country
    code (leading BCD digit 0) or bad BCD (mdb.md "Money", verify)."""
    digits = bcd_value(currency_code)
    if digits is None or currency_code >> 12 != 1:
        return None
    return digits - 1000


@dataclass(frozen=True, slots=True)
class WireFormat:
    """What decides field lengths: the level both sides agreed on, the money format, the scaling
    factor (for minor units) and the VMC display size (DISPLAY REQUEST length)."""

    level: int = 1  # min(VMC level, reader level)
    expanded: bool = False  # expanded currency mode: 4-byte money, currency codes
    scaling: int = 1
    display_size: int = 0  # VMC display columns × rows

    @property
    def money_bytes(self) -> int:
        return 4 if self.expanded else 2

    @property
    def money_unknown(self) -> int:
        return MONEY32_MAX if self.expanded else MONEY16_MAX

    def money(self, raw: int) -> int | None:
        """Minor units of a raw money field; None when the field says "not known" (all ones)."""
        return None if raw == self.money_unknown else raw * self.scaling

    def scaled(self, minor: int, what: str = "amount") -> int:
        """Raw (scaled) units of ``minor``; it must be a whole multiple that fits the field."""
        if minor < 0 or minor % self.scaling:
            raise PriceNotRepresentable(f"{what} {minor} is not a multiple of {self.scaling}")
        raw = minor // self.scaling
        if raw >= self.money_unknown:
            raise PriceNotRepresentable(f"{what} {minor} too large for {self.money_bytes} bytes")
        return raw


# --- request payloads (what the VMC sends; the simulator decodes them) --------------------------


@dataclass(frozen=True, slots=True)
class VmcSetup:
    """SETUP config data payload (after Y1=00)."""

    level: int
    columns: int = 0
    rows: int = 0
    display_info: int = 0

    def encode(self) -> bytes:
        return bytes((self.level, self.columns, self.rows, self.display_info))

    @classmethod
    def decode(cls, payload: bytes) -> VmcSetup:
        return cls(payload[0], payload[1], payload[2], payload[3])


@dataclass(frozen=True, slots=True)
class PriceLimits:
    """SETUP max/min prices payload (after Y1=01), raw scaled units."""

    max_price: int
    min_price: int
    currency_code: int | None = None  # expanded format only

    def encode(self, expanded: bool) -> bytes:
        width = 4 if expanded else 2
        out = _be(self.max_price, width, "max_price") + _be(self.min_price, width, "min_price")
        if expanded:
            out += _be(self.currency_code or 0, 2, "currency_code")
        return out

    @classmethod
    def decode(cls, payload: bytes, expanded: bool) -> PriceLimits:
        if expanded:
            return cls(_u(payload[0:4]), _u(payload[4:8]), _u(payload[8:10]))
        return cls(_u(payload[0:2]), _u(payload[2:4]))


@dataclass(frozen=True, slots=True)
class ItemPrice:
    """VEND REQUEST / NEGATIVE VEND REQUEST / CASH SALE payload (after Y1), raw scaled price.
    ``currency_code`` travels with CASH SALE in expanded format only."""

    price: int
    item: int
    currency_code: int | None = None

    def encode(self, expanded: bool, with_currency: bool = False) -> bytes:
        out = _be(self.price, 4 if expanded else 2, "price") + _be(self.item, 2, "item")
        if expanded and with_currency:
            out += _be(self.currency_code or 0, 2, "currency_code")
        return out

    @classmethod
    def decode(cls, payload: bytes, expanded: bool, with_currency: bool = False) -> ItemPrice:
        width = 4 if expanded else 2
        currency = _u(payload[width + 2 : width + 4]) if expanded and with_currency else None
        return cls(_u(payload[:width]), _u(payload[width : width + 2]), currency)


def encode_amount(raw: int, expanded: bool) -> bytes:
    """REVALUE REQUEST payload (after Y1=00)."""
    return _be(raw, 4 if expanded else 2, "amount")


def decode_amount(payload: bytes) -> int:
    return _u(payload)


@dataclass(frozen=True, slots=True)
class Identity:
    """Manufacturer code, serial, model, software version: the VMC's (EXPANSION REQUEST ID)
    or the reader's (PERIPHERAL ID, which at level 3 adds ``features``)."""

    manufacturer: str = ""
    serial: str = ""
    model: str = ""
    version_bcd: int = 0  # two bytes of packed BCD, e.g. 0x0102 for "01.02"
    features: Feature | None = None

    @property
    def version(self) -> int:
        """The version as a decimal number when it is valid BCD (0x0102 -> 102), else raw."""
        value = bcd_value(self.version_bcd)
        return self.version_bcd if value is None else value

    def encode(self) -> bytes:
        out = (
            _ascii_field(self.manufacturer, 3, "manufacturer")
            + _ascii_field(self.serial, 12, "serial")
            + _ascii_field(self.model, 12, "model")
            + _be(self.version_bcd, 2, "version_bcd")
        )
        if self.features is not None:
            out += _be(int(self.features), 4, "features")
        return out

    @classmethod
    def decode(cls, payload: bytes) -> Identity:
        features = Feature(_u(payload[29:33])) if len(payload) >= 33 else None
        return cls(
            _ascii_text(payload[0:3]),
            _ascii_text(payload[3:15]),
            _ascii_text(payload[15:27]),
            _u(payload[27:29]),
            features,
        )


def encode_features(features: Feature) -> bytes:
    """OPTIONAL FEATURE ENABLE payload (after Y1=04)."""
    return _be(int(features), 4, "features")


def decode_features(payload: bytes) -> Feature:
    return Feature(_u(payload[:4]))


# --- POLL items (the simulator encodes them; the VMC decodes them) ----------------------------


@dataclass(frozen=True, slots=True)
class ReaderConfig:
    """SETUP config reply / POLL 01 "reader config data"."""

    level: int
    currency_code: int  # BCD, e.g. 0x1978
    scaling: int
    decimals: int
    max_response_s: int  # the reader's non-response time
    options: ReaderOption

    @property
    def iso4217(self) -> int | None:
        return iso4217_of(self.currency_code)

    def encode(self) -> bytes:
        return bytes((PollCode.READER_CONFIG, self.level)) + bytes(
            (
                *_be(self.currency_code, 2, "currency_code"),
                self.scaling,
                self.decimals,
                self.max_response_s,
                int(self.options),
            )
        )

    @classmethod
    def decode(cls, item: bytes) -> ReaderConfig:
        return cls(item[1], _u(item[2:4]), item[4], item[5], item[6], ReaderOption(item[7]))


@dataclass(frozen=True, slots=True)
class SessionMedia:
    """The level-2/3 fields of BEGIN SESSION (raw), and the expanded-mode additions."""

    media_id: int = 0xFFFF_FFFF  # all ones: no id
    payment_type: int = 0
    payment_data: int = 0
    language: bytes = b"\x00\x00"  # expanded only: two ASCII letters
    currency_code: int = 0  # expanded only
    card_options: int = 0  # expanded only


def encode_begin_session(fmt: WireFormat, funds_raw: int, media: SessionMedia) -> bytes:
    """BEGIN SESSION: funds; level 2+: media id, payment type, payment data; expanded: funds
    in 4 bytes plus language, currency, card options."""
    out = bytes((PollCode.BEGIN_SESSION,)) + _be(funds_raw, fmt.money_bytes, "funds")
    if fmt.level >= 2 or fmt.expanded:
        out += _be(media.media_id, 4, "media_id") + bytes((media.payment_type,))
        out += _be(media.payment_data, 2, "payment_data")
    if fmt.expanded:
        if len(media.language) != 2:
            raise InvalidSettings("language must be 2 bytes")
        out += media.language + _be(media.currency_code, 2, "currency_code")
        out += bytes((media.card_options,))
    return out


def encode_money_item(code: PollCode, fmt: WireFormat, raw: int) -> bytes:
    """VEND APPROVED (05) or REVALUE LIMIT AMOUNT (0F): code + amount."""
    return bytes((code,)) + _be(raw, fmt.money_bytes, "amount")


def encode_display_request(duration_tenths: int, text: bytes) -> bytes:
    return bytes((PollCode.DISPLAY_REQUEST, duration_tenths)) + text


def encode_peripheral_id(identity: Identity) -> bytes:
    return bytes((PollCode.PERIPHERAL_ID,)) + identity.encode()


def encode_malfunction(code: int) -> bytes:
    return bytes((PollCode.MALFUNCTION, code))


def encode_out_of_sequence(fmt: WireFormat, status: ReaderStatus) -> bytes:
    if fmt.level >= 2:
        return bytes((PollCode.OUT_OF_SEQUENCE, status))
    return bytes((PollCode.OUT_OF_SEQUENCE,))


def encode_user_file(file_id: int, data: bytes) -> bytes:
    return bytes((PollCode.USER_FILE_DATA, file_id, len(data))) + data


def encode_data_entry_request(length: int, repeat: bool) -> bytes:
    return bytes((PollCode.DATA_ENTRY_REQUEST, (length & 0x7F) | (0x80 if repeat else 0)))


def item(code: PollCode) -> bytes:
    """A one-byte POLL item (END SESSION, VEND DENIED, ...)."""
    return bytes((code,))


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReaderConfigReported(DeviceEvent):
    config: ReaderConfig


@dataclass(frozen=True, slots=True)
class DisplayRequest(DeviceEvent):
    """The reader asks the VMC to show ``text`` for ``duration_s``."""

    duration_s: float
    text: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class BeginSession(DeviceEvent):
    """A customer presented payment media. ``funds`` in minor units, None when not known.
    ``repeated``: a BEGIN SESSION while a session was already open (some readers send it
    again); the session goes on with the new funds."""

    funds: int | None
    funds_raw: int
    media_id: int | None = None
    payment_type: int | None = None
    payment_data: int | None = None
    language: str | None = None
    user_currency: int | None = None
    card_options: int | None = None
    repeated: bool = False


@dataclass(frozen=True, slots=True)
class SessionCancelRequest(DeviceEvent):
    """The customer cancelled: the VMC ends the session with SESSION COMPLETE."""


@dataclass(frozen=True, slots=True)
class VendApproved(DeviceEvent):
    """The reader approved the vend; ``amount`` (minor units) will be charged on VEND SUCCESS.
    None when the reader reports all ones (amount not known)."""

    amount: int | None
    amount_raw: int


@dataclass(frozen=True, slots=True)
class VendDenied(DeviceEvent):
    """The reader refused the vend (or confirms a VEND CANCEL)."""


@dataclass(frozen=True, slots=True)
class EndSession(DeviceEvent):
    """The reader closed the session; it is back to enabled."""


@dataclass(frozen=True, slots=True)
class ReaderCancelled(DeviceEvent):
    """Answer to READER CANCEL."""


@dataclass(frozen=True, slots=True)
class PeripheralId(DeviceEvent):
    identity: Identity


@dataclass(frozen=True, slots=True)
class ReaderMalfunction(DeviceEvent):
    code: int

    @property
    def kind(self) -> str:
        return MALFUNCTION_KINDS.get(self.code >> 4, "unassigned")

    @property
    def fatal(self) -> bool:
        return (self.code >> 4) in FATAL_MALFUNCTIONS


@dataclass(frozen=True, slots=True)
class CommandOutOfSequence(DeviceEvent):
    """The reader refused a command in its present state. ``status`` at level 2+ (raw)."""

    status: int | None = None


@dataclass(frozen=True, slots=True)
class RevalueApproved(DeviceEvent):
    pass


@dataclass(frozen=True, slots=True)
class RevalueDenied(DeviceEvent):
    pass


@dataclass(frozen=True, slots=True)
class RevalueLimit(DeviceEvent):
    amount: int | None
    amount_raw: int


@dataclass(frozen=True, slots=True)
class UserFileData(DeviceEvent):
    file_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TimeDateRequest(DeviceEvent):
    pass


@dataclass(frozen=True, slots=True)
class DataEntryRequest(DeviceEvent):
    """Level 3 data entry: ``length`` characters wanted; ``repeat`` asks for them twice
    (Z2 = repeat bit 7, length bits 0-6; verify)."""

    length: int
    repeat: bool
    raw: int


@dataclass(frozen=True, slots=True)
class DataEntryCancel(DeviceEvent):
    pass


@dataclass(frozen=True, slots=True)
class FtlMessage(DeviceEvent):
    """A file-transport-layer item (0x1B-0x1F). We never enable FTL; reported, not acted on.
    Its length is not decoded: it takes the rest of the reply."""

    code: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DiagnosticsResponse(DeviceEvent):
    data: bytes


# --- POLL decoding --------------------------------------------------------------------------


class _Truncated(Exception):
    """Internal: an item shorter than its code demands."""


_Decoded = tuple[DeviceEvent, int]
_DecodeItem = Callable[[str, bytes, WireFormat], _Decoded]


def _need(rest: bytes, length: int) -> bytes:
    if len(rest) < length:
        raise _Truncated
    return rest[:length]


def _pick_length(rest: bytes, normal: int, shorter: tuple[int, ...]) -> int:
    """Readers differ in the field: when the reply is too short for the negotiated form of an
    item but holds exactly a shorter known form (a level-1 item from a level-2 reader), read
    that. Never the other way round: a longer form would swallow the items that follow."""
    if len(rest) < normal and len(rest) in shorter:
        return len(rest)
    return normal


def _one_byte(cls: type[DeviceEvent]) -> _DecodeItem:
    def decode(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
        return cls(device), 1

    return decode


def _dec_config(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
    return ReaderConfigReported(device, ReaderConfig.decode(_need(rest, 8))), 8


def _dec_display(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
    # Its data is as long as the VMC's display (columns × rows); unknown size: the rest.
    length = 2 + fmt.display_size if fmt.display_size else len(rest)
    body = _need(rest, max(length, 2))
    text = body[2:]
    return DisplayRequest(device, body[1] / 10, text.decode("latin-1"), text), len(body)


def _dec_begin_session(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
    # Level 1: 3 bytes; level 2/3: 10; expanded (4-byte funds and more): 17.
    normal = 17 if fmt.expanded else (10 if fmt.level >= 2 else 3)
    length = _pick_length(rest, normal, (3, 10))
    body = _need(rest, length)
    wide = length == 17
    money = 4 if wide else 2
    funds_raw = _u(body[1 : 1 + money])
    unknown = MONEY32_MAX if wide else MONEY16_MAX
    funds = None if funds_raw == unknown else funds_raw * fmt.scaling
    if length == 3:
        return BeginSession(device, funds, funds_raw), 3
    extra = body[1 + money :]
    event = BeginSession(
        device,
        funds,
        funds_raw,
        media_id=_u(extra[0:4]),
        payment_type=extra[4],
        payment_data=_u(extra[5:7]),
    )
    if wide:
        event = dataclasses.replace(
            event,
            language=extra[7:9].decode("latin-1"),
            user_currency=_u(extra[9:11]),
            card_options=extra[11],
        )
    return event, length


def _dec_money_item(cls: type[VendApproved] | type[RevalueLimit]) -> _DecodeItem:
    def decode(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
        length = 1 + fmt.money_bytes
        raw = _u(_need(rest, length)[1:])
        return cls(device, fmt.money(raw), raw), length

    return decode


def _dec_peripheral_id(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
    length = _pick_length(rest, 34 if fmt.level >= 3 else 30, (30,))
    return PeripheralId(device, Identity.decode(_need(rest, length)[1:])), length


def _dec_malfunction(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
    return ReaderMalfunction(device, _need(rest, 2)[1]), 2


def _dec_out_of_sequence(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
    length = _pick_length(rest, 2 if fmt.level >= 2 else 1, (1,))
    if length == 2:
        return CommandOutOfSequence(device, rest[1]), 2
    return CommandOutOfSequence(device), 1


def _dec_user_file(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
    head = _need(rest, 3)
    length = 3 + head[2]
    return UserFileData(device, head[1], _need(rest, length)[3:]), length


def _dec_data_entry(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
    raw = _need(rest, 2)[1]
    return DataEntryRequest(device, raw & 0x7F, bool(raw & 0x80), raw), 2


def _dec_ftl(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
    return FtlMessage(device, rest[0], rest[1:]), len(rest)


def _dec_diagnostics(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
    return DiagnosticsResponse(device, rest[1:]), len(rest)


def _dec_just_reset(device: str, rest: bytes, fmt: WireFormat) -> _Decoded:
    return JustReset(device), 1


_DECODERS: dict[int, _DecodeItem] = {
    PollCode.JUST_RESET: _dec_just_reset,
    PollCode.READER_CONFIG: _dec_config,
    PollCode.DISPLAY_REQUEST: _dec_display,
    PollCode.BEGIN_SESSION: _dec_begin_session,
    PollCode.SESSION_CANCEL_REQUEST: _one_byte(SessionCancelRequest),
    PollCode.VEND_APPROVED: _dec_money_item(VendApproved),
    PollCode.VEND_DENIED: _one_byte(VendDenied),
    PollCode.END_SESSION: _one_byte(EndSession),
    PollCode.CANCELLED: _one_byte(ReaderCancelled),
    PollCode.PERIPHERAL_ID: _dec_peripheral_id,
    PollCode.MALFUNCTION: _dec_malfunction,
    PollCode.OUT_OF_SEQUENCE: _dec_out_of_sequence,
    PollCode.REVALUE_APPROVED: _one_byte(RevalueApproved),
    PollCode.REVALUE_DENIED: _one_byte(RevalueDenied),
    PollCode.REVALUE_LIMIT: _dec_money_item(RevalueLimit),
    PollCode.USER_FILE_DATA: _dec_user_file,
    PollCode.TIME_DATE_REQUEST: _one_byte(TimeDateRequest),
    PollCode.DATA_ENTRY_REQUEST: _dec_data_entry,
    PollCode.DATA_ENTRY_CANCEL: _one_byte(DataEntryCancel),
    PollCode.FTL_REQ_TO_RCV: _dec_ftl,
    PollCode.FTL_RETRY_DENY: _dec_ftl,
    PollCode.FTL_SEND_BLOCK: _dec_ftl,
    PollCode.FTL_OK_TO_SEND: _dec_ftl,
    PollCode.FTL_REQ_TO_SEND: _dec_ftl,
    PollCode.DIAGNOSTICS: _dec_diagnostics,
}


def decode_poll(data: bytes, fmt: WireFormat, device: str = "cashless") -> list[DeviceEvent]:
    """Decode a POLL reply (or the data reply to any command) into events.

    Never raises: an unknown code or an item cut short becomes a ``StatusReported`` (not a
    fault) and ends parsing, since the length of what follows is then unknown.
    """
    events: list[DeviceEvent] = []
    pos = 0
    while pos < len(data):
        code = data[pos]
        decoder = _DECODERS.get(code)
        if decoder is None:
            events.append(StatusReported(device, code, f"unknown item 0x{code:02X}"))
            break
        try:
            event, used = decoder(device, data[pos:], fmt)
        except _Truncated:
            events.append(
                StatusReported(
                    device, code, f"unknown item 0x{code:02X} (cut short: {data[pos:].hex()})"
                )
            )
            break
        events.append(event)
        pos += used
    return events


# --- the VMC side -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CashlessSettings:
    """How this VMC presents itself to the reader. Money in minor units."""

    vmc_level: int = 3
    display_columns: int = 0
    display_rows: int = 0
    display_info: int = 0
    max_price: int | None = None  # None: "not known" (all ones on the wire)
    min_price: int | None = None  # None: "not known" (zero on the wire)
    always_idle: bool = False  # enable "always idle" (selection first) when the reader offers it
    negative_vend: bool = True  # enable NEGATIVE VEND when the reader offers it
    identity: Identity = Identity("VMC", "000000000001", "vmc", 0x0100)

    def __post_init__(self) -> None:
        if self.vmc_level not in (1, 2, 3):
            raise InvalidSettings(f"vmc_level={self.vmc_level}: must be 1, 2 or 3")
        for name in ("display_columns", "display_rows", "display_info"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFF:
                raise InvalidSettings(f"{name}={value}: must be 0..255")
        if self.display_columns * self.display_rows > 32:
            raise InvalidSettings("display_columns × display_rows: at most 32 (one MDB block)")
        for name in ("max_price", "min_price"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidSettings(f"{name}={value}: must not be negative")
        self.identity.encode()  # checks lengths and ASCII now, not at start-up


class SessionPhase(enum.Enum):
    """Where the VMC believes the reader's session is."""

    NONE = "none"  # no session: reader enabled or disabled
    IDLE = "idle"  # BEGIN SESSION seen; no vend in progress
    VEND_REQUESTED = "vend requested"  # VEND REQUEST sent; waiting for APPROVED/DENIED
    VENDING = "vending"  # approved: dispense, then VEND SUCCESS / FAILURE
    ENDING = "ending"  # SESSION COMPLETE sent; waiting for END SESSION


_E = TypeVar("_E", bound=DeviceEvent)


class CashlessReader(MdbDevice):
    """Cashless reader #1 as seen from the VMC (levels 1-3).

    Session commands return the events of an inline reply (readers that answer a VEND
    REQUEST with VEND APPROVED at once); those, like everything from POLL, also go to
    ``on_event``. Money-moving commands (VEND REQUEST, VEND SUCCESS, CASH SALE, NEGATIVE VEND,
    REVALUE) are sent once: a lost VEND REQUEST shows as no APPROVED/DENIED, and the VMC then
    sends VEND CANCEL, which the reader answers with VEND DENIED (MDB 4.2 §7).
    """

    NAME = "cashless"
    ADDRESS = CASHLESS1_ADDRESS
    POLL_CMD = CMD_POLL

    def __init__(
        self,
        master: MdbBus,
        *,
        poll_interval_s: float,
        on_event: EventSink,
        clock: Clock = time.monotonic,
        settings: CashlessSettings | None = None,
    ) -> None:
        self.settings = settings or CashlessSettings()
        self._non_response_s = DEFAULT_NON_RESPONSE_S
        self.reader_config: ReaderConfig | None = None
        self.reader_identity: Identity | None = None
        self.features_enabled = Feature(0)
        self.format = WireFormat(display_size=self._display_size())
        self.session = SessionPhase.NONE
        self.funds: int | None = None
        self.approved_amount: int | None = None
        self._cancel_requested = False
        self._ending_since = 0.0
        super().__init__(master, poll_interval_s=poll_interval_s, on_event=on_event, clock=clock)

    @property
    def NON_RESPONSE_S(self) -> float:  # type: ignore[override]  # per instance, not per class
        """5 s until the reader's SETUP reply gives its own maximum response time."""
        return self._non_response_s

    def _display_size(self) -> int:
        return self.settings.display_columns * self.settings.display_rows

    # --- money ---------------------------------------------------------------------------

    def to_minor(self, raw: int) -> int:
        return raw * self.format.scaling

    def to_scaled(self, minor: int, what: str = "amount") -> int:
        return self.format.scaled(minor, what)

    # --- start-up --------------------------------------------------------------------------

    async def initialise(self) -> None:
        """SETUP config, max/min prices, EXPANSION REQUEST ID, OPTIONAL FEATURE ENABLE."""
        settings = self.settings
        self._non_response_s = DEFAULT_NON_RESPONSE_S
        self.format = WireFormat(display_size=self._display_size())
        self.features_enabled = Feature(0)
        self._end_session_locally()

        setup = VmcSetup(
            settings.vmc_level,
            settings.display_columns,
            settings.display_rows,
            settings.display_info,
        )
        config = (
            await self._start_up_exchange(
                Cmd.SETUP_CONFIG, setup.encode(), ReaderConfigReported, "SETUP config data"
            )
        ).config
        if config.scaling == 0:
            raise CashlessError("reader reports scaling factor 0")
        self.reader_config = config
        if config.max_response_s > 0:
            self._non_response_s = float(config.max_response_s)
        level = min(settings.vmc_level, config.level)
        self.format = WireFormat(level, False, config.scaling, self._display_size())
        self.info.level = config.level
        self.info.details.update(
            currency_code=config.currency_code,
            iso4217=config.iso4217,
            scaling=config.scaling,
            decimals=config.decimals,
            max_response_s=config.max_response_s,
            options=int(config.options),
            level_agreed=level,
        )
        log.info(
            "%s: level %d (agreed %d), currency 0x%04X, scaling %d, %d decimals, max response %d s",
            self.NAME,
            config.level,
            level,
            config.currency_code,
            config.scaling,
            config.decimals,
            config.max_response_s,
        )
        await self._send_prices()

        try:
            identity = (
                await self._start_up_exchange(
                    Cmd.EXPANSION_REQUEST_ID,
                    settings.identity.encode(),
                    PeripheralId,
                    "EXPANSION REQUEST ID",
                )
            ).identity
        except NakReceived:
            # Some level-1 readers refuse EXPANSION; the reader works without its identity.
            log.warning("%s: EXPANSION REQUEST ID refused; no identity", self.NAME)
            identity = Identity()
        self.reader_identity = identity
        self.info.manufacturer = identity.manufacturer
        self.info.serial = identity.serial
        self.info.model = identity.model
        self.info.version = identity.version
        offered = identity.features or Feature(0)
        self.info.details["features_offered"] = int(offered)

        if level >= 3 and identity.features is not None:
            enabled = offered & self._wanted_features(config)
            await self._command(Cmd.EXPANSION_FEATURE_ENABLE, encode_features(enabled))
            self.features_enabled = enabled
            if enabled & EXPANDED_FEATURES:
                self.format = dataclasses.replace(self.format, expanded=True)
                # The prices went out in the 16-bit form; send them again in the new one.
                await self._send_prices()
        self.info.details["features_enabled"] = int(self.features_enabled)
        self.info.details["expanded"] = self.format.expanded

    def _wanted_features(self, config: ReaderConfig) -> Feature:
        wanted = Feature(0)
        if self.settings.always_idle:
            wanted |= Feature.ALWAYS_IDLE
        if self.settings.negative_vend:
            wanted |= Feature.NEGATIVE_VEND
        # 32-bit money only when prices do not fit 16 bits in the reader's scaled units.
        if (self.settings.max_price or 0) // config.scaling >= MONEY16_MAX:
            wanted |= Feature.MONEY_32BIT
        return wanted & SUPPORTED_FEATURES

    async def _send_prices(self) -> None:
        fmt = self.format
        max_raw = fmt.money_unknown
        if self.settings.max_price is not None:
            # Round up: the reader must not refuse the dearest item over a remainder.
            max_raw = min(-(-self.settings.max_price // fmt.scaling), fmt.money_unknown)
        min_raw = 0
        if self.settings.min_price is not None:
            min_raw = min(self.settings.min_price // fmt.scaling, max_raw)
        currency = self.reader_config.currency_code if self.reader_config else 0
        limits = PriceLimits(max_raw, min_raw, currency if fmt.expanded else None)
        cmd = Cmd.SETUP_PRICES_X if fmt.expanded else Cmd.SETUP_PRICES
        await self._command(cmd, limits.encode(fmt.expanded))

    async def _start_up_exchange(
        self, cmd: CommandDef, payload: bytes, wanted: type[_E], what: str
    ) -> _E:
        """Send a start-up command whose answer is an item; readers give it inline or, after
        a lone ACK, in a later POLL."""
        events = await self._command(cmd, payload, keep=wanted)
        found = [e for e in events if isinstance(e, wanted)]
        deadline = self._clock() + DEFERRED_REPLY_WAIT_S
        while not found:
            if self._clock() > deadline:
                raise CashlessError(f"{self.NAME}: no answer to {what}")
            await asyncio.sleep(self.poll_interval_s)
            reply = await self.poll_request()
            if reply.data:
                events = self._deliver(self.parse_poll(reply.data), keep=wanted)
                found = [e for e in events if isinstance(e, wanted)]
        return found[0]

    # --- polling ---------------------------------------------------------------------------

    def parse_poll(self, data: bytes) -> list[DeviceEvent]:
        return decode_poll(data, self.format, self.NAME)

    async def apply_enable(self, enabled: bool) -> None:
        await self._command(Cmd.READER_ENABLE if enabled else Cmd.READER_DISABLE)

    async def after_poll(self) -> None:
        # mdb.md "Cashless": the VMC answers a session cancel request with SESSION COMPLETE.
        # In the middle of a vend, the vend cycle finishes the vend first and then completes.
        if self._cancel_requested and self.session is SessionPhase.IDLE:
            self._cancel_requested = False
            try:
                await self.session_complete()
            except MdbError:
                self._cancel_requested = True  # try again after the next POLL
                raise
        # A reader that never confirms with END SESSION must not hold the VMC in ENDING.
        if (
            self.session is SessionPhase.ENDING
            and self._clock() - self._ending_since > self.NON_RESPONSE_S
        ):
            log.warning("%s: no END SESSION after SESSION COMPLETE; session closed", self.NAME)
            self._end_session_locally()

    def turn_in_s(self) -> float | None:
        turn_in_s = super().turn_in_s()
        if turn_in_s == 0.0:
            return turn_in_s
        if self._cancel_requested and self.session is SessionPhase.IDLE:
            return 0.0  # SESSION COMPLETE is due (``after_poll``)
        if self.session is SessionPhase.ENDING:
            # ``after_poll`` closes a session left ENDING this long; one poll interval after
            # that, as a POLL-paced check would.
            left_s = self._ending_since + self.NON_RESPONSE_S - self._clock()
            return max(0.0, left_s) + self.poll_interval_s
        return turn_in_s

    def emit(self, event: DeviceEvent) -> None:
        """Track the session from every event before it goes upwards."""
        if isinstance(event, BeginSession):
            if self.session in (
                SessionPhase.IDLE,
                SessionPhase.VEND_REQUESTED,
                SessionPhase.VENDING,
            ):
                log.info("%s: BEGIN SESSION again inside a session", self.NAME)
                event = dataclasses.replace(event, repeated=True)
            else:
                self.session = SessionPhase.IDLE
                self._cancel_requested = False
            self.funds = event.funds
        elif isinstance(event, VendApproved):
            if self.session is not SessionPhase.VEND_REQUESTED:
                log.warning("%s: VEND APPROVED in phase %s", self.NAME, self.session.value)
            self.session = SessionPhase.VENDING
            self.approved_amount = event.amount
        elif isinstance(event, VendDenied):
            if self.session in (SessionPhase.VEND_REQUESTED, SessionPhase.VENDING):
                self.session = SessionPhase.IDLE
            self.approved_amount = None
        elif isinstance(event, EndSession):
            self._end_session_locally()
        elif isinstance(event, SessionCancelRequest):
            self._cancel_requested = True
        elif isinstance(event, JustReset):
            self._end_session_locally()
        elif isinstance(event, ReaderMalfunction):
            log.warning("%s: malfunction 0x%02X (%s)", self.NAME, event.code, event.kind)
        elif isinstance(event, CommandOutOfSequence):
            log.warning("%s: command out of sequence (status %s)", self.NAME, event.status)
        super().emit(event)

    def _end_session_locally(self) -> None:
        self.session = SessionPhase.NONE
        self.funds = None
        self.approved_amount = None
        self._cancel_requested = False

    # --- session commands (for the vend cycle) -----------------------------------------------

    async def vend_request(self, price: int, item: int) -> list[DeviceEvent]:
        """Ask to charge ``price`` (minor units) for ``item``; APPROVED/DENIED follows."""
        always_idle = bool(self.features_enabled & Feature.ALWAYS_IDLE)
        if not (
            self.session is SessionPhase.IDLE or (always_idle and self.session is SessionPhase.NONE)
        ):
            raise SessionStateError(f"VEND REQUEST in session phase {self.session.value}")
        payload = self._item_price(price, item, "price")
        cmd = Cmd.VEND_REQUEST_X if self.format.expanded else Cmd.VEND_REQUEST
        # Before sending: an inline APPROVED, or one in the next POLL, finds the right phase.
        self.session = SessionPhase.VEND_REQUESTED
        self.approved_amount = None
        return await self._command(cmd, payload.encode(self.format.expanded), max_attempts=1)

    async def vend_cancel(self) -> list[DeviceEvent]:
        """Withdraw a VEND REQUEST; the reader answers VEND DENIED."""
        if self.session not in (SessionPhase.VEND_REQUESTED, SessionPhase.VENDING):
            raise SessionStateError(f"VEND CANCEL in session phase {self.session.value}")
        return await self._command(Cmd.VEND_CANCEL)

    async def vend_success(self, item: int) -> list[DeviceEvent]:
        """The product was delivered: the reader charges the approved amount."""
        if self.session is not SessionPhase.VENDING:
            raise SessionStateError(f"VEND SUCCESS in session phase {self.session.value}")
        payload = _be(item, 2, "item")
        events = await self._command(Cmd.VEND_SUCCESS, payload, max_attempts=1)
        if self.session is SessionPhase.VENDING:  # unless END SESSION came meanwhile
            self.session = SessionPhase.IDLE
        self.approved_amount = None
        return events

    async def vend_failure(self) -> list[DeviceEvent]:
        """The product was not delivered: the reader must not charge (refund)."""
        if self.session not in (SessionPhase.VENDING, SessionPhase.VEND_REQUESTED):
            raise SessionStateError(f"VEND FAILURE in session phase {self.session.value}")
        events = await self._command(Cmd.VEND_FAILURE)
        if self.session in (SessionPhase.VENDING, SessionPhase.VEND_REQUESTED):
            self.session = SessionPhase.IDLE
        self.approved_amount = None
        return events

    async def session_complete(self) -> bool:
        """End the session; END SESSION follows. False (nothing sent) when the reader has
        already ended it on its own."""
        if self.session is SessionPhase.NONE:
            return False
        previous = self.session
        self.session = SessionPhase.ENDING
        self._ending_since = self._clock()
        try:
            await self._command(Cmd.SESSION_COMPLETE)
        except (MdbError, asyncio.CancelledError):
            # Not taken (or not known to be): the session is still open; let it be completed
            # again. A reader that did take it answers a second one with 0B, which is harmless.
            if self.session is SessionPhase.ENDING:
                self.session = previous
            raise
        return True

    async def cash_sale(self, price: int, item: int) -> list[DeviceEvent]:
        """Report a sale paid in cash (the reader keeps audit data)."""
        payload = self._item_price(price, item, "price")
        if self.format.expanded:
            currency = self.reader_config.currency_code if self.reader_config else 0
            payload = dataclasses.replace(payload, currency_code=currency)
        cmd = Cmd.CASH_SALE_X if self.format.expanded else Cmd.CASH_SALE
        data = payload.encode(self.format.expanded, with_currency=True)
        return await self._command(cmd, data, max_attempts=1)

    async def negative_vend(self, price: int, item: int) -> list[DeviceEvent]:
        """Ask to credit ``price`` back (a product put back); APPROVED/DENIED follows."""
        if not self.features_enabled & Feature.NEGATIVE_VEND:
            raise SessionStateError("negative vend is not enabled on this reader")
        if self.session is not SessionPhase.IDLE:
            raise SessionStateError(f"NEGATIVE VEND in session phase {self.session.value}")
        payload = self._item_price(price, item, "price")
        cmd = Cmd.NEGATIVE_VEND_X if self.format.expanded else Cmd.NEGATIVE_VEND
        self.session = SessionPhase.VEND_REQUESTED
        return await self._command(cmd, payload.encode(self.format.expanded), max_attempts=1)

    async def reader_cancel(self) -> list[DeviceEvent]:
        """Abort what the reader is doing (before a session); it answers CANCELLED."""
        return await self._command(Cmd.READER_CANCEL)

    async def revalue(self, amount: int) -> list[DeviceEvent]:
        """Put ``amount`` (minor units) on the payment media; REVALUE APPROVED/DENIED follows."""
        if self.session is not SessionPhase.IDLE:
            raise SessionStateError(f"REVALUE in session phase {self.session.value}")
        raw = self.to_scaled(amount)
        cmd = Cmd.REVALUE_REQUEST_X if self.format.expanded else Cmd.REVALUE_REQUEST
        data = encode_amount(raw, self.format.expanded)
        return await self._command(cmd, data, max_attempts=1)

    async def revalue_limit(self) -> list[DeviceEvent]:
        """Ask how much may be revalued; REVALUE LIMIT AMOUNT follows."""
        return await self._command(Cmd.REVALUE_LIMIT_REQUEST)

    def _item_price(self, price: int, item: int, what: str) -> ItemPrice:
        if not 0 <= item <= ITEM_MAX:
            raise InvalidSettings(f"item={item}: must be 0..{ITEM_MAX}")
        return ItemPrice(self.to_scaled(price, what), item)

    # --- the one path every command takes ------------------------------------------------

    async def _command(
        self,
        cmd: CommandDef,
        payload: bytes = b"",
        *,
        max_attempts: int | None = None,
        keep: type[DeviceEvent] | None = None,
    ) -> list[DeviceEvent]:
        reply = await self.send(cmd, payload, max_attempts=max_attempts)
        if not reply.data:
            return []
        return self._deliver(self.parse_poll(reply.data), keep=keep)

    def _deliver(
        self, events: list[DeviceEvent], *, keep: type[DeviceEvent] | None = None
    ) -> list[DeviceEvent]:
        """Emit the events of a reply outside the POLL loop. ``keep``: the type start-up is
        waiting for, returned and not emitted. JUST RESET restarts the device."""
        for event in events:
            if isinstance(event, JustReset):
                if self.state is DeviceState.STARTING:
                    raise ReaderResetDuringStartUp(f"{self.NAME}: JUST RESET during start-up")
                log.warning("%s: JUST RESET in a command reply; starting up again", self.NAME)
                self.emit(event)
                self._set_state(DeviceState.STARTING, "peripheral reset itself")
            elif keep is None or not isinstance(event, keep):
                self.emit(event)
        return events


class CashlessReader2(CashlessReader):
    """Cashless reader #2 (address 0x60)."""

    NAME = "cashless2"
    ADDRESS = CASHLESS2_ADDRESS
