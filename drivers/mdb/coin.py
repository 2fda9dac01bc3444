"""MDB coin changer (address 0x08), levels 2 and 3: commands as tables, replies as dataclasses,
and the VMC-side device class.

Facts used (../shared/reference/mdb.md "Coin changer", MDB/ICP 4.2 section 5):

* SETUP reply: level, currency (2, BCD), scaling, decimal places, coin type routing (2: bit n
  set = coin type n can go to a tube), coin type credits (up to 16; value = credit x scaling).
* TUBE STATUS reply: tube full flags (2), tube counts (up to 16).
* POLL: up to 16 bytes of activity: ``1yyyxxxx n`` coins dispensed manually (yyy coins of
  type xxxx, n now in the tube), ``01yyxxxx n`` coin deposited (yy route, n in the tube),
  ``001xxxxx`` slugs, 0x01..0x0D status.
* COIN TYPE: coin enable mask (2), manual dispense enable mask (2). DISPENSE: (count<<4)|type.
* Level 3 expansion (0x0F): 00 ID (manufacturer 3, serial 12, model 12, version 2 BCD,
  optional features 4), 01 FEATURE ENABLE (4), 02 PAYOUT (value in scaled units),
  03 PAYOUT STATUS (coins paid per type; ACK only while busy), 04 PAYOUT VALUE POLL (scaled
  value paid since the last one; ACK only when the payout is finished), 05 DIAGNOSTIC STATUS
  (up to 8 two-byte codes).

All 2-byte masks are big-endian with bit n for coin type n.

Money: every value handed upwards is an integer in minor units (credit byte x scaling factor,
shown with ``decimals`` digits); the raw credit bytes are kept beside it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from drivers.errors import MdbError
from drivers.mdb.change import coins_within
from drivers.mdb.commands import (
    ACK_ONLY,
    CommandDef,
    CommandTable,
    ReplyShape,
    data_reply,
)
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

log = logging.getLogger("drivers.mdb.coin")

ADDRESS = 0x08
#: How many coin types MDB can name (4-bit coin type).
COIN_TYPES = 16
#: DISPENSE carries the count in 4 bits.
MAX_DISPENSE_COUNT = 15
#: A coin type credit of 0xFF names a vend token, not money (MDB 4.2 §5 SETUP; verify).
TOKEN_CREDIT = 0xFF

# --- commands as data ---------------------------------------------------------------------

# Reply shapes from MDB 4.2 §5: SETUP is 7 bytes + up to 16 coin credits; TUBE STATUS 2 full
# flag bytes + up to 16 counts; a POLL reply up to 16 bytes of items; EXPANSION ID 33 bytes;
# PAYOUT STATUS up to 16 counts (ACK while busy); PAYOUT VALUE POLL 1 byte (ACK when done);
# DIAGNOSTIC STATUS 2..16 bytes (pairs).
RESET = CommandDef("RESET", 0x00, reply=ACK_ONLY)
SETUP = CommandDef("SETUP", 0x01, reply=data_reply(7, 7 + COIN_TYPES))
TUBE_STATUS = CommandDef("TUBE STATUS", 0x02, reply=data_reply(2, 2 + COIN_TYPES))
POLL = CommandDef("POLL", 0x03, reply=ReplyShape(ack=True, min_data=1, max_data=16))
COIN_TYPE = CommandDef("COIN TYPE", 0x04, data_len=4, reply=ACK_ONLY)
DISPENSE = CommandDef("DISPENSE", 0x05, data_len=1, reply=ACK_ONLY)
EXPANSION_ID = CommandDef("EXPANSION ID", 0x07, sub=0x00, data_len=1, reply=data_reply(33))
FEATURE_ENABLE = CommandDef("FEATURE ENABLE", 0x07, sub=0x01, data_len=5, reply=ACK_ONLY)
PAYOUT = CommandDef("PAYOUT", 0x07, sub=0x02, data_len=2, reply=ACK_ONLY)
PAYOUT_STATUS = CommandDef(
    "PAYOUT STATUS", 0x07, sub=0x03, data_len=1, reply=ReplyShape(True, 1, COIN_TYPES)
)
PAYOUT_VALUE_POLL = CommandDef(
    "PAYOUT VALUE POLL", 0x07, sub=0x04, data_len=1, reply=ReplyShape(True, 1, 1)
)
DIAGNOSTIC_STATUS = CommandDef(
    "DIAGNOSTIC STATUS", 0x07, sub=0x05, data_len=1, reply=data_reply(2, 16)
)

LEVEL2_COMMANDS: tuple[CommandDef, ...] = (RESET, SETUP, TUBE_STATUS, POLL, COIN_TYPE, DISPENSE)
LEVEL3_COMMANDS: tuple[CommandDef, ...] = (
    *LEVEL2_COMMANDS,
    EXPANSION_ID,
    FEATURE_ENABLE,
    PAYOUT,
    PAYOUT_STATUS,
    PAYOUT_VALUE_POLL,
    DIAGNOSTIC_STATUS,
)


def command_table(level: int) -> CommandTable:
    """The commands a changer of this level understands (level 2 has no expansion)."""
    return CommandTable(ADDRESS, LEVEL3_COMMANDS if level >= 3 else LEVEL2_COMMANDS)


# --- poll item codes ----------------------------------------------------------------------

STATUS_ESCROW_REQUEST = 0x01  # the coin return lever
STATUS_PAYOUT_BUSY = 0x02
STATUS_NO_CREDIT = 0x03
STATUS_DEFECTIVE_TUBE_SENSOR = 0x04
STATUS_DOUBLE_ARRIVAL = 0x05
STATUS_ACCEPTOR_UNPLUGGED = 0x06
STATUS_TUBE_JAM = 0x07
STATUS_ROM_CHECKSUM = 0x08
STATUS_ROUTING_ERROR = 0x09
STATUS_CHANGER_BUSY = 0x0A
STATUS_JUST_RESET = 0x0B
STATUS_COIN_JAM = 0x0C
STATUS_CREDITED_COIN_REMOVAL = 0x0D

#: Status code -> (text, whether it stops the changer working).
STATUS_TEXT: dict[int, tuple[str, bool]] = {
    STATUS_ESCROW_REQUEST: ("escrow request (coin return lever)", False),
    STATUS_PAYOUT_BUSY: ("payout busy", False),
    STATUS_NO_CREDIT: ("no credit: coin validated but did not arrive", False),
    STATUS_DEFECTIVE_TUBE_SENSOR: ("defective tube sensor", False),
    STATUS_DOUBLE_ARRIVAL: ("double arrival", False),
    STATUS_ACCEPTOR_UNPLUGGED: ("acceptor unplugged", True),
    STATUS_TUBE_JAM: ("tube jam", True),
    STATUS_ROM_CHECKSUM: ("ROM checksum error", True),
    STATUS_ROUTING_ERROR: ("coin routing error", False),
    STATUS_CHANGER_BUSY: ("changer busy", False),
    STATUS_JUST_RESET: ("changer was reset", False),
    STATUS_COIN_JAM: ("coin jam", True),
    STATUS_CREDITED_COIN_REMOVAL: ("possible credited coin removal", False),
}


class CoinRoute(enum.IntEnum):
    """Where a deposited coin went (``yy`` of ``01yyxxxx``)."""

    CASHBOX = 0
    TUBES = 1
    NOT_USED = 2
    REJECTED = 3

    @property
    def credited(self) -> bool:
        return self in (CoinRoute.CASHBOX, CoinRoute.TUBES)


class ChangerFeature(enum.IntFlag):
    """Level-3 optional features (EXPANSION ID, last 4 bytes, big-endian)."""

    ALTERNATIVE_PAYOUT = 0x01
    EXTENDED_DIAGNOSTICS = 0x02
    MANUAL_FILL_PAYOUT = 0x04
    FILE_TRANSPORT = 0x08


#: The features this class knows how to use; only these are switched on by FEATURE ENABLE.
SUPPORTED_FEATURES = ChangerFeature.ALTERNATIVE_PAYOUT | ChangerFeature.EXTENDED_DIAGNOSTICS


# --- errors -------------------------------------------------------------------------------


class CoinChangerError(MdbError):
    """Root of the coin changer's own errors."""


class BadCoinReply(CoinChangerError):
    """A reply too short or malformed for the command it answers."""

    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(f"{message} (raw {raw.hex(' ') or '-'})")
        self.raw = raw


class NotSupported(CoinChangerError):
    """The command needs a level or feature this changer did not report."""


# --- replies as dataclasses ---------------------------------------------------------------


def _bcd(value: int, digits: int) -> int | None:
    """Decode ``digits`` BCD nibbles of ``value``; None if any nibble is not a decimal digit."""
    out = 0
    for shift in range(4 * (digits - 1), -1, -4):
        nibble = value >> shift & 0xF
        if nibble > 9:
            return None
        out = out * 10 + nibble
    return out


@dataclass(frozen=True, slots=True)
class CoinTypeInfo:
    """One coin type as SETUP declares it."""

    coin_type: int
    credit: int  # raw credit byte
    value: int  # minor units; 0 for a token
    routable: bool  # can go to a tube (and so be paid out)
    token: bool


@dataclass(frozen=True, slots=True)
class ChangerSetup:
    """The SETUP reply."""

    level: int
    currency: int  # raw 16-bit code, BCD (0x1978 = EUR 978)
    scaling: int
    decimals: int
    routing: int  # raw mask: bit n = coin type n can be routed to a tube
    credits: tuple[int, ...]  # raw credit byte per coin type, 0 = no such coin

    @property
    def currency_iso(self) -> int | None:
        """ISO 4217 numeric code when the code has the leading 1 (mdb.md "Money"; verify)."""
        if self.currency >> 12 != 1:
            return None
        return _bcd(self.currency & 0x0FFF, 3)

    def coin(self, coin_type: int) -> CoinTypeInfo | None:
        if not 0 <= coin_type < len(self.credits) or self.credits[coin_type] == 0:
            return None
        credit = self.credits[coin_type]
        token = credit == TOKEN_CREDIT
        return CoinTypeInfo(
            coin_type=coin_type,
            credit=credit,
            value=0 if token else credit * self.scaling,
            routable=bool(self.routing >> coin_type & 1),
            token=token,
        )

    @property
    def coins(self) -> tuple[CoinTypeInfo, ...]:
        found = (self.coin(t) for t in range(len(self.credits)))
        return tuple(c for c in found if c is not None)

    @property
    def coin_mask(self) -> int:
        """Every coin type the changer declares."""
        return sum(1 << c.coin_type for c in self.coins)

    @property
    def tube_mask(self) -> int:
        """Every declared coin type that can go to a tube."""
        return sum(1 << c.coin_type for c in self.coins if c.routable)

    def value_of(self, coin_type: int) -> int:
        """Minor units of one coin of this type (0 if unknown or a token)."""
        coin = self.coin(coin_type)
        return coin.value if coin is not None else 0

    def to_scaled(self, amount: int) -> int:
        """Minor units -> the changer's scaled units; the amount must be a multiple."""
        if self.scaling <= 0 or amount % self.scaling:
            raise ValueError(f"{amount} is not a multiple of the scaling factor {self.scaling}")
        return amount // self.scaling

    def format_value(self, amount: int) -> str:
        """Minor units as the changer would show them: 150 with 2 decimals -> "1.50"."""
        if self.decimals <= 0:
            return str(amount)
        sign = "-" if amount < 0 else ""
        whole, frac = divmod(abs(amount), 10**self.decimals)
        return f"{sign}{whole}.{frac:0{self.decimals}d}"


@dataclass(frozen=True, slots=True)
class Tube:
    coin_type: int
    count: int
    full: bool


@dataclass(frozen=True, slots=True)
class TubeStatus:
    """The TUBE STATUS reply."""

    full: int  # raw mask
    counts: tuple[int, ...]  # per coin type; types beyond the reply count 0

    def count(self, coin_type: int) -> int:
        return self.counts[coin_type] if 0 <= coin_type < len(self.counts) else 0

    def is_full(self, coin_type: int) -> bool:
        return bool(self.full >> coin_type & 1)

    def tube(self, coin_type: int) -> Tube:
        return Tube(coin_type, self.count(coin_type), self.is_full(coin_type))

    def with_count(self, coin_type: int, count: int) -> TubeStatus:
        if not 0 <= coin_type < COIN_TYPES:
            return self
        counts = list(self.counts) + [0] * (coin_type + 1 - len(self.counts))
        counts[coin_type] = count
        return TubeStatus(self.full, tuple(counts))


@dataclass(frozen=True, slots=True)
class ChangerIdentity:
    """The level-3 EXPANSION ID reply."""

    manufacturer: str
    serial: str
    model: str
    version: int  # raw 2 bytes, BCD
    features: ChangerFeature
    raw_features: int

    @property
    def version_text(self) -> str:
        decoded = _bcd(self.version, 4)
        if decoded is None:
            return f"0x{self.version:04X}"
        return f"{decoded // 100}.{decoded % 100:02d}"


#: DIAGNOSTIC STATUS codes: (main, sub) -> text; (main, None) is the text for any sub code.
DIAGNOSTIC_TEXT: dict[tuple[int, int | None], str] = {
    (0x01, None): "powering up",
    (0x02, None): "powering down",
    (0x03, None): "OK",
    (0x04, None): "keypad shifted",
    (0x05, 0x10): "manual fill / payout active",
    (0x05, 0x20): "new inventory information available",
    (0x06, None): "inhibited by VMC",
    (0x10, None): "general changer error",
    (0x10, 0x01): "check sum error #1",
    (0x10, 0x02): "check sum error #2",
    (0x10, 0x03): "low line voltage detected",
    (0x11, None): "discriminator module error",
    (0x11, 0x10): "flight deck open",
    (0x11, 0x11): "escrow return stuck open",
    (0x11, 0x30): "coin jam in sensor",
    (0x11, 0x41): "discrimination below specified standard",
    (0x11, 0x50): "validation sensor A out of range",
    (0x11, 0x51): "validation sensor B out of range",
    (0x11, 0x52): "validation sensor C out of range",
    (0x11, 0x53): "operating temperature exceeded",
    (0x11, 0x54): "sizing optics failure",
    (0x12, None): "accept gate module error",
    (0x12, 0x30): "coins entered gate but did not exit",
    (0x12, 0x31): "accept gate alarm active",
    (0x12, 0x40): "accept gate open but no coin detected",
    (0x12, 0x50): "post gate sensor covered before gate opened",
    (0x13, None): "separator module error",
    (0x13, 0x10): "sort sensor error",
    (0x14, None): "dispenser module error",
    (0x15, None): "coin cassette / tube module error",
    (0x15, 0x02): "cassette removed",
    (0x15, 0x03): "cash box sensor error",
    (0x15, 0x04): "sunlight on tube sensors",
}

#: Main codes that mean the changer works normally.
DIAGNOSTIC_OK_MAIN = frozenset({0x01, 0x03, 0x04, 0x05, 0x06})


@dataclass(frozen=True, slots=True)
class DiagnosticCode:
    main: int
    sub: int

    @property
    def text(self) -> str:
        found = DIAGNOSTIC_TEXT.get((self.main, self.sub)) or DIAGNOSTIC_TEXT.get((self.main, None))
        return found or f"unknown diagnostic 0x{self.main:02X} 0x{self.sub:02X}"

    @property
    def ok(self) -> bool:
        return self.main in DIAGNOSTIC_OK_MAIN


@dataclass(frozen=True, slots=True)
class DiagnosticStatus:
    """The level-3 DIAGNOSTIC STATUS reply."""

    codes: tuple[DiagnosticCode, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.codes)


@dataclass(frozen=True, slots=True)
class PayoutStatus:
    """The level-3 PAYOUT STATUS reply: coins paid per type, or busy (a lone ACK)."""

    busy: bool
    counts: tuple[int, ...] = ()

    def count(self, coin_type: int) -> int:
        return self.counts[coin_type] if 0 <= coin_type < len(self.counts) else 0


@dataclass(frozen=True, slots=True)
class PayoutProgress:
    """The level-3 PAYOUT VALUE POLL reply: scaled value paid since the last one, or done."""

    done: bool
    credit: int = 0  # raw, in scaled units
    value: int = 0  # minor units


@dataclass(frozen=True, slots=True)
class PayoutResult:
    """What a DISPENSE or PAYOUT actually paid.

    ``confirmed``: the counts come from the changer's PAYOUT STATUS; otherwise they are the
    tube count difference (tube sensors estimate counts on many changers). ``finished``: the
    changer said it was done before the timeout; if not, the payout is still pending.
    """

    counts: dict[int, int]
    value: int
    requested: int
    confirmed: bool
    finished: bool

    @property
    def short_by(self) -> int:
        return max(0, self.requested - self.value)


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CoinDeposited(DeviceEvent):
    """A coin went in. Only ``route.credited`` coins are money for the customer."""

    coin_type: int
    value: int  # minor units
    route: CoinRoute
    tube_count: int  # coins of this type now in the tube
    token: bool = False
    raw: bytes = b""

    @property
    def credited(self) -> bool:
        return self.route.credited


@dataclass(frozen=True, slots=True)
class CoinsDispensedManually(DeviceEvent):
    """Someone pressed the changer's own dispense button(s)."""

    coin_type: int
    count: int
    value: int  # minor units, all coins together
    tube_count: int
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class ReturnLeverPressed(DeviceEvent):
    """The customer pressed the coin return lever (status 0x01, escrow request)."""


@dataclass(frozen=True, slots=True)
class SlugsReported(StatusReported):
    """Coins the changer could not recognise (``001xxxxx``: xxxxx slugs)."""

    count: int = 0


# --- request encoders (VMC -> changer) ----------------------------------------------------


def encode_coin_type(accept_mask: int, manual_mask: int) -> bytes:
    return (accept_mask & 0xFFFF).to_bytes(2, "big") + (manual_mask & 0xFFFF).to_bytes(2, "big")


def encode_dispense(coin_type: int, count: int) -> bytes:
    if not 0 <= coin_type < COIN_TYPES:
        raise ValueError(f"coin type {coin_type} out of range 0..15")
    if not 1 <= count <= MAX_DISPENSE_COUNT:
        raise ValueError(f"dispense count {count} out of range 1..{MAX_DISPENSE_COUNT}")
    return bytes(((count << 4) | coin_type,))


def encode_feature_enable(features: int) -> bytes:
    return (features & 0xFFFFFFFF).to_bytes(4, "big")


def encode_payout(credit: int) -> bytes:
    if not 1 <= credit <= 0xFF:
        raise ValueError(f"payout of {credit} scaled units out of range 1..255")
    return bytes((credit,))


# --- reply decoders (changer -> VMC) ------------------------------------------------------


def decode_setup(data: bytes) -> ChangerSetup:
    if len(data) < 7:
        raise BadCoinReply("SETUP reply shorter than 7 bytes", data)
    return ChangerSetup(
        level=data[0],
        currency=int.from_bytes(data[1:3], "big"),
        scaling=data[3],
        decimals=data[4],
        routing=int.from_bytes(data[5:7], "big"),
        credits=tuple(data[7 : 7 + COIN_TYPES]),
    )


def decode_tube_status(data: bytes) -> TubeStatus:
    if len(data) < 2:
        raise BadCoinReply("TUBE STATUS reply shorter than 2 bytes", data)
    return TubeStatus(full=int.from_bytes(data[0:2], "big"), counts=tuple(data[2 : 2 + COIN_TYPES]))


def _ascii(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").strip(" \x00")


def decode_expansion_id(data: bytes) -> ChangerIdentity:
    if len(data) < 33:
        raise BadCoinReply("EXPANSION ID reply shorter than 33 bytes", data)
    raw_features = int.from_bytes(data[29:33], "big")
    return ChangerIdentity(
        manufacturer=_ascii(data[0:3]),
        serial=_ascii(data[3:15]),
        model=_ascii(data[15:27]),
        version=int.from_bytes(data[27:29], "big"),
        features=ChangerFeature(raw_features & 0x0F),
        raw_features=raw_features,
    )


def decode_diagnostics(data: bytes) -> DiagnosticStatus:
    if len(data) % 2:
        raise BadCoinReply("DIAGNOSTIC STATUS reply of odd length", data)
    return DiagnosticStatus(
        tuple(DiagnosticCode(data[i], data[i + 1]) for i in range(0, len(data), 2))
    )


def decode_payout_status(data: bytes) -> PayoutStatus:
    if not data:
        return PayoutStatus(busy=True)
    return PayoutStatus(busy=False, counts=tuple(data[:COIN_TYPES]))


def decode_payout_value_poll(data: bytes, scaling: int) -> PayoutProgress:
    if not data:
        return PayoutProgress(done=True)
    if len(data) != 1:
        raise BadCoinReply("PAYOUT VALUE POLL reply is not 1 byte", data)
    return PayoutProgress(done=False, credit=data[0], value=data[0] * scaling)


def _unknown(device: str, data: bytes, at: int, why: str = "unknown item") -> StatusReported:
    return StatusReported(device, data[at], f"{why} 0x{data[at]:02X}", fault=False)


def decode_poll(data: bytes, device: str, setup: ChangerSetup | None) -> list[DeviceEvent]:
    """Decode a POLL data reply into events. Never raises: an item this parser does not know
    (or one cut short) is reported as a ``StatusReported`` and parsing stops there, because
    the length of what follows is unknown."""
    events: list[DeviceEvent] = []
    i = 0
    while i < len(data):
        b = data[i]
        if b & 0x80 or b & 0xC0 == 0x40:  # two-byte items
            if i + 1 >= len(data):
                events.append(_unknown(device, data, i, "truncated item"))
                break
            coin_type = b & 0x0F
            tube_count = data[i + 1]
            raw = data[i : i + 2]
            value = setup.value_of(coin_type) if setup is not None else 0
            if b & 0x80:
                count = b >> 4 & 0x07
                events.append(
                    CoinsDispensedManually(device, coin_type, count, count * value, tube_count, raw)
                )
            else:
                coin = setup.coin(coin_type) if setup is not None else None
                route = CoinRoute(b >> 4 & 0x03)
                token = coin.token if coin is not None else False
                events.append(
                    CoinDeposited(device, coin_type, value, route, tube_count, token, raw)
                )
            i += 2
            continue
        if b & 0xE0 == 0x20:
            count = b & 0x1F
            events.append(SlugsReported(device, b, f"{count} slug(s)", False, count))
        elif b == STATUS_JUST_RESET:
            events.append(JustReset(device))
        elif b == STATUS_ESCROW_REQUEST:
            events.append(ReturnLeverPressed(device))
        elif b in STATUS_TEXT:
            text, fault = STATUS_TEXT[b]
            events.append(StatusReported(device, b, text, fault))
        else:
            events.append(_unknown(device, data, i))
            break
        i += 1
    return events


# --- the device ---------------------------------------------------------------------------

#: mdb.md "Cadence": real VMCs poll each device every 100-200 ms.
DEFAULT_POLL_INTERVAL_S = 0.15
#: Most POLLs ``settle_activity`` sends waiting for the changer to fall quiet (a changer
#: reports at most 16 bytes of items per POLL; one with a standing status never falls quiet).
SETTLE_MAX_POLLS = 8
#: How long ``pay_out`` waits for each DISPENSE of up to 15 coins: real changers pay 3-5
#: coins a second, so 15 coins take up to ~5 s; doubled for margin.
DISPENSE_WAIT_S = 10.0


@dataclass(slots=True)
class _PendingPayout:
    """A DISPENSE/PAYOUT sent and not yet reconciled."""

    baseline: TubeStatus
    startups: int  # the device's start-up count when it began: a restart loses PAYOUT STATUS
    #: When the baseline's TUBE STATUS reply arrived (perf_counter_ns, the bus master's
    #: stamp): only POLL replies received after it can report coins moved during the payout.
    baseline_ns: int = 0
    requested: int = 0  # minor units
    alternative: bool = True  # every command so far was a level-3 PAYOUT
    #: coin_type -> coins DISPENSE commanded (a DISPENSE never pays another type or more).
    commanded: dict[int, int] = field(default_factory=dict)
    #: Coins that entered (+) or left by hand (-) each tube while it was pending, from POLL.
    tube_moves: dict[int, int] = field(default_factory=dict)


class CoinChanger(MdbDevice):
    """The coin changer as the VMC sees it.

    Start-up: SETUP; at level 3 EXPANSION ID, FEATURE ENABLE (of the reported features this
    class uses), DIAGNOSTIC STATUS if extended diagnostics are reported; TUBE STATUS. Enable
    with COIN TYPE (``set_accepted`` picks the coins; manual dispense stays on for every tube
    coin).

    Paying out: ``dispense``/``payout`` send the command once (a retransmission could pay
    twice) and always leave a payout pending, even when the command raised; then
    ``wait_payout_done`` finds out what was paid (PAYOUT STATUS at level 3, the tube count
    difference at level 2, corrected for coins deposited or dispensed by hand meanwhile).
    """

    NAME = "coin"
    ADDRESS = ADDRESS
    POLL_CMD = POLL.command
    POLL_REPLY = POLL.reply
    #: mdb.md "Timing": a coin changer silent for 2 s counts as gone.
    NON_RESPONSE_S = 2.0

    def __init__(
        self,
        master: MdbBus,
        *,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        on_event: EventSink,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(master, poll_interval_s=poll_interval_s, on_event=on_event, clock=clock)
        self.setup: ChangerSetup | None = None
        self.identity: ChangerIdentity | None = None
        self.features: ChangerFeature = ChangerFeature(0)  # the features we switched on
        self.diagnostic: DiagnosticStatus | None = None
        self.tubes: TubeStatus | None = None
        self.accepted_mask: int | None = None  # None: every coin the changer declares
        self.payout_busy = False  # the latest POLL reported 0x02
        self._last_poll_quiet = False  # the latest POLL was a lone ACK
        self._tubes_stale = False
        self._pending: _PendingPayout | None = None
        self._startups = 0  # completed SETUPs: tells a payout that the changer restarted
        #: coin_type -> the tube count the last reply's "deposited to tube" item carried; an
        #: item with that same count again is a repeat (see ``_is_repeat``). Forgotten when
        #: the tube may have gone down since (a payout, a manual dispense, TUBE STATUS).
        self._last_tube_deposit: dict[int, int] = {}
        self._reply_ns = 0  # the stamp of the POLL reply being parsed

    # --- helpers -----------------------------------------------------------------------

    async def _command(
        self, command: CommandDef, payload: bytes = b"", *, max_attempts: int | None = None
    ) -> Reply:
        return await self.send(command, payload, max_attempts=max_attempts)

    def _need_setup(self) -> ChangerSetup:
        if self.setup is None:
            raise CoinChangerError("coin changer not started up (no SETUP yet)")
        return self.setup

    def coin_value(self, coin_type: int) -> int:
        """Minor units of one coin of this type (0 before SETUP, for unknown types, tokens)."""
        return self.setup.value_of(coin_type) if self.setup is not None else 0

    def change_tubes(self, tubes: TubeStatus | None = None) -> dict[int, tuple[int, int]]:
        """coin_type -> (value, count) of every tube coin, for ``drivers.mdb.change``; from
        ``tubes`` when given, else from the last known counts (which POLL items update)."""
        tubes = tubes or self.tubes
        if self.setup is None or tubes is None:
            return {}
        return {
            c.coin_type: (c.value, tubes.count(c.coin_type))
            for c in self.setup.coins
            if c.routable and c.value > 0
        }

    # --- start-up and enable -----------------------------------------------------------

    async def initialise(self) -> None:
        setup = decode_setup((await self._command(SETUP)).data)
        self.setup = setup
        self._startups += 1
        self._last_tube_deposit.clear()
        self.identity = None
        self.features = ChangerFeature(0)
        self.diagnostic = None
        self.info.level = setup.level
        self.info.details = {
            "currency": setup.currency,
            "currency_iso": setup.currency_iso,
            "scaling": setup.scaling,
            "decimals": setup.decimals,
            "routing": setup.routing,
            "credits": list(setup.credits),
            "coin_values": {c.coin_type: c.value for c in setup.coins},
        }
        if setup.level >= 3:
            identity = decode_expansion_id((await self._command(EXPANSION_ID)).data)
            self.identity = identity
            self.info.manufacturer = identity.manufacturer
            self.info.serial = identity.serial
            self.info.model = identity.model
            self.info.version = identity.version
            wanted = identity.features & SUPPORTED_FEATURES
            await self._command(FEATURE_ENABLE, encode_feature_enable(wanted))
            self.features = wanted
            self.info.details["features"] = int(identity.features)
            if wanted & ChangerFeature.EXTENDED_DIAGNOSTICS:
                diagnostic = await self.diagnostics()
                if not diagnostic.ok:
                    log.warning(
                        "coin: diagnostic status: %s", ", ".join(c.text for c in diagnostic.codes)
                    )
        await self.tube_status()

    def set_accepted(self, mask: int | None) -> None:
        """Which coin types to accept while enabled (bit n = type n; None = all declared).
        Sent with the next COIN TYPE, at the supervisor's next turn."""
        self.accepted_mask = None if mask is None else mask & 0xFFFF
        self._enabled_applied = None  # make the supervisor send COIN TYPE again
        self.nudge()

    async def apply_enable(self, enabled: bool) -> None:
        setup = self._need_setup()
        accept = 0
        if enabled:
            wanted = setup.coin_mask if self.accepted_mask is None else self.accepted_mask
            accept = wanted & setup.coin_mask
        await self._command(COIN_TYPE, encode_coin_type(accept, setup.tube_mask))

    # --- polling -----------------------------------------------------------------------

    def handle_poll_reply(self, reply: Reply) -> list[DeviceEvent]:
        self._last_poll_quiet = not reply.data
        if not reply.data:
            self.payout_busy = False
            return []
        self._reply_ns = reply.reply_ns
        try:
            return self.parse_poll(reply.data)
        finally:
            self._reply_ns = 0

    def parse_poll(self, data: bytes) -> list[DeviceEvent]:
        """Every item of the reply (one reply may carry several) is an event, except an item
        a device fact proves to be a repeat of one already ACKed (``_is_repeat``)."""
        events: list[DeviceEvent] = []
        busy = False
        deposits: dict[int, int] = {}
        for event in decode_poll(data, self.NAME, self.setup):
            if isinstance(event, CoinDeposited):
                if self._is_repeat(event):
                    log.info(
                        "coin: deposit report repeated (tube %d count %d did not grow); "
                        "not a new coin",
                        event.coin_type,
                        event.tube_count,
                    )
                    continue
                self._tube_seen(event.coin_type, event.tube_count)
                if event.route is CoinRoute.TUBES:
                    deposits[event.coin_type] = event.tube_count
                    self._tube_moved(event.coin_type, 1)
            elif isinstance(event, CoinsDispensedManually):
                self._tube_seen(event.coin_type, event.tube_count)
                self._tube_moved(event.coin_type, -event.count)
                self._last_tube_deposit.pop(event.coin_type, None)
            elif isinstance(event, StatusReported) and event.code == STATUS_PAYOUT_BUSY:
                busy = True
            events.append(event)
        # Compared with the next reply only: two items of one reply are two coins whatever
        # their counts (a repeat after a lost ACK is a whole reply sent again).
        self._last_tube_deposit.update(deposits)
        self.payout_busy = busy
        return events

    def _is_repeat(self, event: CoinDeposited) -> bool:
        """mdb.md "Wire": byte-identical replies are normally separate events; only a device
        fact proves a repeat. A coin routed to a tube raises that tube's count, which the item
        carries: an item for the same tube with the same count as the previous reply's, with
        nothing since that could lower the tube, is the changer sending its report again
        after missing our ACK. Cashbox coins carry no such fact and are never dropped."""
        return (
            event.route is CoinRoute.TUBES
            and self._last_tube_deposit.get(event.coin_type) == event.tube_count
        )

    def _tube_seen(self, coin_type: int, count: int) -> None:
        # The item carries the new count; the full flag needs a TUBE STATUS.
        if self.tubes is not None:
            self.tubes = self.tubes.with_count(coin_type, count)
        self._tubes_stale = True

    def _tube_moved(self, coin_type: int, delta: int) -> None:
        pending = self._pending
        # Only a reply received after the payout's baseline TUBE STATUS moves coins against
        # it: an earlier one (a supervisor POLL answered just before, parsed just after) is
        # already in the baseline's counts.
        if pending is not None and self._reply_ns > pending.baseline_ns:
            moves = pending.tube_moves
            moves[coin_type] = moves.get(coin_type, 0) + delta

    def needs_every_poll(self) -> bool:
        # A bare ACK ends a payout-busy report and lets ``after_poll`` refresh stale tubes.
        return self._tubes_stale or self.payout_busy or not self._last_poll_quiet

    async def after_poll(self) -> None:
        # Refresh only after a quiet POLL: a command between a data POLL whose ACK was lost
        # and its retransmission makes some changers report the item again in a different
        # reply, and the tube count it carries is the only proof of a repeat (``_is_repeat``).
        if self._tubes_stale and self._last_poll_quiet and self._pending is None:
            await self.tube_status()

    # --- commands ----------------------------------------------------------------------

    async def tube_status(self) -> TubeStatus:
        status, _reply_ns = await self._read_tube_status()
        return status

    async def _read_tube_status(self) -> tuple[TubeStatus, int]:
        reply = await self._command(TUBE_STATUS)
        status = decode_tube_status(reply.data)
        self.tubes = status
        self._tubes_stale = False
        for coin_type, count in list(self._last_tube_deposit.items()):
            if status.count(coin_type) != count:
                self._last_tube_deposit.pop(coin_type)  # the tube moved since: no proof left
        return status, reply.reply_ns

    async def settle_activity(self, max_polls: int = SETTLE_MAX_POLLS) -> bool:
        """POLL until the changer has nothing more to report (a lone ACK), handing every item
        on as an ordinary event. Before a payout takes its starting tube counts, every coin
        the changer already counted is then reported and credited, not mistaken for a coin
        that moved during the payout. True when the changer fell quiet."""
        for _ in range(max_polls):
            if await self._poll_and_dispatch():
                return False
            if self._last_poll_quiet:
                return True
        log.warning("coin: still reporting after %d POLLs; payout goes on", max_polls)
        return False

    async def diagnostics(self) -> DiagnosticStatus:
        """Level 3: DIAGNOSTIC STATUS."""
        self._need_level3()
        status = decode_diagnostics((await self._command(DIAGNOSTIC_STATUS)).data)
        self.diagnostic = status
        return status

    async def payout_status(self) -> PayoutStatus:
        """Level 3: coins paid by the last PAYOUT (busy while it runs)."""
        self._need_level3()
        return decode_payout_status((await self._command(PAYOUT_STATUS)).data)

    async def payout_value_poll(self) -> PayoutProgress:
        """Level 3: scaled value paid since the last value poll (done when finished)."""
        self._need_level3()
        setup = self._need_setup()
        reply = await self._command(PAYOUT_VALUE_POLL)
        return decode_payout_value_poll(reply.data, setup.scaling)

    def _need_level3(self) -> None:
        if self._need_setup().level < 3:
            raise NotSupported("level-3 command sent to a level-2 coin changer")

    async def _begin_payout(
        self, requested: int, alternative: bool, commanded: Mapping[int, int] | None = None
    ) -> _PendingPayout:
        pending = self._pending
        if pending is None:
            await self.settle_activity()
            baseline, baseline_ns = await self._read_tube_status()
            pending = _PendingPayout(baseline, self._startups, baseline_ns)
            self._pending = pending
            self._last_tube_deposit.clear()  # coins leave the tubes from now on
        pending.requested += requested
        pending.alternative = pending.alternative and alternative
        for coin_type, count in (commanded or {}).items():
            pending.commanded[coin_type] = pending.commanded.get(coin_type, 0) + count
        return pending

    async def dispense(self, coin_type: int, count: int) -> None:
        """DISPENSE ``count`` (1..15) coins of one type. Sent once; then ``wait_payout_done``."""
        payload = encode_dispense(coin_type, count)
        setup = self._need_setup()
        await self._begin_payout(
            count * setup.value_of(coin_type), alternative=False, commanded={coin_type: count}
        )
        await self._command(DISPENSE, payload, max_attempts=1)

    async def payout(self, value: int) -> None:
        """Level 3: pay ``value`` in the changer's scaled units (minor units = value x scaling;
        ``setup.to_scaled`` converts), the changer choosing the coins. Sent once; then
        ``wait_payout_done``."""
        payload = encode_payout(value)
        setup = self._need_setup()
        self._need_level3()
        if not self.features & ChangerFeature.ALTERNATIVE_PAYOUT:
            raise NotSupported("coin changer did not report the alternative payout feature")
        await self._begin_payout(value * setup.scaling, alternative=True)
        await self._command(PAYOUT, payload, max_attempts=1)

    @property
    def payout_pending(self) -> bool:
        return self._pending is not None

    async def wait_payout_done(self, timeout_s: float) -> PayoutResult:
        """Wait for the pending payout to finish and return what it paid.

        Level-3 PAYOUT: PAYOUT VALUE POLL until done, then PAYOUT STATUS. DISPENSE: POLL while
        it reports 0x02 payout busy. Either way TUBE STATUS afterwards. On timeout the result
        has ``finished=False`` (counts so far from the tubes) and the payout stays pending.
        """
        pending = self._pending
        if pending is None:
            return PayoutResult({}, 0, 0, confirmed=True, finished=True)
        setup = self._need_setup()
        deadline = self._clock() + timeout_s
        status: PayoutStatus | None = None
        if pending.alternative:
            status = await self._wait_alternative_payout(deadline)
            finished = status is not None
            if status is not None and await self._reset_since(pending):
                log.warning("coin: changer reset during the payout; using tube counts")
                status = None
        else:
            finished = await self._wait_not_busy(deadline)
        after = await self.tube_status()
        by_tubes = self._tube_difference(pending, after)
        if status is not None:
            counts = {t: n for t in range(COIN_TYPES) if (n := status.count(t)) > 0}
            if counts != by_tubes:
                log.warning("coin: PAYOUT STATUS %s, tube counts say %s", counts, by_tubes)
        else:
            counts = by_tubes
        counts = self._within_command(pending, counts)
        value = sum(setup.value_of(t) * n for t, n in counts.items())
        if finished:
            self._pending = None
        return PayoutResult(counts, value, pending.requested, status is not None, finished)

    async def _wait_ready(self, deadline: float) -> bool:
        """While the supervisor restarts the changer, do not talk to it."""
        while self.state is not DeviceState.READY:
            if self._clock() >= deadline:
                return False
            await asyncio.sleep(self.poll_interval_s)
        return True

    async def _wait_alternative_payout(self, deadline: float) -> PayoutStatus | None:
        while await self._wait_ready(deadline) and self._clock() < deadline:
            progress = await self.payout_value_poll()
            if progress.done:
                status = await self.payout_status()
                if not status.busy:
                    return status
            await asyncio.sleep(self.poll_interval_s)
        return None

    async def _poll_and_dispatch(self) -> bool:
        """One POLL from a payout wait, its events sent on as the supervisor sends them.
        True if the changer reported JUST RESET (then the supervisor starts it up again)."""
        reset = False
        for event in await self.poll_once():
            self.emit(event)
            if isinstance(event, JustReset):
                reset = True
                self._set_state(DeviceState.STARTING, "peripheral reset itself")
        return reset

    async def _reset_since(self, pending: _PendingPayout) -> bool:
        """Did the changer reset since the payout began? Then its PAYOUT STATUS counts are
        the ones it forgot. The supervisor may be restarting it (not READY), have restarted
        it (another SETUP), or have a JUST RESET still to see: one more POLL shows it, here
        or (the supervisor's POLL was served first) in the state once that POLL is answered.
        """
        if self.state is DeviceState.READY and await self._poll_and_dispatch():
            return True
        return self.state is not DeviceState.READY or self._startups != pending.startups

    async def _wait_not_busy(self, deadline: float) -> bool:
        while await self._wait_ready(deadline) and self._clock() < deadline:
            await self._poll_and_dispatch()
            if self._last_poll_quiet:
                return True
            await asyncio.sleep(self.poll_interval_s)
        return False

    def _within_command(self, pending: _PendingPayout, counts: dict[int, int]) -> dict[int, int]:
        """A payout never counts more than was commanded: DISPENSE pays only its type and at
        most its count; PAYOUT at most its value. More than that is a miscount (a late item,
        a tube sensor's error), not money out: log it as a fault and leave the difference
        to reconciliation of the tube counts."""
        setup = self._need_setup()
        bounded = dict(counts)
        if not pending.alternative:
            bounded = {
                t: min(n, pending.commanded.get(t, 0))
                for t, n in counts.items()
                if pending.commanded.get(t, 0) > 0
            }
        else:
            bounded = coins_within(counts, pending.requested, setup.value_of)
        if bounded != counts:
            log.error(
                "coin: payout counted %s, more than commanded (%s, %d minor units); "
                "recording %s, the rest is left to reconciliation",
                counts,
                pending.commanded or "PAYOUT",
                pending.requested,
                bounded,
            )
        return bounded

    @staticmethod
    def _tube_difference(pending: _PendingPayout, after: TubeStatus) -> dict[int, int]:
        counts: dict[int, int] = {}
        for t in range(COIN_TYPES):
            paid = pending.baseline.count(t) - after.count(t) + pending.tube_moves.get(t, 0)
            if paid > 0:
                counts[t] = paid
        return counts

    async def pay_out(
        self, plan: Mapping[int, int], timeout_s: float = DISPENSE_WAIT_S
    ) -> PayoutResult:
        """Pay a plan (coin_type -> count, e.g. from ``plan_change``) with DISPENSE, up to 15
        coins a command, waiting for each; stops at the first command that pays short or
        does not finish in ``timeout_s``."""
        counts: dict[int, int] = {}
        requested = sum(self.coin_value(t) * n for t, n in plan.items())
        value = 0
        for coin_type, total in sorted(plan.items()):
            left = total
            while left > 0:
                chunk = min(left, MAX_DISPENSE_COUNT)
                try:
                    await self.dispense(coin_type, chunk)
                except MdbError as exc:  # taken or not: the tubes will tell
                    log.warning("coin: DISPENSE %d x type %d: %s", chunk, coin_type, exc)
                result = await self.wait_payout_done(timeout_s)
                for t, n in result.counts.items():
                    counts[t] = counts.get(t, 0) + n
                value += result.value
                if not result.finished or result.counts.get(coin_type, 0) < chunk:
                    return PayoutResult(counts, value, requested, False, result.finished)
                left -= chunk
        return PayoutResult(counts, value, requested, False, True)
