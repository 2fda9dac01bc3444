"""A simulated MDB cashless reader (levels 1-3) with a simple card model.

Built on the driver's own tables and codecs (``drivers.mdb.cashless``): the same
``CommandTable`` delimits the VMC's blocks (standard or expanded-currency form, switched when the
VMC enables 32-bit money or multi-currency), and every reply item is encoded by the functions
the VMC decodes with.

Reader states (MDB 4.2 §7): INACTIVE (after reset) -> SETUP config -> DISABLED ->
READER ENABLE -> ENABLED -> card (BEGIN SESSION) -> SESSION IDLE -> VEND REQUEST -> VEND ->
VEND SUCCESS / FAILURE -> SESSION IDLE -> SESSION COMPLETE -> END SESSION -> ENABLED.
A command the present state does not allow is answered with COMMAND OUT OF SEQUENCE (0B).
VEND REQUEST is ACKed; VEND APPROVED / DENIED follows in a later POLL.

Controls (``control(dict)``, JSON-able both ways):

* ``{"cmd": "tap", "funds": 500}``: a card with 5.00 (minor units; ``null``: funds not known)
  begins a session; ``"repeat": true`` sends BEGIN SESSION twice (as some readers do);
* ``{"cmd": "set_approval", "approve": false}``: approve or deny the next vends;
* ``{"cmd": "cancel"}``: the customer cancels (SESSION CANCEL REQUEST);
* ``{"cmd": "malfunction", "code": 128}``: report a malfunction (0x80: reader failure);
* ``{"cmd": "display", "text": "HELLO", "seconds": 2.0}``: a DISPLAY REQUEST;
* ``{"cmd": "state"}``: the reader's state, session and negotiated format.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from drivers.mdb.block import COMMAND_MASK, CommandReceived, LengthOf
from drivers.mdb.cashless import (
    CASHLESS1_ADDRESS,
    CASHLESS2_ADDRESS,
    CMD_EXPANSION,
    CMD_POLL,
    CMD_READER,
    CMD_REVALUE,
    CMD_SETUP,
    CMD_VEND,
    EXPANDED_FEATURES,
    Feature,
    Identity,
    ItemPrice,
    PollCode,
    PriceLimits,
    ReaderConfig,
    ReaderOption,
    ReaderStatus,
    SessionMedia,
    VmcSetup,
    WireFormat,
    command_table,
    decode_amount,
    decode_features,
    encode_begin_session,
    encode_display_request,
    encode_malfunction,
    encode_money_item,
    encode_out_of_sequence,
    encode_peripheral_id,
    item,
)
from drivers.mdb.commands import CommandTable
from hil.sim.peripheral import SimPeripheral


class ReaderState(enum.Enum):
    INACTIVE = "inactive"
    DISABLED = "disabled"
    ENABLED = "enabled"
    SESSION_IDLE = "session idle"
    VEND = "vend"


@dataclass(slots=True)
class PendingVend:
    """A VEND (or NEGATIVE VEND) REQUEST being handled: raw scaled price."""

    price_raw: int
    item: int
    negative: bool = False
    approved: bool | None = None  # None until the reader decided


@dataclass(slots=True)
class CashlessLedger:
    """What happened to the customer's money, for comparison with the VMC's journal.
    Amounts in minor units."""

    sessions: int = 0
    vends_requested: int = 0
    vends_approved: int = 0
    vends_denied: int = 0
    vends_succeeded: int = 0
    vends_failed: int = 0
    vends_cancelled: int = 0
    amount_approved: int = 0
    amount_charged: int = 0
    negative_vends: int = 0
    amount_refunded: int = 0
    customer_cancellations: int = 0
    reader_cancels: int = 0
    cash_sales: int = 0
    cash_sale_amount: int = 0
    revalues: int = 0
    amount_revalued: int = 0
    out_of_sequence: int = 0
    items_charged: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in CashlessLedger.__dataclass_fields__}
        out["items_charged"] = list(self.items_charged)
        return out


class CashlessReaderSim(SimPeripheral):
    """Cashless reader #1 (0x10). ``inline=False`` makes it answer SETUP config, EXPANSION
    REQUEST ID and READER CANCEL with a lone ACK and report the data in the next POLL, as some
    readers do; ``auto_end_session`` makes it end the session by itself after a vend outcome
    (the VMC's SESSION COMPLETE then comes too late, and it must cope); with
    ``sends_end_session=False`` it ends sessions without ever reporting END SESSION."""

    NAME = "cashless"
    ADDRESS = CASHLESS1_ADDRESS
    POLL_CMD = CMD_POLL
    JUST_RESET_ITEM = bytes((PollCode.JUST_RESET,))

    def __init__(
        self,
        *,
        level: int = 3,
        currency_code: int = 0x1978,
        scaling: int = 5,
        decimals: int = 2,
        max_response_s: int = 5,
        options: ReaderOption = ReaderOption.REFUNDS | ReaderOption.CASH_SALE,
        features: Feature = Feature.MONEY_32BIT | Feature.NEGATIVE_VEND | Feature.ALWAYS_IDLE,
        identity: Identity | None = None,
        inline: bool = True,
        auto_end_session: bool = False,
        sends_end_session: bool = True,
        revalue_limit: int = 0,
    ) -> None:
        if level not in (1, 2, 3):
            raise ValueError(f"level={level}: must be 1, 2 or 3")
        if not 1 <= scaling <= 0xFF:
            raise ValueError(f"scaling={scaling}: must be 1..255")
        self.config = ReaderConfig(
            level, currency_code, scaling, decimals, max_response_s, ReaderOption(options)
        )
        self.features_offered = Feature(features)
        self.identity = identity or Identity("SIM", "CL0000000001", "cashless-sim", 0x0100)
        self.inline = inline
        self.auto_end_session = auto_end_session
        self.sends_end_session = sends_end_session
        self.revalue_limit_raw = revalue_limit // scaling
        self.approve = True
        self.the_ledger = CashlessLedger()
        self._tables = {
            False: command_table(self.ADDRESS, expanded=False),
            True: command_table(self.ADDRESS, expanded=True),
        }
        # Set-up state; on_reset (called by the base constructor) gives the real values.
        self.state = ReaderState.INACTIVE
        self.vmc_setup = VmcSetup(1)
        self.vmc_identity: Identity | None = None
        self.prices: PriceLimits | None = None
        self.features_enabled = Feature(0)
        self.funds_raw: int | None = None
        self.vend: PendingVend | None = None
        self._disable_after_session = False
        super().__init__(self._tables[False])

    # --- negotiated format -----------------------------------------------------------------

    @property
    def format(self) -> WireFormat:
        with self.lock:
            return WireFormat(
                level=min(self.config.level, self.vmc_setup.level),
                expanded=bool(self.features_enabled & EXPANDED_FEATURES),
                scaling=self.config.scaling,
                display_size=self.vmc_setup.columns * self.vmc_setup.rows,
            )

    def current_table(self) -> CommandTable:
        with self.lock:
            return self._tables[bool(self.features_enabled & EXPANDED_FEATURES)]

    def length_of(self) -> LengthOf:
        """Block lengths follow the money format in force when the block arrives."""

        def length(block: bytes) -> int | None:
            return self.current_table().length_of()(block)

        return length

    # --- SimPeripheral hooks -----------------------------------------------------------------

    def on_reset(self) -> None:
        self.state = ReaderState.INACTIVE
        self.vmc_setup = VmcSetup(1)
        self.vmc_identity = None
        self.prices = None
        self.features_enabled = Feature(0)
        self.funds_raw = None
        self.vend = None
        self._disable_after_session = False
        self.table = self._tables[False]

    def handle(self, command: CommandReceived) -> bytes | None:
        cmd = command.addr_cmd & COMMAND_MASK
        data = command.data
        sub = data[0] if data else -1
        payload = data[1:]
        if cmd == CMD_SETUP:
            return self._setup(sub, payload)
        if self.state is ReaderState.INACTIVE and cmd != CMD_EXPANSION:
            return self._out_of_sequence()
        if cmd == CMD_VEND:
            return self._vend(sub, payload)
        if cmd == CMD_READER:
            return self._reader(sub)
        if cmd == CMD_REVALUE:
            return self._revalue(sub, payload)
        if cmd == CMD_EXPANSION:
            return self._expansion(sub, payload)
        return None  # a real reader ignores what it does not know

    # --- commands --------------------------------------------------------------------------

    def _setup(self, sub: int, payload: bytes) -> bytes | None:
        if sub == 0x00:
            if self.state in (ReaderState.SESSION_IDLE, ReaderState.VEND):
                return self._out_of_sequence()
            self.vmc_setup = VmcSetup.decode(payload)
            if self.state is ReaderState.INACTIVE:
                self.state = ReaderState.DISABLED
            return self._answer(self.config.encode())
        if sub == 0x01:
            self.prices = PriceLimits.decode(payload, self.format.expanded)
            return b""
        return None

    def _vend(self, sub: int, payload: bytes) -> bytes | None:
        fmt = self.format
        if sub in (0x00, 0x06):  # VEND REQUEST, NEGATIVE VEND REQUEST
            request = ItemPrice.decode(payload, fmt.expanded)
            negative = sub == 0x06
            always_idle = bool(self.features_enabled & Feature.ALWAYS_IDLE)
            if negative and not self.features_enabled & Feature.NEGATIVE_VEND:
                return self._out_of_sequence()
            if self.state is ReaderState.ENABLED and always_idle and not negative:
                self.the_ledger.sessions += 1  # selection first: the vend opens the session
                self.funds_raw = None
            elif self.state is not ReaderState.SESSION_IDLE:
                return self._out_of_sequence()
            self.state = ReaderState.VEND
            self.vend = PendingVend(request.price, request.item, negative)
            self.the_ledger.vends_requested += 1
            self._decide_vend(fmt)
            return b""
        if sub == 0x01:  # VEND CANCEL: the reader answers VEND DENIED
            if self.state is not ReaderState.VEND or self.vend is None:
                return self._out_of_sequence()
            self._withdraw_vend_items()
            self.the_ledger.vends_cancelled += 1
            self.vend = None
            self.state = ReaderState.SESSION_IDLE
            self.queue_item(item(PollCode.VEND_DENIED))
            return b""
        if sub == 0x02:  # VEND SUCCESS
            vend = self.vend
            if self.state is not ReaderState.VEND or vend is None or not vend.approved:
                return self._out_of_sequence()
            amount = vend.price_raw * self.config.scaling
            if vend.negative:
                self.the_ledger.amount_refunded += amount
                if self.funds_raw is not None:
                    self.funds_raw += vend.price_raw
            else:
                self.the_ledger.vends_succeeded += 1
                self.the_ledger.amount_charged += amount
                self.the_ledger.items_charged.append(int.from_bytes(payload[:2], "big"))
                if self.funds_raw is not None:
                    self.funds_raw -= vend.price_raw
            self._after_vend()
            return b""
        if sub == 0x03:  # VEND FAILURE: nothing is charged
            if self.state is not ReaderState.VEND or self.vend is None:
                return self._out_of_sequence()
            self.the_ledger.vends_failed += 1
            self._after_vend()
            return b""
        if sub == 0x04:  # SESSION COMPLETE
            if self.state is not ReaderState.SESSION_IDLE:
                return self._out_of_sequence()
            self._end_session()
            return b""
        if sub == 0x05:  # CASH SALE: audit only
            sale = ItemPrice.decode(payload, fmt.expanded, with_currency=True)
            self.the_ledger.cash_sales += 1
            self.the_ledger.cash_sale_amount += sale.price * self.config.scaling
            return b""
        return None

    def _decide_vend(self, fmt: WireFormat) -> None:
        vend = self.vend
        assert vend is not None
        covered = vend.negative or self.funds_raw is None or vend.price_raw <= self.funds_raw
        vend.approved = self.approve and covered
        if vend.approved:
            if vend.negative:
                self.the_ledger.negative_vends += 1
            else:
                self.the_ledger.vends_approved += 1
                self.the_ledger.amount_approved += vend.price_raw * self.config.scaling
            self.queue_item(encode_money_item(PollCode.VEND_APPROVED, fmt, vend.price_raw))
        else:
            self.the_ledger.vends_denied += 1
            self.vend = None
            self.state = ReaderState.SESSION_IDLE
            self.queue_item(item(PollCode.VEND_DENIED))
            if self.auto_end_session:
                self._end_session()

    def _withdraw_vend_items(self) -> None:
        """VEND CANCEL before the VMC took the outcome: forget this vend's queued APPROVED
        (the last one queued; an earlier vend's may still be waiting for a POLL)."""
        for index in range(len(self.poll_items) - 1, -1, -1):
            if self.poll_items[index][0] == PollCode.VEND_APPROVED:
                del self.poll_items[index]
                return

    def _after_vend(self) -> None:
        self.vend = None
        self.state = ReaderState.SESSION_IDLE
        if self.auto_end_session:
            self._end_session()

    def _end_session(self) -> None:
        if self.sends_end_session:
            self.queue_item(item(PollCode.END_SESSION))
        self.funds_raw = None
        self.vend = None
        if self._disable_after_session:
            self._disable_after_session = False
            self.state = ReaderState.DISABLED
        else:
            self.state = ReaderState.ENABLED

    def _reader(self, sub: int) -> bytes | None:
        in_session = self.state in (ReaderState.SESSION_IDLE, ReaderState.VEND)
        if sub == 0x00:  # DISABLE: a session in progress runs to its end first
            if in_session:
                self._disable_after_session = True
            else:
                self.state = ReaderState.DISABLED
            return b""
        if sub == 0x01:  # ENABLE
            self._disable_after_session = False
            if self.state is ReaderState.DISABLED:
                self.state = ReaderState.ENABLED
            return b""
        if sub == 0x02:  # CANCEL: stop what the reader is doing; it answers CANCELLED
            self.the_ledger.reader_cancels += 1
            return self._answer(item(PollCode.CANCELLED))
        if sub == 0x03:  # DATA ENTRY RESPONSE: taken, not used
            return b""
        return None

    def _revalue(self, sub: int, payload: bytes) -> bytes | None:
        fmt = self.format
        if sub == 0x00:
            if self.state is not ReaderState.SESSION_IDLE:
                return self._out_of_sequence()
            amount_raw = decode_amount(payload)
            funds = self.funds_raw or 0
            if funds + amount_raw <= self.revalue_limit_raw:
                self.funds_raw = funds + amount_raw
                self.the_ledger.revalues += 1
                self.the_ledger.amount_revalued += amount_raw * self.config.scaling
                self.queue_item(item(PollCode.REVALUE_APPROVED))
            else:
                self.queue_item(item(PollCode.REVALUE_DENIED))
            return b""
        if sub == 0x01:
            room = max(self.revalue_limit_raw - (self.funds_raw or 0), 0)
            self.queue_item(encode_money_item(PollCode.REVALUE_LIMIT, fmt, room))
            return b""
        return None

    def _expansion(self, sub: int, payload: bytes) -> bytes | None:
        if sub == 0x00:  # REQUEST ID: the VMC's identity in, ours out
            self.vmc_identity = Identity.decode(payload)
            features = self.features_offered if self.format.level >= 3 else None
            own = Identity(
                self.identity.manufacturer,
                self.identity.serial,
                self.identity.model,
                self.identity.version_bcd,
                features,
            )
            return self._answer(encode_peripheral_id(own))
        if self.state is ReaderState.INACTIVE:
            return self._out_of_sequence()
        if sub == 0x04:  # OPTIONAL FEATURE ENABLE (level 3)
            if self.format.level < 3:
                return self._out_of_sequence()
            self.features_enabled = decode_features(payload) & self.features_offered
            self.table = self.current_table()
            return b""
        if sub == 0x03:  # WRITE TIME/DATE
            return b""
        return None

    def _answer(self, data: bytes) -> bytes:
        """A reply the reader gives inline, or (``inline=False``) ACKs and reports at POLL."""
        if self.inline:
            return data
        self.queue_item(data)
        return b""

    def _out_of_sequence(self) -> bytes:
        self.the_ledger.out_of_sequence += 1
        status = {
            ReaderState.INACTIVE: ReaderStatus.INACTIVE,
            ReaderState.DISABLED: ReaderStatus.DISABLED,
        }.get(self.state, ReaderStatus.ENABLED)
        return encode_out_of_sequence(self.format, status)

    # --- controls --------------------------------------------------------------------------

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            cmd = request.get("cmd")
            if cmd == "tap":
                return self._tap(request.get("funds"), bool(request.get("repeat", False)))
            if cmd == "set_approval":
                self.approve = bool(request["approve"])
                return {"approve": self.approve}
            if cmd == "cancel":
                if self.state is not ReaderState.SESSION_IDLE:
                    return {"accepted": False, "state": self.state.value}
                self.the_ledger.customer_cancellations += 1
                self.queue_item(item(PollCode.SESSION_CANCEL_REQUEST))
                return {"accepted": True, "state": self.state.value}
            if cmd == "malfunction":
                code = int(request["code"])
                if not 0 <= code <= 0xFF:
                    raise ValueError(f"malfunction code {code}: must be 0..255")
                self.queue_item(encode_malfunction(code))
                return {"queued": True}
            if cmd == "display":
                return self._display(str(request["text"]), float(request.get("seconds", 2.0)))
            if cmd == "state":
                return self._state_dict()
            raise KeyError(f"{self.NAME}: unknown control {cmd!r}")

    def _tap(self, funds: int | None, repeat: bool) -> dict[str, Any]:
        if self.state is not ReaderState.ENABLED:
            return {"accepted": False, "state": self.state.value}
        fmt = self.format
        if funds is None:
            funds_raw = fmt.money_unknown
            self.funds_raw = None
        else:
            if funds < 0:
                raise ValueError(f"funds={funds}: must not be negative")
            funds_raw = min(int(funds) // self.config.scaling, fmt.money_unknown - 1)
            self.funds_raw = funds_raw
        begin = encode_begin_session(
            fmt,
            funds_raw,
            SessionMedia(media_id=0x12345678, currency_code=self.config.currency_code),
        )
        self.queue_item(begin)
        if repeat:
            self.queue_item(begin)
        self.state = ReaderState.SESSION_IDLE
        self.the_ledger.sessions += 1
        return {"accepted": True, "state": self.state.value}

    def _display(self, text: str, seconds: float) -> dict[str, Any]:
        size = self.format.display_size
        if size == 0:
            return {"accepted": False, "reason": "the VMC reported no display"}
        body = text.encode("latin-1", errors="replace")[:size].ljust(size, b" ")
        tenths = max(0, min(round(seconds * 10), 0xFF))
        self.queue_item(encode_display_request(tenths, body))
        return {"accepted": True}

    def _state_dict(self) -> dict[str, Any]:
        fmt = self.format
        return {
            "state": self.state.value,
            "funds_raw": self.funds_raw,
            "vend": None
            if self.vend is None
            else {
                "price_raw": self.vend.price_raw,
                "item": self.vend.item,
                "negative": self.vend.negative,
                "approved": self.vend.approved,
            },
            "level": fmt.level,
            "expanded": fmt.expanded,
            "features_enabled": int(self.features_enabled),
            "vmc_level": self.vmc_setup.level,
            "prices": None
            if self.prices is None
            else {"max": self.prices.max_price, "min": self.prices.min_price},
            "vmc_identity": None
            if self.vmc_identity is None
            else {
                "manufacturer": self.vmc_identity.manufacturer,
                "serial": self.vmc_identity.serial,
                "model": self.vmc_identity.model,
            },
        }

    def ledger(self) -> dict[str, Any]:
        with self.lock:
            return self.the_ledger.as_dict()


class CashlessReader2Sim(CashlessReaderSim):
    """Cashless reader #2 (0x60)."""

    NAME = "cashless2"
    ADDRESS = CASHLESS2_ADDRESS
