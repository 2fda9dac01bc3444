"""Cashless reader: tables, codecs (golden vectors, hypothesis round trips), the simulator's state
machine, and the VMC's ``CashlessReader`` against ``CashlessReaderSim`` over a real pty."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import drivers.mdb.device
from drivers.errors import MdbError
from drivers.mdb.block import ACK, CommandReceived, command_block, reply_block, split_checked
from drivers.mdb.cashless import (
    CASHLESS1_ADDRESS,
    CASHLESS2_ADDRESS,
    CMD_VEND,
    EXPANDED_COMMANDS,
    STANDARD_COMMANDS,
    BeginSession,
    CashlessReader,
    CashlessReader2,
    CashlessSettings,
    Cmd,
    CommandOutOfSequence,
    DataEntryCancel,
    DataEntryRequest,
    DiagnosticsResponse,
    DisplayRequest,
    EndSession,
    Feature,
    FtlMessage,
    Identity,
    InvalidSettings,
    ItemPrice,
    PeripheralId,
    PollCode,
    PriceLimits,
    PriceNotRepresentable,
    ReaderCancelled,
    ReaderConfig,
    ReaderConfigReported,
    ReaderMalfunction,
    ReaderOption,
    ReaderStatus,
    RevalueApproved,
    RevalueDenied,
    RevalueLimit,
    SessionCancelRequest,
    SessionMedia,
    SessionPhase,
    SessionStateError,
    TimeDateRequest,
    UserFileData,
    VendApproved,
    VendDenied,
    VmcSetup,
    WireFormat,
    command_table,
    decode_amount,
    decode_features,
    decode_poll,
    encode_amount,
    encode_begin_session,
    encode_data_entry_request,
    encode_display_request,
    encode_features,
    encode_malfunction,
    encode_money_item,
    encode_out_of_sequence,
    encode_peripheral_id,
    encode_user_file,
    item,
)
from drivers.mdb.commands import CommandDef
from drivers.mdb.device import DeviceEvent, DeviceState, JustReset, StateChanged, StatusReported
from drivers.mdb.master import DEFAULT_MAX_ATTEMPTS
from hil.sim.cashless import CashlessReader2Sim, CashlessReaderSim
from tests.mdb_harness import sim_and_master
from tests.waiting import stop_task, wait_until

# --- shared helpers -----------------------------------------------------------------------------

#: Poll cadence in pty tests: fast, so the tests are short; the MDB cadence is 100-200 ms.
POLL_S = 0.01
#: Longest wait for an event or a state in pty tests: generous for a loaded CI machine; a
#: passing test waits only as long as the exchange takes.
WAIT_S = 5.0
#: How often waiting helpers look again.
STEP_S = 0.005
#: Scheduling slack for the bus master in these tests. On a loaded 2-core machine the line and
#: simulator threads are sometimes descheduled for tens of ms; a reply that comes late gets
#: the command retransmitted, and the late copy can then be taken for the answer to the next
#: command. These tests check the protocol, not timing (the benchmark measures that), so they
#: allow for it; fault tests still see timeouts, only slower.
LOADED_SLACK_S = 0.25
#: The PAX reader's SETUP config reply from the captured Necta session (mdb.md "Cashless").
PAX_CONFIG = dict(
    level=1,
    currency_code=0x1643,
    scaling=1,
    decimals=2,
    max_response_s=45,
    options=ReaderOption.REFUNDS | ReaderOption.DISPLAY,
)

E = TypeVar("E", bound=DeviceEvent)


class Recorder:
    """Collects the events a device emits, and waits for them."""

    def __init__(self) -> None:
        self.events: list[DeviceEvent] = []

    def __call__(self, event: DeviceEvent) -> None:
        self.events.append(event)

    def mark(self) -> int:
        return len(self.events)

    def of(self, cls: type[E], since: int = 0) -> list[E]:
        return [e for e in self.events[since:] if isinstance(e, cls)]

    async def wait_for(
        self, cls: type[E], since: int = 0, where: Callable[[E], bool] = lambda e: True
    ) -> E:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while True:
            for event in self.events[since:]:
                if isinstance(event, cls) and where(event):
                    return event
            if loop.time() > deadline:
                raise AssertionError(f"no {cls.__name__} after {since}: {self.events[since:]}")
            await asyncio.sleep(STEP_S)


def ready(device: CashlessReader) -> Callable[[], bool]:
    return lambda: device.state is DeviceState.READY


def session_of(device: CashlessReader) -> SessionPhase:
    """The device's session phase, read afresh (it changes while we await)."""
    return device.session


async def tap(sim: CashlessReaderSim, funds: int | None, *, repeat: bool = False) -> None:
    """Present a card once the reader is enabled (it refuses cards otherwise)."""
    await wait_until(lambda: sim_state(sim)["state"] == "enabled", f"{sim.NAME} enabled")
    result = sim.control({"cmd": "tap", "funds": funds, "repeat": repeat})
    assert result["accepted"], result


def sim_state(sim: CashlessReaderSim) -> dict[str, Any]:
    return sim.control({"cmd": "state"})


@contextlib.asynccontextmanager
async def running(
    sims: list[CashlessReaderSim],
    readers: list[tuple[type[CashlessReader], CashlessSettings | None]],
    *,
    enable: bool = True,
) -> AsyncIterator[tuple[list[CashlessReader], Recorder]]:
    """Simulators on a real pty, the VMC's readers started up on a real BusMaster."""
    async with sim_and_master(list(sims), slack_s=LOADED_SLACK_S) as (master, _bus):
        recorder = Recorder()
        devices = [
            cls(master, poll_interval_s=POLL_S, on_event=recorder, settings=s) for cls, s in readers
        ]
        tasks = []
        for device in devices:
            device.set_enabled(enable)
            tasks.append(asyncio.create_task(device.run(), name=f"run-{device.NAME}"))
        try:
            for device in devices:
                await wait_until(ready(device), f"{device.NAME} READY")
            yield devices, recorder
        finally:
            for task in tasks:
                await stop_task(task)


@contextlib.asynccontextmanager
async def one_reader(
    sim: CashlessReaderSim | None = None, settings: CashlessSettings | None = None
) -> AsyncIterator[tuple[CashlessReader, CashlessReaderSim, Recorder]]:
    sim = sim or CashlessReaderSim()
    async with running([sim], [(CashlessReader, settings)]) as (devices, recorder):
        yield devices[0], sim, recorder


@pytest.fixture
def fast_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real VMCs wait ~500 ms after RESET; the simulator is ready at once."""
    monkeypatch.setattr(drivers.mdb.device, "RESET_SETTLE_S", 0.01)


def answer(sim: CashlessReaderSim, block: bytes) -> bytes | None:
    """One exchange with the simulator without a bus: the command, then our ACK to data."""
    reply = sim.answer(CommandReceived(block))
    if reply:
        sim.control_word(ACK)
    return reply


def request_block(cmd: CommandDef, payload: bytes = b"", address: int = CASHLESS1_ADDRESS) -> bytes:
    addr_cmd, data = cmd.request(address, payload)
    return bytes((addr_cmd,)) + data


# --- golden vectors (mdb.md: a real Necta VMC / PAX reader session) ------------------------------


def test_golden_setup_config_request() -> None:
    block = command_block(*Cmd.SETUP_CONFIG.request(0x10, VmcSetup(2, 0, 0, 2).encode()))
    assert block == bytes.fromhex("11 00 02 00 00 02 15")


def test_golden_setup_config_reply_decodes() -> None:
    wire = bytes.fromhex("01 01 16 43 01 02 2D 05 90")
    data = split_checked(wire)  # the CHK checks: 8 data bytes Z1-Z8, then CHK
    assert len(data) == 8
    [event] = decode_poll(data, WireFormat())
    assert isinstance(event, ReaderConfigReported)
    assert event.config == ReaderConfig(**PAX_CONFIG)  # type: ignore[arg-type]
    assert event.config.iso4217 == 643  # 0x1643: ISO 4217 "643" (rouble), Russian capture
    assert event.config.max_response_s == 45
    assert reply_block(ReaderConfig(**PAX_CONFIG).encode()) == wire  # type: ignore[arg-type]


def test_golden_session_through_the_simulator() -> None:
    """The captured exchange, replayed against the simulator configured as that PAX reader."""
    sim = CashlessReaderSim(**PAX_CONFIG)  # type: ignore[arg-type]
    assert answer(sim, b"\x12") == b"\x00"  # JUST RESET
    reply = answer(sim, split_checked(bytes.fromhex("11 00 02 00 00 02 15")))
    assert reply is not None and reply_block(reply) == bytes.fromhex("01 01 16 43 01 02 2D 05 90")
    assert answer(sim, request_block(Cmd.READER_ENABLE)) == b""
    assert sim.control({"cmd": "tap", "funds": 100})["accepted"]
    assert answer(sim, b"\x12") == bytes.fromhex("03 00 64")  # level 1 BEGIN SESSION
    assert answer(sim, split_checked(bytes.fromhex("13 00 00 0A 00 06 23"))) == b""
    approved = answer(sim, b"\x12")
    assert approved is not None and reply_block(approved) == bytes.fromhex("05 00 0A 0F")
    assert answer(sim, split_checked(bytes.fromhex("13 02 00 06 1B"))) == b""
    assert answer(sim, split_checked(bytes.fromhex("13 04 17"))) == b""
    end = answer(sim, b"\x12")
    assert end is not None and reply_block(end) == bytes.fromhex("07 07")
    assert sim.ledger()["amount_charged"] == 10
    assert sim.ledger()["items_charged"] == [6]


def test_golden_vend_commands() -> None:
    request = Cmd.VEND_REQUEST.request(0x10, ItemPrice(10, 6).encode(False))
    assert command_block(*request) == bytes.fromhex("13 00 00 0A 00 06 23")
    assert ItemPrice.decode(request[1][1:], False) == ItemPrice(10, 6)
    success = command_block(*Cmd.VEND_SUCCESS.request(0x10, (6).to_bytes(2, "big")))
    assert success == bytes.fromhex("13 02 00 06 1B")
    assert command_block(*Cmd.SESSION_COMPLETE.request(0x10)) == bytes.fromhex("13 04 17")
    fmt = WireFormat(level=1)
    approved = encode_money_item(PollCode.VEND_APPROVED, fmt, 10)
    assert reply_block(approved) == bytes.fromhex("05 00 0A 0F")
    assert decode_poll(approved, fmt) == [VendApproved("cashless", 10, 10)]
    assert reply_block(item(PollCode.END_SESSION)) == bytes.fromhex("07 07")
    assert decode_poll(b"\x07", fmt) == [EndSession("cashless")]


# --- tables -------------------------------------------------------------------------------------


@pytest.mark.parametrize("expanded", [False, True])
@pytest.mark.parametrize("address", [CASHLESS1_ADDRESS, CASHLESS2_ADDRESS])
def test_table_delimits_every_command(expanded: bool, address: int) -> None:
    table = command_table(address, expanded=expanded)
    length_of = table.length_of()
    for cmd in EXPANDED_COMMANDS if expanded else STANDARD_COMMANDS:
        block = request_block(cmd, bytes(cmd.data_len - (cmd.sub is not None)), address)
        assert len(block) == 1 + cmd.data_len
        assert table.lookup(block) == cmd
        assert length_of(block[:2] if cmd.sub is not None else block[:1]) == len(block)
        assert len(command_block(block[0], block[1:])) <= 36


def test_money_fields_grow_in_expanded_mode() -> None:
    assert Cmd.VEND_REQUEST_X.data_len - Cmd.VEND_REQUEST.data_len == 2
    assert Cmd.SETUP_PRICES_X.data_len == 1 + 4 + 4 + 2
    assert Cmd.CASH_SALE_X.data_len == 1 + 4 + 2 + 2
    assert Cmd.REVALUE_REQUEST_X.data_len == 1 + 4


def test_request_with_wrong_payload_length_is_refused() -> None:
    with pytest.raises(MdbError):
        Cmd.VEND_REQUEST.request(0x10, b"\x00\x0a")


# --- hypothesis round trips: the simulator's encoders vs the VMC's decoders ----------------------

levels = st.integers(1, 3)
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
ascii_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12
).map(str.strip)


@st.composite
def wire_formats(draw: st.DrawFn) -> WireFormat:
    expanded = draw(st.booleans())
    level = 3 if expanded else draw(levels)
    return WireFormat(level, expanded, draw(st.integers(1, 0xFF)), draw(st.integers(0, 32)))


@given(levels, u16, st.integers(1, 0xFF), u8, u8, st.integers(0, 0x0F))
def test_reader_config_round_trip(
    level: int, currency: int, scaling: int, decimals: int, max_s: int, options: int
) -> None:
    config = ReaderConfig(level, currency, scaling, decimals, max_s, ReaderOption(options))
    assert ReaderConfig.decode(config.encode()) == config
    assert decode_poll(config.encode(), WireFormat()) == [ReaderConfigReported("cashless", config)]


@given(levels, u8, u8, u8)
def test_vmc_setup_round_trip(level: int, columns: int, rows: int, info: int) -> None:
    setup = VmcSetup(level, columns, rows, info)
    assert VmcSetup.decode(setup.encode()) == setup


@given(st.booleans(), u32, u32, u16)
def test_price_limits_round_trip(expanded: bool, high: int, low: int, currency: int) -> None:
    if not expanded:
        high, low = high & 0xFFFF, low & 0xFFFF
    limits = PriceLimits(high, low, currency if expanded else None)
    encoded = limits.encode(expanded)
    assert len(encoded) == (Cmd.SETUP_PRICES_X if expanded else Cmd.SETUP_PRICES).data_len - 1
    assert PriceLimits.decode(encoded, expanded) == limits


@given(st.booleans(), st.booleans(), u32, u16, u16)
def test_item_price_round_trip(
    expanded: bool, with_currency: bool, price: int, number: int, currency: int
) -> None:
    if not expanded:
        price &= 0xFFFF
    request = ItemPrice(price, number, currency if expanded and with_currency else None)
    encoded = request.encode(expanded, with_currency)
    assert ItemPrice.decode(encoded, expanded, with_currency) == request


@given(st.booleans(), u32)
def test_amount_and_features_round_trip(expanded: bool, value: int) -> None:
    raw = value if expanded else value & 0xFFFF
    assert decode_amount(encode_amount(raw, expanded)) == raw
    assert decode_features(encode_features(Feature(value & 0x3F))) == Feature(value & 0x3F)


@given(
    ascii_text.map(lambda s: s[:3]),
    ascii_text,
    ascii_text,
    u16,
    st.none() | st.integers(0, 0x3F).map(Feature),
)
def test_identity_round_trip(
    manufacturer: str, serial: str, model: str, version: int, features: Feature | None
) -> None:
    identity = Identity(manufacturer, serial, model, version, features)
    assert Identity.decode(identity.encode()) == identity
    fmt = WireFormat(level=3 if features is not None else 2)
    assert decode_poll(encode_peripheral_id(identity), fmt) == [PeripheralId("cashless", identity)]


@st.composite
def poll_items(draw: st.DrawFn, fmt: WireFormat) -> tuple[bytes, DeviceEvent]:
    """One POLL item the simulator can send, and the event the VMC must decode from it."""
    dev = "cashless"
    money = st.integers(0, fmt.money_unknown)
    # A DISPLAY REQUEST is as long as the VMC's display; with none configured it takes the
    # rest of the reply, so it is generated only when the display size is known.
    kinds = ITEM_KINDS if fmt.display_size else ITEM_KINDS - {"display"}
    kind = draw(st.sampled_from(sorted(kinds)))
    if kind == "config":
        config = ReaderConfig(
            draw(levels), draw(u16), draw(u8), draw(u8), draw(u8), ReaderOption(0)
        )
        return config.encode(), ReaderConfigReported(dev, config)
    if kind == "begin":
        funds = draw(money)
        media = SessionMedia(
            draw(u32),
            draw(u8),
            draw(u16),
            draw(st.binary(min_size=2, max_size=2)),
            draw(u16),
            draw(u8),
        )
        event = BeginSession(dev, fmt.money(funds), funds)
        if fmt.level >= 2 or fmt.expanded:
            event = dataclasses.replace(
                event, media_id=media.media_id, payment_type=media.payment_type,
                payment_data=media.payment_data,
            )  # fmt: skip
        if fmt.expanded:
            event = dataclasses.replace(
                event, language=media.language.decode("latin-1"),
                user_currency=media.currency_code, card_options=media.card_options,
            )  # fmt: skip
        return encode_begin_session(fmt, funds, media), event
    if kind in ("approved", "limit"):
        raw = draw(money)
        if kind == "approved":
            return (
                encode_money_item(PollCode.VEND_APPROVED, fmt, raw),
                VendApproved(dev, fmt.money(raw), raw),
            )
        return encode_money_item(PollCode.REVALUE_LIMIT, fmt, raw), RevalueLimit(
            dev, fmt.money(raw), raw
        )
    if kind == "display":
        tenths = draw(u8)
        size = fmt.display_size
        text = draw(st.binary(min_size=size, max_size=size))
        return encode_display_request(tenths, text), DisplayRequest(
            dev, tenths / 10, text.decode("latin-1"), text
        )
    if kind == "malfunction":
        code = draw(u8)
        return encode_malfunction(code), ReaderMalfunction(dev, code)
    if kind == "sequence":
        status = draw(st.sampled_from(ReaderStatus))
        return encode_out_of_sequence(fmt, status), CommandOutOfSequence(
            dev, int(status) if fmt.level >= 2 else None
        )
    if kind == "user_file":
        file_id, data = draw(u8), draw(st.binary(max_size=16))
        return encode_user_file(file_id, data), UserFileData(dev, file_id, data)
    if kind == "data_entry":
        length, repeat = draw(st.integers(0, 0x7F)), draw(st.booleans())
        raw = length | (0x80 if repeat else 0)
        return encode_data_entry_request(length, repeat), DataEntryRequest(dev, length, repeat, raw)
    if kind == "peripheral_id":
        identity = Identity(
            "ABC",
            "1",
            "M",
            draw(u16),
            Feature(draw(st.integers(0, 0x3F))) if fmt.level >= 3 else None,
        )
        return encode_peripheral_id(identity), PeripheralId(dev, identity)
    one_byte: dict[str, tuple[PollCode, type[DeviceEvent]]] = {
        "just_reset": (PollCode.JUST_RESET, JustReset),
        "cancel_request": (PollCode.SESSION_CANCEL_REQUEST, SessionCancelRequest),
        "denied": (PollCode.VEND_DENIED, VendDenied),
        "end": (PollCode.END_SESSION, EndSession),
        "cancelled": (PollCode.CANCELLED, ReaderCancelled),
        "revalue_ok": (PollCode.REVALUE_APPROVED, RevalueApproved),
        "revalue_no": (PollCode.REVALUE_DENIED, RevalueDenied),
        "time_date": (PollCode.TIME_DATE_REQUEST, TimeDateRequest),
        "data_entry_cancel": (PollCode.DATA_ENTRY_CANCEL, DataEntryCancel),
    }
    code, cls = one_byte[kind]
    return item(code), cls(dev)


ITEM_KINDS = {
    "config", "begin", "approved", "limit", "display", "malfunction", "sequence", "user_file",
    "data_entry", "peripheral_id", "just_reset", "cancel_request", "denied", "end", "cancelled",
    "revalue_ok", "revalue_no", "time_date", "data_entry_cancel",
}  # fmt: skip


@given(st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_poll_reply_of_many_items_round_trips(data: st.DataObject) -> None:
    """Items back to back in one reply decode to the same events, in order."""
    fmt = data.draw(wire_formats())
    pairs = data.draw(st.lists(poll_items(fmt), min_size=1, max_size=4))
    wire = b"".join(b for b, _ in pairs)
    assert decode_poll(wire, fmt) == [e for _, e in pairs]


@given(st.binary(max_size=20), st.booleans())
def test_items_without_known_length_take_the_rest(body: bytes, ftl: bool) -> None:
    code = PollCode.FTL_SEND_BLOCK if ftl else PollCode.DIAGNOSTICS
    expected: DeviceEvent = (
        FtlMessage("cashless", code, body) if ftl else DiagnosticsResponse("cashless", body)
    )
    assert decode_poll(bytes((code,)) + body, WireFormat()) == [expected]


@given(st.binary(max_size=40), wire_formats())
def test_arbitrary_bytes_never_crash_the_poll_parser(data: bytes, fmt: WireFormat) -> None:
    try:
        events = decode_poll(data, fmt)
    except MdbError:
        return  # allowed by the contract; the parser does not in fact raise
    assert all(isinstance(e, DeviceEvent) for e in events)
    unknown = [i for i, e in enumerate(events) if isinstance(e, StatusReported)]
    assert unknown in ([], [len(events) - 1])  # an unknown item ends parsing
    if data:
        assert events


def test_unknown_and_truncated_items_are_reported_not_raised() -> None:
    fmt = WireFormat(level=1)
    events = decode_poll(bytes.fromhex("07 0C 05"), fmt)
    assert events[0] == EndSession("cashless")
    assert events[1] == StatusReported("cashless", 0x0C, "unknown item 0x0C", fault=False)
    assert len(events) == 2
    [cut] = decode_poll(bytes.fromhex("05 00"), fmt)
    assert isinstance(cut, StatusReported) and not cut.fault
    assert cut.text.startswith("unknown item 0x05")


def test_reader_variants_of_item_length_are_tolerated() -> None:
    # A level-1 BEGIN SESSION from a reader that agreed level 2: read in the short form.
    fmt2 = WireFormat(level=2, scaling=5)
    wire = encode_begin_session(WireFormat(level=1), 100, SessionMedia(media_id=7))
    assert decode_poll(wire, fmt2) == [BeginSession("cashless", 500, 100)]
    # Unknown funds (all ones).
    [unknown] = decode_poll(encode_begin_session(fmt2, 0xFFFF, SessionMedia()), fmt2)
    assert isinstance(unknown, BeginSession) and unknown.funds is None
    # A level-1 OUT OF SEQUENCE (no status) from a reader that agreed level 2.
    assert decode_poll(b"\x0b", WireFormat(level=2)) == [CommandOutOfSequence("cashless")]
    # A PERIPHERAL ID without feature bits from a level-3 reader.
    plain = Identity("ABC", "S", "M", 0x0123)
    assert decode_poll(encode_peripheral_id(plain), WireFormat(level=3)) == [
        PeripheralId("cashless", plain)
    ]
    assert plain.version == 123


def test_malfunction_kinds() -> None:
    assert ReaderMalfunction("cashless", 0x80).fatal
    assert ReaderMalfunction("cashless", 0x80).kind == "reader failure"
    assert not ReaderMalfunction("cashless", 0x01).fatal


def test_money_conversion() -> None:
    fmt = WireFormat(scaling=5)
    assert fmt.scaled(150) == 30
    assert fmt.money(30) == 150
    with pytest.raises(PriceNotRepresentable):
        fmt.scaled(152)
    with pytest.raises(PriceNotRepresentable):
        fmt.scaled(5 * 0xFFFF)  # all ones means "not known": not a price
    assert WireFormat(scaling=5, expanded=True, level=3).scaled(5 * 0xFFFF) == 0xFFFF


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vmc_level": 4},
        {"display_columns": 256},
        {"display_columns": 16, "display_rows": 4},
        {"max_price": -1},
        {"identity": Identity("TOOLONG")},
        {"identity": Identity("ABC", "é")},
    ],
)
def test_settings_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidSettings):
        CashlessSettings(**kwargs)


# --- the simulator's session state machine (hypothesis, no bus) ---------------------------------


class ReaderSessionMachine(RuleBasedStateMachine):
    """Drives the simulator as a VMC would, with an independent model of the MDB reader states;
    every command the model allows must be ACKed, every other answered 0B, the POLL items must
    come in the order the model expects, and the money the simulator charged must equal what
    the model says was approved and confirmed."""

    SCALING = 5

    def __init__(self) -> None:
        super().__init__()
        self.sim = CashlessReaderSim(level=3, scaling=self.SCALING)
        self.fmt = WireFormat(level=3, scaling=self.SCALING)
        assert answer(self.sim, b"\x12") == b"\x00"
        assert answer(self.sim, request_block(Cmd.SETUP_CONFIG, VmcSetup(3).encode()))
        assert answer(self.sim, request_block(Cmd.READER_ENABLE)) == b""
        self.state = "enabled"
        self.funds: int | None = None  # raw
        self.approve = True
        # POLL items still to come: (event type, raw amount for VEND APPROVED).
        self.expected: list[tuple[type[DeviceEvent], int | None]] = []
        self.vend_price: int | None = None
        self.charged = 0
        self.items: list[int] = []
        self.disable_pending = False

    def command(self, cmd: CommandDef, payload: bytes = b"") -> bytes | None:
        return answer(self.sim, request_block(cmd, payload))

    def check(self, reply: bytes | None, allowed: bool) -> None:
        if allowed:
            assert reply == b"", reply
        else:
            assert reply is not None and reply[:1] == b"\x0b", reply

    @rule(enabled=st.booleans())
    def reader_enable(self, enabled: bool) -> None:
        reply = self.command(Cmd.READER_ENABLE if enabled else Cmd.READER_DISABLE)
        assert reply == b""
        if self.state in ("disabled", "enabled"):
            self.state = "enabled" if enabled else "disabled"
        else:  # MDB: a session in progress runs to its end, then the reader is disabled
            self.disable_pending = not enabled

    @rule(funds=st.none() | st.integers(0, 1000))
    def tap(self, funds: int | None) -> None:
        result = self.sim.control({"cmd": "tap", "funds": funds})
        assert result["accepted"] == (self.state == "enabled")
        if result["accepted"]:
            self.state = "idle"
            self.funds = None if funds is None else funds // self.SCALING
            self.expected.append((BeginSession, None))

    @rule(approve=st.booleans())
    def set_approval(self, approve: bool) -> None:
        self.sim.control({"cmd": "set_approval", "approve": approve})
        self.approve = approve

    @rule(price=st.integers(0, 300), number=u16)
    def vend_request(self, price: int, number: int) -> None:
        raw = price // self.SCALING
        reply = self.command(Cmd.VEND_REQUEST, ItemPrice(raw, number).encode(False))
        self.check(reply, self.state == "idle")
        if self.state != "idle":
            return
        ok = self.approve and (self.funds is None or raw <= self.funds)
        self.expected.append((VendApproved, raw) if ok else (VendDenied, None))
        self.state = "vend" if ok else "idle"
        self.vend_price = raw if ok else None

    @rule()
    def poll(self) -> None:
        reply = answer(self.sim, b"\x12")
        events = decode_poll(reply or b"", self.fmt)
        assert [type(e) for e in events] == [t for t, _ in self.expected[: len(events)]]
        for event, (_, raw) in zip(events, self.expected, strict=False):
            if isinstance(event, VendApproved):
                assert event.amount_raw == raw
                assert event.amount == raw * self.SCALING
        del self.expected[: len(events)]

    @rule(number=u16)
    def vend_success(self, number: int) -> None:
        # The reader takes it once it has approved, whether or not the VMC polled that yet.
        reply = self.command(Cmd.VEND_SUCCESS, number.to_bytes(2, "big"))
        self.check(reply, self.state == "vend")
        if self.state == "vend":
            assert self.vend_price is not None
            self.charged += self.vend_price * self.SCALING
            self.items.append(number)
            if self.funds is not None:
                self.funds -= self.vend_price
            self.state, self.vend_price = "idle", None

    @rule()
    def vend_failure(self) -> None:
        reply = self.command(Cmd.VEND_FAILURE)
        self.check(reply, self.state == "vend")
        if self.state == "vend":
            self.state, self.vend_price = "idle", None

    @rule()
    def vend_cancel(self) -> None:
        reply = self.command(Cmd.VEND_CANCEL)
        self.check(reply, self.state == "vend")
        if self.state == "vend":
            # This vend's APPROVED is withdrawn if the VMC has not polled it yet.
            mine = (VendApproved, self.vend_price)
            if mine in self.expected:
                del self.expected[len(self.expected) - 1 - self.expected[::-1].index(mine)]
            self.expected.append((VendDenied, None))
            self.state, self.vend_price = "idle", None

    @rule()
    def session_complete(self) -> None:
        reply = self.command(Cmd.SESSION_COMPLETE)
        self.check(reply, self.state == "idle")
        if self.state == "idle":
            self.expected.append((EndSession, None))
            self.state = "disabled" if self.disable_pending else "enabled"
            self.disable_pending = False

    @rule()
    def customer_cancel(self) -> None:
        result = self.sim.control({"cmd": "cancel"})
        assert result["accepted"] == (self.state == "idle")
        if result["accepted"]:
            self.expected.append((SessionCancelRequest, None))

    @invariant()
    def money_matches(self) -> None:
        ledger = self.sim.ledger()
        assert ledger["amount_charged"] == self.charged
        assert ledger["items_charged"] == self.items
        assert ledger["vends_succeeded"] <= ledger["vends_approved"]
        assert ledger["out_of_sequence"] >= 0
        if self.funds is not None:
            assert self.funds >= 0
        assert (
            sim_state(self.sim)["state"]
            == {
                "enabled": "enabled",
                "disabled": "disabled",
                "idle": "session idle",
                "vend": "vend",
            }[self.state]
        )


ReaderSessionMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None
)
TestReaderSession = ReaderSessionMachine.TestCase


def test_simulator_switches_to_expanded_lengths() -> None:
    sim = CashlessReaderSim(level=3, scaling=1)
    answer(sim, b"\x12")
    answer(sim, request_block(Cmd.SETUP_CONFIG, VmcSetup(3).encode()))
    length_of = sim.length_of()  # taken once, as the bus does
    assert length_of(b"\x13\x00") == 6
    enable_all = request_block(Cmd.EXPANSION_FEATURE_ENABLE, encode_features(Feature(0x3F)))
    assert answer(sim, enable_all) == b""
    assert sim_state(sim)["expanded"]
    assert sim_state(sim)["features_enabled"] == int(sim.features_offered)
    assert length_of(b"\x13\x00") == 8
    sim.reset_itself()
    assert length_of(b"\x13\x00") == 6


def test_simulator_refuses_session_commands_before_setup() -> None:
    sim = CashlessReaderSim(level=2)
    answer(sim, b"\x12")
    assert answer(sim, request_block(Cmd.READER_ENABLE)) == b"\x0b"  # level 1 until SETUP
    answer(sim, request_block(Cmd.SETUP_CONFIG, VmcSetup(2).encode()))
    assert answer(sim, request_block(Cmd.SESSION_COMPLETE)) == bytes((0x0B, ReaderStatus.DISABLED))
    assert sim.ledger()["out_of_sequence"] == 2
    with pytest.raises(KeyError):
        sim.control({"cmd": "no such control"})


# --- the VMC's CashlessReader against the simulator over a real pty ------------------------------


@pytest.mark.usefixtures("fast_reset")
async def test_start_up_level_3() -> None:
    sim = CashlessReaderSim(level=3, scaling=5, max_response_s=7)
    settings_ = CashlessSettings(max_price=300, min_price=50, always_idle=True)
    async with one_reader(sim, settings_) as (reader, sim, recorder):
        assert reader.info.level == 3
        assert reader.info.manufacturer == "SIM"
        assert reader.info.model == "cashless-sim"
        assert reader.info.version == 100
        assert reader.info.details["iso4217"] == 978
        assert reader.NON_RESPONSE_S == 7.0  # the reader's own maximum response time
        assert reader.features_enabled == Feature.NEGATIVE_VEND | Feature.ALWAYS_IDLE
        assert not reader.format.expanded  # no 32-bit money: prices fit 16 bits
        state = sim_state(sim)
        assert state["state"] == "enabled"
        assert state["vmc_level"] == 3
        assert state["prices"] == {"max": 60, "min": 10}  # scaled by 5
        assert state["vmc_identity"]["manufacturer"] == "VMC"
        assert state["features_enabled"] == int(Feature.NEGATIVE_VEND | Feature.ALWAYS_IDLE)
        assert recorder.of(JustReset) == []  # start-up's own JUST RESET is not an event
        reader.set_enabled(False)
        await wait_until(lambda: sim_state(sim)["state"] == "disabled", "reader disabled")
        reader.set_enabled(True)
        await wait_until(lambda: sim_state(sim)["state"] == "enabled", "reader enabled")


@pytest.mark.usefixtures("fast_reset")
async def test_start_up_with_the_captured_pax_reader() -> None:
    sim = CashlessReaderSim(**PAX_CONFIG)  # type: ignore[arg-type]
    async with one_reader(sim, CashlessSettings(vmc_level=2)) as (reader, sim, recorder):
        assert reader.format.level == 1
        assert reader.NON_RESPONSE_S == 45.0
        assert reader.features_enabled == Feature(0)
        assert reader.reader_identity is not None and reader.reader_identity.features is None
        mark = recorder.mark()
        await tap(sim, 100)
        begin = await recorder.wait_for(BeginSession, mark)
        assert begin.funds == 100 and begin.media_id is None  # level-1 form
        await reader.vend_request(10, 6)
        approved = await recorder.wait_for(VendApproved, mark)
        assert approved.amount == 10
        await reader.vend_success(6)
        assert await reader.session_complete()
        await recorder.wait_for(EndSession, mark)
        assert sim.ledger()["amount_charged"] == 10


@pytest.mark.usefixtures("fast_reset")
async def test_start_up_with_a_reader_that_answers_in_the_next_poll() -> None:
    sim = CashlessReaderSim(level=3, inline=False)
    async with one_reader(sim) as (reader, sim, recorder):
        assert reader.reader_config is not None and reader.reader_config.scaling == 5
        assert reader.info.serial == "CL0000000001"
        mark = recorder.mark()
        await reader.reader_cancel()  # answered ACK, CANCELLED comes in a POLL
        await recorder.wait_for(ReaderCancelled, mark)


@pytest.mark.usefixtures("fast_reset")
async def test_session_with_approved_vend() -> None:
    async with one_reader() as (reader, sim, recorder):
        mark = recorder.mark()
        await tap(sim, 500)
        begin = await recorder.wait_for(BeginSession, mark)
        assert begin.funds == 500 and not begin.repeated
        assert begin.media_id == 0x12345678  # level-3 form carries the media id
        assert reader.session is SessionPhase.IDLE
        assert await reader.vend_request(150, 6) == []  # ACK; the outcome comes by POLL
        approved = await recorder.wait_for(VendApproved, mark)
        assert approved.amount == 150 and approved.amount_raw == 30
        assert session_of(reader) is SessionPhase.VENDING
        await reader.vend_success(6)
        assert session_of(reader) is SessionPhase.IDLE
        assert await reader.session_complete()
        await recorder.wait_for(EndSession, mark)
        assert session_of(reader) is SessionPhase.NONE
        ledger = sim.ledger()
        assert ledger["sessions"] == 1
        assert ledger["amount_approved"] == ledger["amount_charged"] == 150
        assert ledger["items_charged"] == [6]
        assert ledger["out_of_sequence"] == 0
        assert recorder.of(CommandOutOfSequence) == []


@pytest.mark.usefixtures("fast_reset")
async def test_denied_vends() -> None:
    async with one_reader() as (reader, sim, recorder):
        mark = recorder.mark()
        await tap(sim, 100)
        await recorder.wait_for(BeginSession, mark)
        await reader.vend_request(150, 1)  # more than the card holds
        await recorder.wait_for(VendDenied, mark)
        assert reader.session is SessionPhase.IDLE
        sim.control({"cmd": "set_approval", "approve": False})
        mark = recorder.mark()
        await reader.vend_request(50, 1)
        await recorder.wait_for(VendDenied, mark)
        assert await reader.session_complete()
        await recorder.wait_for(EndSession, mark)
        ledger = sim.ledger()
        assert ledger["vends_denied"] == 2 and ledger["amount_charged"] == 0


@pytest.mark.usefixtures("fast_reset")
async def test_vend_failure_and_vend_cancel_charge_nothing() -> None:
    async with one_reader() as (reader, sim, recorder):
        mark = recorder.mark()
        await tap(sim, 500)
        await recorder.wait_for(BeginSession, mark)
        await reader.vend_request(100, 2)
        await recorder.wait_for(VendApproved, mark)
        await reader.vend_failure()
        assert reader.session is SessionPhase.IDLE
        mark = recorder.mark()
        await reader.vend_request(100, 3)
        await reader.vend_cancel()
        await recorder.wait_for(VendDenied, mark)
        await wait_until(lambda: reader.session is SessionPhase.IDLE, "cancel confirmed")
        await reader.session_complete()
        await recorder.wait_for(EndSession, mark)
        ledger = sim.ledger()
        assert ledger["vends_failed"] == 1 and ledger["vends_cancelled"] == 1
        assert ledger["amount_charged"] == 0


@pytest.mark.usefixtures("fast_reset")
async def test_customer_cancel_is_answered_with_session_complete() -> None:
    async with one_reader() as (reader, sim, recorder):
        mark = recorder.mark()
        await tap(sim, 500)
        await recorder.wait_for(BeginSession, mark)
        assert sim.control({"cmd": "cancel"})["accepted"]
        await recorder.wait_for(SessionCancelRequest, mark)
        await recorder.wait_for(EndSession, mark)  # the device sent SESSION COMPLETE itself
        assert reader.session is SessionPhase.NONE
        assert sim.ledger()["customer_cancellations"] == 1
        assert sim.ledger()["out_of_sequence"] == 0


@pytest.mark.usefixtures("fast_reset")
async def test_repeated_begin_session_is_tolerated() -> None:
    async with one_reader() as (reader, sim, recorder):
        mark = recorder.mark()
        await tap(sim, 400, repeat=True)
        await recorder.wait_for(BeginSession, mark, lambda e: e.repeated)
        first, second = recorder.of(BeginSession, mark)
        assert not first.repeated and second.funds == 400
        assert reader.session is SessionPhase.IDLE
        await reader.vend_request(100, 1)
        await recorder.wait_for(VendApproved, mark)
        await reader.vend_success(1)
        await reader.session_complete()
        await recorder.wait_for(EndSession, mark)
        assert sim.ledger()["amount_charged"] == 100


@pytest.mark.usefixtures("fast_reset")
async def test_reader_that_ends_the_session_itself() -> None:
    sim = CashlessReaderSim(auto_end_session=True)
    async with one_reader(sim) as (reader, sim, recorder):
        mark = recorder.mark()
        await tap(sim, 500)
        await recorder.wait_for(BeginSession, mark)
        await reader.vend_request(100, 4)
        await recorder.wait_for(VendApproved, mark)
        await reader.vend_success(4)
        await recorder.wait_for(EndSession, mark)
        assert not await reader.session_complete()  # nothing to complete: not sent
        assert sim.ledger()["out_of_sequence"] == 0
        assert sim.ledger()["amount_charged"] == 100


@pytest.mark.usefixtures("fast_reset")
async def test_session_complete_not_taken_can_be_sent_again() -> None:
    async with one_reader() as (reader, sim, recorder):
        mark = recorder.mark()
        await tap(sim, 500)
        await recorder.wait_for(BeginSession, mark)
        sim.faults.unplugged = True
        timeouts = reader.master.stats.timeouts
        completing = asyncio.create_task(reader.session_complete())
        await wait_until(
            lambda: reader.master.stats.timeouts >= timeouts + 2 * DEFAULT_MAX_ATTEMPTS,
            "SESSION COMPLETE unanswered twice",
        )
        # Within the reader's non-response time the command is sent again, not given up.
        assert not completing.done()
        sim.faults.unplugged = False
        assert await completing
        await recorder.wait_for(EndSession, mark)
        assert session_of(reader) is SessionPhase.NONE


class ManualClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.usefixtures("fast_reset")
async def test_reader_that_never_confirms_end_session() -> None:
    sim = CashlessReaderSim(sends_end_session=False)
    clock = ManualClock()
    async with sim_and_master([sim], slack_s=LOADED_SLACK_S) as (master, _bus):
        recorder = Recorder()
        reader = CashlessReader(master, poll_interval_s=POLL_S, on_event=recorder, clock=clock)
        reader.set_enabled(True)
        task = asyncio.create_task(reader.run())
        try:
            await wait_until(ready(reader), "READY")
            await tap(sim, 500)
            await recorder.wait_for(BeginSession)
            assert await reader.session_complete()
            assert session_of(reader) is SessionPhase.ENDING
            clock.now += reader.NON_RESPONSE_S + 1  # no END SESSION within the reader's time
            await wait_until(lambda: reader.session is SessionPhase.NONE, "session closed")
            assert recorder.of(EndSession) == []
            await tap(sim, 300)  # the next customer's session starts normally
            begin = await recorder.wait_for(BeginSession, where=lambda e: e.funds == 300)
            assert not begin.repeated
        finally:
            await stop_task(task)


@pytest.mark.usefixtures("fast_reset")
async def test_always_idle_vend_without_a_card_first() -> None:
    async with one_reader(settings=CashlessSettings(always_idle=True)) as (reader, sim, recorder):
        mark = recorder.mark()
        await reader.vend_request(200, 9)
        approved = await recorder.wait_for(VendApproved, mark)
        assert approved.amount == 200
        await reader.vend_success(9)
        assert await reader.session_complete()
        await recorder.wait_for(EndSession, mark)
        assert sim.ledger()["sessions"] == 1 and sim.ledger()["amount_charged"] == 200


@pytest.mark.usefixtures("fast_reset")
async def test_session_commands_refused_out_of_phase() -> None:
    async with one_reader() as (reader, sim, recorder):
        with pytest.raises(SessionStateError):
            await reader.vend_request(100, 1)  # no session, always idle not enabled
        with pytest.raises(SessionStateError):
            await reader.vend_success(1)
        assert not await reader.session_complete()  # no session: nothing sent
        await tap(sim, 500)
        await recorder.wait_for(BeginSession)
        with pytest.raises(PriceNotRepresentable):
            await reader.vend_request(102, 1)  # not a multiple of the scaling factor (5)
        assert reader.session is SessionPhase.IDLE  # nothing was sent
        assert await reader.session_complete()
        await recorder.wait_for(EndSession)
        # The reader's own refusal, over the wire: SESSION COMPLETE outside a session.
        reply = await reader.request(CMD_VEND, b"\x04")
        assert reader.parse_poll(reply.data) == [
            CommandOutOfSequence("cashless", ReaderStatus.ENABLED)
        ]
        assert sim.ledger()["out_of_sequence"] == 1


@pytest.mark.usefixtures("fast_reset")
async def test_cash_sale_negative_vend_and_revalue() -> None:
    sim = CashlessReaderSim(revalue_limit=1000)
    async with one_reader(sim) as (reader, sim, recorder):
        await reader.cash_sale(250, 7)
        assert sim.ledger()["cash_sales"] == 1 and sim.ledger()["cash_sale_amount"] == 250
        mark = recorder.mark()
        await tap(sim, 300)
        await recorder.wait_for(BeginSession, mark)
        await reader.negative_vend(100, 3)
        await recorder.wait_for(VendApproved, mark)
        await reader.vend_success(3)
        assert sim.ledger()["amount_refunded"] == 100
        await reader.revalue(200)
        await recorder.wait_for(RevalueApproved, mark)
        await reader.revalue_limit()
        limit = await recorder.wait_for(RevalueLimit, mark)
        assert limit.amount == 1000 - (300 + 100 + 200)
        await reader.revalue(1000)
        await recorder.wait_for(RevalueDenied, mark)
        await reader.session_complete()
        await recorder.wait_for(EndSession, mark)
        assert sim.ledger()["amount_revalued"] == 200


@pytest.mark.usefixtures("fast_reset")
async def test_malfunction_and_display_request() -> None:
    settings_ = CashlessSettings(display_columns=16, display_rows=2)
    async with one_reader(settings=settings_) as (_reader, sim, recorder):
        mark = recorder.mark()
        sim.control({"cmd": "malfunction", "code": 0x81})
        malfunction = await recorder.wait_for(ReaderMalfunction, mark)
        assert malfunction.code == 0x81 and malfunction.fatal
        assert sim.control({"cmd": "display", "text": "INSERT CARD", "seconds": 1.5})["accepted"]
        display = await recorder.wait_for(DisplayRequest, mark)
        assert display.text == "INSERT CARD".ljust(32) and display.duration_s == 1.5


@pytest.mark.usefixtures("fast_reset")
async def test_expanded_currency_when_prices_need_32_bits() -> None:
    sim = CashlessReaderSim(scaling=1)
    async with one_reader(sim, CashlessSettings(max_price=100_000)) as (reader, sim, recorder):
        assert reader.features_enabled & Feature.MONEY_32BIT
        assert reader.format.expanded
        state = sim_state(sim)
        assert state["expanded"] and state["prices"]["max"] == 100_000
        mark = recorder.mark()
        await tap(sim, 90_000)
        begin = await recorder.wait_for(BeginSession, mark)
        assert begin.funds == 90_000 and begin.user_currency == 0x1978
        await reader.vend_request(70_000, 1)
        approved = await recorder.wait_for(VendApproved, mark)
        assert approved.amount == 70_000
        await reader.vend_success(1)
        await reader.cash_sale(66_000, 2)
        await reader.session_complete()
        await recorder.wait_for(EndSession, mark)
        assert sim.ledger()["amount_charged"] == 70_000
        assert sim.ledger()["cash_sale_amount"] == 66_000


@pytest.mark.usefixtures("fast_reset")
async def test_reader_reset_mid_session_restarts_it() -> None:
    async with one_reader() as (reader, sim, recorder):
        mark = recorder.mark()
        await tap(sim, 500)
        await recorder.wait_for(BeginSession, mark)
        resets_before = sim.counters.resets
        sim.reset_itself()
        await recorder.wait_for(JustReset, mark)
        assert reader.session is SessionPhase.NONE
        await wait_until(lambda: reader.state is DeviceState.READY, "READY again")
        await wait_until(lambda: sim_state(sim)["state"] == "enabled", "enabled again")
        assert sim.counters.resets >= resets_before + 2  # its own, then our RESET


@pytest.mark.usefixtures("fast_reset")
async def test_lost_ack_and_bad_checksum_deliver_events_once() -> None:
    async with one_reader() as (reader, sim, recorder):
        mark = recorder.mark()
        sim.faults.lose_acks = 1  # BEGIN SESSION is sent again at the next POLL
        await tap(sim, 500)
        await recorder.wait_for(BeginSession, mark)
        await wait_until(lambda: sim.counters.resends_after_lost_ack == 1, "resend")
        sim.faults.bad_checksum = 1  # the next data reply, VEND APPROVED, is garbled: RET
        await reader.vend_request(100, 1)
        await recorder.wait_for(VendApproved, mark)
        await reader.vend_success(1)
        await reader.session_complete()
        await recorder.wait_for(EndSession, mark)
        # The resent BEGIN SESSION is handed up, marked as a repeat by the session's state.
        sessions = recorder.of(BeginSession, mark)
        assert [s.repeated for s in sessions] == [False, True]
        assert len(recorder.of(VendApproved, mark)) == 1
        assert reader.master.stats.rets_sent >= 1
        assert sim.ledger()["amount_charged"] == 100


@pytest.mark.usefixtures("fast_reset")
async def test_two_readers_on_one_bus() -> None:
    first, second = CashlessReaderSim(), CashlessReader2Sim(scaling=1)
    async with running([first, second], [(CashlessReader, None), (CashlessReader2, None)]) as (
        devices,
        recorder,
    ):
        reader1, reader2 = devices
        assert reader2.ADDRESS == 0x60 and reader2.format.scaling == 1
        mark = recorder.mark()
        await tap(second, 77)
        begin = await recorder.wait_for(BeginSession, mark)
        assert begin.device == "cashless2" and begin.funds == 77
        assert reader1.session is SessionPhase.NONE
        assert reader2.session is SessionPhase.IDLE


@pytest.mark.usefixtures("fast_reset")
async def test_silent_reader_goes_offline_and_comes_back() -> None:
    sim = CashlessReaderSim(max_response_s=1)  # 1 s non-response time keeps the test short
    async with one_reader(sim) as (reader, sim, recorder):
        assert reader.NON_RESPONSE_S == 1.0
        mark = recorder.mark()
        sim.faults.unplugged = True
        await wait_until(lambda: reader.state is DeviceState.OFFLINE, "OFFLINE")
        sim.faults.unplugged = False
        await wait_until(lambda: reader.state is DeviceState.READY, "READY again")
        states = [e.state for e in recorder.of(StateChanged, mark)]
        assert DeviceState.OFFLINE in states and states[-1] is DeviceState.READY
