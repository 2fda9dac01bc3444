"""Coin changer: wire formats (golden vectors, round trips), the simulator's model, and the VMC
device class against the simulator over a real pty."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import drivers.mdb.device
from drivers.errors import MdbError
from drivers.mdb.block import CommandReceived, command_block
from drivers.mdb.change import plan_change
from drivers.mdb.coin import (
    ADDRESS,
    COIN_TYPE,
    DIAGNOSTIC_STATUS,
    DISPENSE,
    EXPANSION_ID,
    FEATURE_ENABLE,
    PAYOUT,
    PAYOUT_STATUS,
    PAYOUT_VALUE_POLL,
    POLL,
    RESET,
    SETUP,
    STATUS_TEXT,
    TUBE_STATUS,
    BadCoinReply,
    ChangerFeature,
    ChangerSetup,
    CoinChanger,
    CoinDeposited,
    CoinRoute,
    CoinsDispensedManually,
    DiagnosticCode,
    NotSupported,
    PayoutProgress,
    ReturnLeverPressed,
    SlugsReported,
    TubeStatus,
    command_table,
    decode_diagnostics,
    decode_expansion_id,
    decode_payout_status,
    decode_payout_value_poll,
    decode_poll,
    decode_setup,
    decode_tube_status,
    encode_coin_type,
    encode_dispense,
    encode_feature_enable,
    encode_payout,
)
from drivers.mdb.commands import CommandDef
from drivers.mdb.device import (
    DeviceEvent,
    DeviceState,
    JustReset,
    StateChanged,
    StatusReported,
)
from drivers.mdb.link import StreamLink
from drivers.mdb.master import BusMaster
from hil.sim.coin import (
    CoinChangerSim,
    SimCoin,
    decode_coin_type_request,
    decode_dispense_request,
    decode_feature_enable_request,
    decode_payout_request,
    encode_diagnostics_reply,
    encode_expansion_id_reply,
    encode_payout_status_reply,
    encode_payout_value_reply,
    encode_setup_reply,
    encode_tube_status_reply,
    item_deposited,
    item_dispensed_manually,
    item_slugs,
)
from tests.mdb_harness import sim_and_master
from tests.waiting import stop_task, wait_until

EURO = ChangerSetup(
    level=3,
    currency=0x1978,
    scaling=5,
    decimals=2,
    routing=0x001F,
    credits=(1, 2, 4, 10, 20, 40),
)

# --- shared helpers -----------------------------------------------------------------------

#: Upper bound for anything a test waits for over the pty (a failure deadline, not a timing
#: assertion): on a loaded machine the master may give up on a slow reply and the device then
#: retries its start-up a second later.
WAIT_S = 15.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def send(sim: CoinChangerSim, command: CommandDef, payload: bytes = b"") -> bytes | None:
    """One command to the simulator, as the bus would deliver it (block without CHK)."""
    addr_cmd, data = command.request(ADDRESS, payload)
    return sim.answer(CommandReceived(bytes((addr_cmd,)) + data))


def ack(sim: CoinChangerSim) -> None:
    sim.control_word(0x00)


def exchange(sim: CoinChangerSim, command: CommandDef, payload: bytes = b"") -> bytes | None:
    """Send and ACK a data reply, as a healthy VMC does."""
    reply = send(sim, command, payload)
    if reply:
        ack(sim)
    return reply


def started_sim(clock: FakeClock, **kwargs: object) -> CoinChangerSim:
    """A simulator past RESET/JUST RESET with every coin enabled."""
    sim = CoinChangerSim(clock=clock, **kwargs)  # type: ignore[arg-type]
    exchange(sim, RESET)
    assert exchange(sim, POLL) == b"\x0b"
    exchange(sim, COIN_TYPE, encode_coin_type(0xFFFF, 0xFFFF))
    return sim


class EventLog:
    """Collects device events and lets a test wait for one (with a timeout)."""

    def __init__(self) -> None:
        self.events: list[DeviceEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: DeviceEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, kind: type[DeviceEvent]) -> list[DeviceEvent]:
        return [e for e in self.events if isinstance(e, kind)]

    async def wait_for(
        self, predicate: Callable[[DeviceEvent], bool], timeout_s: float = WAIT_S
    ) -> DeviceEvent:
        async with asyncio.timeout(timeout_s):
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                self._changed.clear()
                await self._changed.wait()


def ready_states(log: EventLog) -> list[DeviceEvent]:
    return [
        e
        for e in log.of(StateChanged)
        if isinstance(e, StateChanged) and e.state is DeviceState.READY
    ]


@pytest.fixture(autouse=True)
def short_reset_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    # The 500 ms settle after RESET models real peripherals; the simulator needs none.
    monkeypatch.setattr(drivers.mdb.device, "RESET_SETTLE_S", 0.01)


@asynccontextmanager
async def running_changer(
    sim: CoinChangerSim, *, enabled: bool = True, timing: bool = False
) -> AsyncIterator[tuple[CoinChanger, EventLog]]:
    """The simulator on a real pty, a CoinChanger supervising it, started up and READY."""
    async with sim_and_master([sim], timing=timing) as (master, _bus):
        log = EventLog()
        device = CoinChanger(master, poll_interval_s=0.02, on_event=log)
        device.set_enabled(enabled)
        task = asyncio.create_task(device.run())
        try:
            await log.wait_for(lambda e: isinstance(e, StateChanged) and e.state.value == "ready")
            yield device, log
        finally:
            await stop_task(task)


# --- golden vectors -----------------------------------------------------------------------


def test_golden_command_blocks() -> None:
    def block(command: CommandDef, payload: bytes = b"") -> str:
        return command_block(*command.request(ADDRESS, payload)).hex(" ")

    assert block(RESET) == "08 08"
    assert block(SETUP) == "09 09"
    assert block(TUBE_STATUS) == "0a 0a"
    assert block(POLL) == "0b 0b"
    # Accept types 0-5, manual dispense for the tube coins 0-4.
    assert block(COIN_TYPE, encode_coin_type(0x003F, 0x001F)) == "0c 00 3f 00 1f 6a"
    # Three coins of type 2: (3 << 4) | 2.
    assert block(DISPENSE, encode_dispense(2, 3)) == "0d 32 3f"
    assert block(EXPANSION_ID) == "0f 00 0f"
    assert block(FEATURE_ENABLE, encode_feature_enable(0x03)) == "0f 01 00 00 00 03 13"
    assert block(PAYOUT, encode_payout(10)) == "0f 02 0a 1b"
    assert block(PAYOUT_STATUS) == "0f 03 12"
    assert block(PAYOUT_VALUE_POLL) == "0f 04 13"
    assert block(DIAGNOSTIC_STATUS) == "0f 05 14"


def test_golden_replies() -> None:
    setup = decode_setup(bytes.fromhex("03 19 78 05 02 00 1f 01 02 04 0a 14 28"))
    assert setup == EURO
    assert setup.currency_iso == 978
    assert [c.value for c in setup.coins] == [5, 10, 20, 50, 100, 200]
    assert [c.routable for c in setup.coins] == [True] * 5 + [False]
    assert setup.format_value(185) == "1.85"
    assert setup.to_scaled(185) == 37
    with pytest.raises(ValueError):
        setup.to_scaled(7)

    tubes = decode_tube_status(bytes.fromhex("00 02 28 3c 1e"))
    assert tubes.counts == (40, 60, 30)
    assert tubes.is_full(1) and not tubes.is_full(0)
    assert tubes.count(9) == 0

    # 0x52 0x07: a coin of type 2 went to its tube, which now holds 7; then 0x01 lever;
    # 0x91 0x03: one coin of type 1 dispensed by hand, 3 left; 0x23: three slugs.
    events = decode_poll(bytes.fromhex("52 07 01 91 03 23"), "coin", EURO)
    assert events == [
        CoinDeposited("coin", 2, 20, CoinRoute.TUBES, 7, False, b"\x52\x07"),
        ReturnLeverPressed("coin"),
        CoinsDispensedManually("coin", 1, 1, 10, 3, b"\x91\x03"),
        SlugsReported("coin", 0x23, "3 slug(s)", False, 3),
    ]
    assert decode_poll(b"\x0b", "coin", None) == [JustReset("coin")]
    jam = decode_poll(b"\x0c", "coin", EURO)
    assert jam == [StatusReported("coin", 0x0C, "coin jam", True)]
    # An unknown item stops parsing: what follows it cannot be delimited.
    unknown = decode_poll(bytes.fromhex("0e 52 07"), "coin", EURO)
    assert unknown == [StatusReported("coin", 0x0E, "unknown item 0x0E", False)]
    cut = decode_poll(bytes.fromhex("02 52"), "coin", EURO)
    assert cut[0] == StatusReported("coin", 0x02, "payout busy", False)
    assert cut[1] == StatusReported("coin", 0x52, "truncated item 0x52", False)

    ident = decode_expansion_id(
        b"CGE" + b"123456789012" + b"MODEL-7     " + b"\x01\x23" + bytes(3) + b"\x0b"
    )
    assert (ident.manufacturer, ident.serial, ident.model) == ("CGE", "123456789012", "MODEL-7")
    assert ident.version_text == "1.23"
    assert ident.features == (
        ChangerFeature.ALTERNATIVE_PAYOUT
        | ChangerFeature.EXTENDED_DIAGNOSTICS
        | ChangerFeature.FILE_TRANSPORT
    )
    assert decode_diagnostics(bytes.fromhex("03 00")).ok
    diag = decode_diagnostics(bytes.fromhex("11 30 15 02"))
    assert [c.text for c in diag.codes] == ["coin jam in sensor", "cassette removed"]
    assert not diag.ok
    assert decode_payout_status(b"").busy
    assert decode_payout_status(bytes.fromhex("01 00 02")).count(2) == 2
    assert decode_payout_value_poll(b"", 5).done
    assert decode_payout_value_poll(b"\x07", 5).value == 35


def test_short_replies_raise_mdb_errors() -> None:
    for decoder, data in (
        (decode_setup, b"\x03\x19"),
        (decode_tube_status, b"\x00"),
        (decode_expansion_id, b"CGE"),
        (decode_diagnostics, b"\x03"),
    ):
        with pytest.raises(BadCoinReply):
            decoder(data)
    with pytest.raises(MdbError):
        decode_payout_value_poll(b"\x01\x02", 5)
    with pytest.raises(ValueError):
        encode_dispense(2, 16)
    with pytest.raises(ValueError):
        encode_payout(0)


# --- round trips: the simulator's encoders against the VMC's decoders ---------------------

credits_st = st.lists(st.integers(0, 255), max_size=16)
masks_st = st.integers(0, 0xFFFF)


@given(
    level=st.sampled_from([2, 3]),
    currency=masks_st,
    scaling=st.integers(1, 255),
    decimals=st.integers(0, 4),
    routing=masks_st,
    credits=credits_st,
)
def test_setup_round_trip(
    level: int, currency: int, scaling: int, decimals: int, routing: int, credits: list[int]
) -> None:
    reply = encode_setup_reply(level, currency, scaling, decimals, routing, credits)
    setup = decode_setup(reply)
    assert setup == ChangerSetup(level, currency, scaling, decimals, routing, tuple(credits))
    for t, credit in enumerate(credits):
        coin = setup.coin(t)
        assert (coin is None) == (credit == 0)
        if coin is not None:
            assert coin.value == (0 if credit == 0xFF else credit * scaling)
            assert coin.routable == bool(routing >> t & 1)


@given(full=masks_st, counts=credits_st)
def test_tube_status_round_trip(full: int, counts: list[int]) -> None:
    status = decode_tube_status(encode_tube_status_reply(full, counts))
    assert status == TubeStatus(full, tuple(counts))


printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12)


@given(
    manufacturer=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=3),
    serial=printable,
    model=printable,
    version=masks_st,
    features=st.integers(0, 0xFFFFFFFF),
)
def test_expansion_id_round_trip(
    manufacturer: str, serial: str, model: str, version: int, features: int
) -> None:
    ident = decode_expansion_id(
        encode_expansion_id_reply(manufacturer, serial, model, version, features)
    )
    assert (ident.manufacturer, ident.serial, ident.model) == (manufacturer, serial, model)
    assert ident.version == version
    assert ident.raw_features == features
    assert int(ident.features) == features & 0x0F


@given(codes=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), max_size=8))
def test_diagnostics_round_trip(codes: list[tuple[int, int]]) -> None:
    status = decode_diagnostics(encode_diagnostics_reply(codes))
    assert status.codes == tuple(DiagnosticCode(m, s) for m, s in codes)
    assert all(c.text for c in status.codes)


@given(counts=st.lists(st.integers(0, 255), min_size=1, max_size=16))
def test_payout_status_round_trip(counts: list[int]) -> None:
    status = decode_payout_status(encode_payout_status_reply(counts))
    assert not status.busy and status.counts == tuple(counts)


@given(accept=masks_st, manual=masks_st)
def test_coin_type_request_round_trip(accept: int, manual: int) -> None:
    assert decode_coin_type_request(encode_coin_type(accept, manual)) == (accept, manual)


@given(coin_type=st.integers(0, 15), count=st.integers(1, 15))
def test_dispense_request_round_trip(coin_type: int, count: int) -> None:
    assert decode_dispense_request(encode_dispense(coin_type, count)) == (coin_type, count)


@given(features=st.integers(0, 0xFFFFFFFF))
def test_feature_enable_round_trip(features: int) -> None:
    assert decode_feature_enable_request(encode_feature_enable(features)) == features


@given(credit=st.integers(1, 255), scaling=st.integers(1, 255))
def test_payout_and_value_poll_round_trip(credit: int, scaling: int) -> None:
    assert decode_payout_request(encode_payout(credit)) == credit
    progress = decode_payout_value_poll(encode_payout_value_reply(credit), scaling)
    assert progress == PayoutProgress(done=False, credit=credit, value=credit * scaling)


poll_item_st = st.one_of(
    st.tuples(st.just("deposit"), st.integers(0, 15), st.sampled_from(list(CoinRoute)),
              st.integers(0, 255)),
    st.tuples(st.just("manual"), st.integers(0, 15), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("slugs"), st.integers(0, 31)),
    st.tuples(st.just("status"), st.sampled_from(sorted(STATUS_TEXT))),
)  # fmt: skip


def expected_events(item: tuple[object, ...], setup: ChangerSetup) -> tuple[bytes, DeviceEvent]:
    """The simulator's encoding of one poll item and the event the VMC should decode."""
    kind = item[0]
    if kind == "deposit":
        _, t, route, n = item
        assert isinstance(t, int) and isinstance(route, CoinRoute) and isinstance(n, int)
        raw = item_deposited(t, route, n)
        coin = setup.coin(t)
        token = coin.token if coin else False
        return raw, CoinDeposited("coin", t, setup.value_of(t), route, n, token, raw)
    if kind == "manual":
        _, t, count, n = item
        assert isinstance(t, int) and isinstance(count, int) and isinstance(n, int)
        raw = item_dispensed_manually(t, count, n)
        return raw, CoinsDispensedManually("coin", t, count, count * setup.value_of(t), n, raw)
    if kind == "slugs":
        count = item[1]
        assert isinstance(count, int)
        event = SlugsReported("coin", 0x20 | count, f"{count} slug(s)", False, count)
        return item_slugs(count), event
    code = item[1]
    assert isinstance(code, int)
    if code == 0x01:
        return bytes((code,)), ReturnLeverPressed("coin")
    if code == 0x0B:
        return bytes((code,)), JustReset("coin")
    text, fault = STATUS_TEXT[code]
    return bytes((code,)), StatusReported("coin", code, text, fault)


@given(items=st.lists(poll_item_st, max_size=12), credits=credits_st)
def test_poll_items_round_trip(items: list[tuple[object, ...]], credits: list[int]) -> None:
    setup = ChangerSetup(3, 0x1978, 5, 2, 0x00FF, tuple(credits))
    pairs = [expected_events(item, setup) for item in items]
    data = b"".join(raw for raw, _ in pairs)
    assert decode_poll(data, "coin", setup) == [event for _, event in pairs]


@settings(max_examples=300)
@given(data=st.binary(max_size=40))
def test_decode_poll_takes_any_bytes(data: bytes) -> None:
    events = decode_poll(data, "coin", EURO)
    assert len(events) <= len(data)
    unknown = [e for e in events if isinstance(e, StatusReported) and "item 0x" in e.text]
    # Parsing stops at the first item it cannot delimit.
    assert len(unknown) <= 1
    if unknown:
        assert events[-1] is unknown[0]


def test_parse_poll_on_a_device_takes_any_bytes() -> None:
    master_fd, slave_fd = os.openpty()
    link = StreamLink(os.ttyname(slave_fd))
    try:
        device = CoinChanger(BusMaster(link), on_event=lambda e: None)
        device.setup = EURO
        device.tubes = TubeStatus(0, (5, 5, 5, 5, 5))

        @settings(max_examples=200)
        @given(data=st.binary(max_size=40))
        def check(data: bytes) -> None:
            try:
                events = device.parse_poll(data)
            except MdbError:
                return
            assert all(isinstance(e, DeviceEvent) for e in events)
            assert device.payout_busy == any(
                isinstance(e, StatusReported) and e.code == 0x02 for e in events
            )

        check()
    finally:
        link.close()
        os.close(master_fd)
        os.close(slave_fd)


def test_command_tables_by_level() -> None:
    level2, level3 = command_table(2), command_table(3)
    assert level2.lookup(bytes((0x0F, 0x02))) is None
    assert level3.lookup(bytes((0x0F, 0x02))) is PAYOUT
    length = level3.length_of()
    assert length(bytes((0x0C,))) == 5
    assert length(bytes((0x0F,))) is None
    assert length(bytes((0x0F, 0x01))) == 6
    assert length(bytes((0x0F, 0x09))) == 0


# --- the simulator's model, driven directly with a fake clock ------------------------------


def test_sim_reset_setup_and_tubes() -> None:
    clock = FakeClock()
    sim = CoinChangerSim(clock=clock)
    assert exchange(sim, POLL) == b"\x0b"  # power-up reports JUST RESET
    assert exchange(sim, POLL) == b""
    setup = decode_setup(exchange(sim, SETUP) or b"")
    assert setup == EURO
    tubes = decode_tube_status(exchange(sim, TUBE_STATUS) or b"")
    assert tubes.counts == (40, 40, 30, 20, 10, 0)
    ident = decode_expansion_id(exchange(sim, EXPANSION_ID) or b"")
    assert ident.features == ChangerFeature.ALTERNATIVE_PAYOUT | ChangerFeature.EXTENDED_DIAGNOSTICS
    assert exchange(sim, FEATURE_ENABLE, encode_feature_enable(0xFF)) == b""
    assert sim.features_enabled == 0x03
    assert decode_diagnostics(exchange(sim, DIAGNOSTIC_STATUS) or b"").codes == (
        DiagnosticCode(0x06, 0x00),  # inhibited: no coin enabled yet
    )
    level2 = CoinChangerSim(level=2, clock=clock)
    assert send(level2, EXPANSION_ID) is None  # a level-2 changer ignores expansion
    assert decode_setup(exchange(level2, SETUP) or b"").level == 2


def test_sim_routing_rejects_slugs_and_ledger() -> None:
    clock = FakeClock()
    coins = (SimCoin(5, True, 1, 2), SimCoin(10, True, 0, 5), SimCoin(200, False))
    sim = started_sim(clock, coins=coins)
    exchange(sim, COIN_TYPE, encode_coin_type(0b011, 0b011))  # 2.00 disabled
    assert sim.control({"cmd": "insert", "coin_type": 0})["result"] == "tubes"
    assert sim.control({"cmd": "insert", "value": 5})["result"] == "cashbox"  # tube now full
    assert sim.control({"cmd": "insert", "value": 200})["result"] == "rejected"
    assert sim.control({"cmd": "insert", "value": 7})["result"] == "slug"
    events = decode_poll(
        exchange(sim, POLL) or b"", "coin", decode_setup(exchange(sim, SETUP) or b"")
    )
    assert [(e.route, e.tube_count) for e in events if isinstance(e, CoinDeposited)] == [
        (CoinRoute.TUBES, 2),
        (CoinRoute.CASHBOX, 2),
        (CoinRoute.REJECTED, 0),
    ]
    assert isinstance(events[-1], SlugsReported)
    tubes = decode_tube_status(exchange(sim, TUBE_STATUS) or b"")
    assert tubes.is_full(0) and tubes.count(0) == 2
    ledger = sim.ledger()
    json.dumps(ledger)  # JSON-able for the control socket
    assert ledger["inserted"]["0"] == {"tubes": 1, "cashbox": 1, "rejected": 0}
    assert ledger["inserted"]["2"]["rejected"] == 1
    assert (ledger["value_in"], ledger["value_returned"], ledger["slugs"]) == (10, 200, 1)


def test_sim_dispense_takes_time_and_reports_busy() -> None:
    clock = FakeClock()
    sim = started_sim(clock, level=2, payout_time_s=1.0)
    assert exchange(sim, DISPENSE, encode_dispense(3, 4)) == b""
    assert exchange(sim, POLL) == b"\x02"
    clock.advance(0.5)  # half way: two of four coins out
    assert sim.ledger()["paid_out"]["3"]["command"] == 2
    assert exchange(sim, POLL) == b"\x02"
    clock.advance(0.5)
    assert exchange(sim, POLL) == b""
    assert decode_tube_status(exchange(sim, TUBE_STATUS) or b"").count(3) == 16
    assert sim.ledger()["value_out"] == 200


def test_sim_alternative_payout_status_and_value_poll() -> None:
    clock = FakeClock()
    sim = started_sim(clock, payout_time_s=1.0)
    exchange(sim, PAYOUT, encode_payout(37))  # 1.85 -> 1.00 + 0.50 + 0.20 + 0.10 + 0.05
    assert send(sim, PAYOUT_STATUS) == b""  # busy: lone ACK
    clock.advance(0.45)  # two coins out: 1.00 + 0.50 = 30 credits
    assert exchange(sim, PAYOUT_VALUE_POLL) == bytes((30,))
    assert exchange(sim, PAYOUT_VALUE_POLL) == bytes((0,))  # nothing since the last one
    clock.advance(0.6)
    assert send(sim, PAYOUT_VALUE_POLL) == b""  # done
    status = decode_payout_status(send(sim, PAYOUT_STATUS) or b"")
    assert status.counts == (1, 1, 1, 1, 1, 0)
    assert decode_payout_status(send(sim, PAYOUT_STATUS) or b"").counts == status.counts  # no ACK
    ack(sim)
    assert decode_payout_status(exchange(sim, PAYOUT_STATUS) or b"").counts == (0,) * 6


def test_sim_tube_jam_and_empty_tube_stop_payouts() -> None:
    clock = FakeClock()
    sim = started_sim(clock, level=2, payout_time_s=0.1)
    sim.control({"cmd": "jam", "kind": "tube", "after": 2})
    exchange(sim, DISPENSE, encode_dispense(1, 5))
    clock.advance(1.0)
    assert exchange(sim, POLL) == b"\x07"  # tube jam; no longer busy
    assert sim.ledger()["paid_out"]["1"]["command"] == 2
    exchange(sim, DISPENSE, encode_dispense(1, 1))  # jammed: nothing moves
    clock.advance(1.0)
    assert sim.ledger()["paid_out"]["1"]["command"] == 2
    sim.control({"cmd": "clear_jam"})
    sim.control({"cmd": "set_tube", "coin_type": 2, "count": 3})
    exchange(sim, DISPENSE, encode_dispense(2, 5))
    clock.advance(1.0)
    assert sim.ledger()["tubes"]["2"] == 0
    assert sim.ledger()["paid_out"]["2"]["command"] == 3


def test_sim_manual_dispense_lever_jams_and_reset() -> None:
    clock = FakeClock()
    sim = started_sim(clock)
    exchange(sim, COIN_TYPE, encode_coin_type(0xFFFF, 0b1))
    assert sim.control({"cmd": "manual_dispense", "coin_type": 1})["result"] == "disabled"
    assert sim.control({"cmd": "manual_dispense", "coin_type": 0, "count": 2})["count"] == 2
    sim.control({"cmd": "lever"})
    sim.control({"cmd": "jam", "kind": "coin"})
    assert sim.control({"cmd": "insert", "coin_type": 0})["result"] == "returned"
    sim.control({"cmd": "jam", "kind": "unplugged"})
    assert exchange(sim, POLL) == bytes.fromhex("a0 26 01 0c 06")
    codes = decode_diagnostics(exchange(sim, DIAGNOSTIC_STATUS) or b"").codes
    assert {(c.main, c.sub) for c in codes} == {(0x11, 0x00), (0x11, 0x30)}
    with pytest.raises(KeyError):
        sim.control({"cmd": "no such thing"})
    with pytest.raises(ValueError):
        sim.control({"cmd": "jam", "kind": "gravity"})
    exchange(sim, RESET)
    assert sim.accept_mask == 0 and sim.coin_jam  # set-up forgotten, the jam is physical
    assert exchange(sim, POLL) == b"\x0b"


def test_sim_lost_ack_resends_same_items() -> None:
    clock = FakeClock()
    sim = started_sim(clock)
    sim.control({"cmd": "insert", "coin_type": 1})
    first = send(sim, POLL)
    assert first is not None and first[0] == 0x51
    assert send(sim, POLL) == first  # no ACK in between: the same data again
    ack(sim)
    assert exchange(sim, POLL) == b""


def test_sim_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        CoinChangerSim(level=1)
    with pytest.raises(ValueError):
        CoinChangerSim(coins=(SimCoin(7),))  # not a multiple of the scaling factor 5
    with pytest.raises(ValueError):
        CoinChangerSim(coins=(SimCoin(5, True, 10, 5),))  # more coins than capacity


# --- the VMC device class against the simulator over a real pty ---------------------------


@pytest.mark.parametrize("timing", [False, True], ids=["fast", "9600-baud"])
async def test_start_up_level3(timing: bool) -> None:
    sim = CoinChangerSim()
    async with running_changer(sim, enabled=False, timing=timing) as (device, log):
        assert device.state is DeviceState.READY
        assert device.setup == EURO
        assert device.info.level == 3
        assert (device.info.manufacturer, device.info.model) == ("SIM", "COINSIM")
        assert device.identity is not None and device.identity.version_text == "1.00"
        assert device.features == (
            ChangerFeature.ALTERNATIVE_PAYOUT | ChangerFeature.EXTENDED_DIAGNOSTICS
        )
        assert sim.features_enabled == 0x03
        assert device.diagnostic is not None and device.diagnostic.ok
        assert device.tubes is not None and device.tubes.counts == (40, 40, 30, 20, 10, 0)
        # Disabled: nothing accepted, manual dispense on for every tube coin.
        assert (sim.accept_mask, sim.manual_mask) == (0, 0x1F)
        assert device.change_tubes() == {
            0: (5, 40),
            1: (10, 40),
            2: (20, 30),
            3: (50, 20),
            4: (100, 10),
        }
        assert not [e for e in log.events if isinstance(e, StatusReported)]


async def test_start_up_level2_and_level3_commands_refused() -> None:
    sim = CoinChangerSim(level=2)
    async with running_changer(sim) as (device, _log):
        assert device.info.level == 2 and device.identity is None
        assert device.features == ChangerFeature(0)
        assert sim.accept_mask == 0x3F
        with pytest.raises(NotSupported):
            await device.payout(10)
        with pytest.raises(NotSupported):
            await device.diagnostics()
        assert sim.counters.commands > 0 and sim.features_enabled == 0


async def test_enable_and_set_accepted() -> None:
    sim = CoinChangerSim()
    async with running_changer(sim) as (device, _log):
        assert sim.accept_mask == 0x3F
        device.set_accepted(0b0110)
        await wait_until(lambda: sim.accept_mask == 0b0110, "coins 1 and 2 enabled")
        device.set_enabled(False)
        await wait_until(lambda: sim.accept_mask == 0, "all coins disabled")
        assert sim.manual_mask == 0x1F


async def test_poll_events_reach_the_vmc() -> None:
    sim = CoinChangerSim()
    async with running_changer(sim) as (device, log):
        sim.control({"cmd": "insert", "value": 50})
        sim.control({"cmd": "insert", "value": 200})
        deposit = await log.wait_for(lambda e: isinstance(e, CoinDeposited) and e.value == 200)
        assert isinstance(deposit, CoinDeposited) and deposit.route is CoinRoute.CASHBOX
        first = log.of(CoinDeposited)[0]
        assert isinstance(first, CoinDeposited)
        assert (first.coin_type, first.route, first.tube_count, first.credited) == (
            3, CoinRoute.TUBES, 21, True)  # fmt: skip
        sim.control({"cmd": "lever"})
        await log.wait_for(lambda e: isinstance(e, ReturnLeverPressed))
        sim.control({"cmd": "manual_dispense", "coin_type": 4, "count": 3})
        manual = await log.wait_for(lambda e: isinstance(e, CoinsDispensedManually))
        assert isinstance(manual, CoinsDispensedManually)
        assert (manual.count, manual.value, manual.tube_count) == (3, 300, 7)
        sim.control({"cmd": "insert", "value": 3})
        await log.wait_for(lambda e: isinstance(e, SlugsReported))
        sim.control({"cmd": "jam", "kind": "coin"})
        jam = await log.wait_for(lambda e: isinstance(e, StatusReported) and e.code == 0x0C)
        assert isinstance(jam, StatusReported) and jam.fault
        # Tube counts follow the poll items and the TUBE STATUS refresh after them.
        await wait_until(
            lambda: (
                device.tubes is not None
                and device.tubes.full == 0
                and not device._tubes_stale
                and device.tubes.count(4) == 7
            ),
            "tube counts refreshed",
        )
        assert device.tubes is not None and device.tubes.count(3) == 21


async def test_lost_ack_does_not_count_a_coin_twice() -> None:
    sim = CoinChangerSim()
    async with running_changer(sim) as (_device, log):
        with sim.lock:
            sim.faults.lose_acks = 1
            sim.control({"cmd": "insert", "value": 100})
        await log.wait_for(lambda e: isinstance(e, CoinDeposited))
        await wait_until(
            lambda: sim.counters.resends_after_lost_ack == 1 and not sim.poll_items,
            "the resend after the lost ACK",
        )
        await asyncio.sleep(0.1)  # a few more polls
        assert len(log.of(CoinDeposited)) == 1


async def test_level3_payout_confirmed_by_payout_status() -> None:
    sim = CoinChangerSim(payout_time_s=0.2)
    async with running_changer(sim) as (device, _log):
        await device.payout(37)
        progress = await device.payout_value_poll()
        assert not progress.done
        result = await device.wait_payout_done(timeout_s=WAIT_S)
        assert result.finished and result.confirmed
        assert result.counts == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1}
        assert result.value == result.requested == 185
        assert device.tubes is not None and device.tubes.counts == (39, 39, 29, 19, 9, 0)
        assert sim.ledger()["value_out"] == 185
        assert not device.payout_pending
        assert (await device.payout_status()).counts == (0,) * 6  # cleared once read
        assert (await device.payout_value_poll()).done


async def test_level2_dispense_reconciled_from_tubes() -> None:
    sim = CoinChangerSim(level=2, payout_time_s=0.1)
    async with running_changer(sim) as (device, log):
        await device.dispense(3, 2)
        result = await device.wait_payout_done(timeout_s=WAIT_S)
        assert result.finished and not result.confirmed
        assert result.counts == {3: 2} and result.value == 100
        assert any(isinstance(e, StatusReported) and e.code == 0x02 for e in log.events)
        assert sim.ledger()["paid_out"]["3"]["command"] == 2


async def test_pay_out_plan_and_tube_jam_partway() -> None:
    sim = CoinChangerSim(level=2, payout_time_s=0.05)
    async with running_changer(sim) as (device, log):
        plan = plan_change(130, device.change_tubes())
        assert plan == {1: 1, 2: 1, 4: 1}
        result = await device.pay_out(plan, timeout_s=WAIT_S)
        assert result.finished and result.value == 130 and result.counts == plan
        sim.control({"cmd": "jam", "kind": "tube", "after": 2})
        result = await device.pay_out({0: 5}, timeout_s=WAIT_S)
        assert result.counts == {0: 2} and result.short_by == 15
        jam = await log.wait_for(lambda e: isinstance(e, StatusReported) and e.code == 0x07)
        assert isinstance(jam, StatusReported) and jam.fault


async def test_payout_timeout_leaves_it_pending() -> None:
    sim = CoinChangerSim(level=2, payout_time_s=0.6)
    async with running_changer(sim) as (device, _log):
        await device.dispense(0, 4)
        early = await device.wait_payout_done(timeout_s=0.1)
        assert not early.finished and device.payout_pending
        late = await device.wait_payout_done(timeout_s=WAIT_S)
        assert late.finished and late.counts == {0: 4}


async def test_diagnostics_and_tube_status_commands() -> None:
    sim = CoinChangerSim()
    async with running_changer(sim) as (device, _log):
        sim.control({"cmd": "jam", "kind": "unplugged"})
        diag = await device.diagnostics()
        assert not diag.ok and diag.codes[0].text == "discriminator module error"
        sim.control({"cmd": "set_tube", "coin_type": 0, "count": 100})
        tubes = await device.tube_status()
        assert tubes.count(0) == 100 and tubes.is_full(0)


async def test_changer_reset_itself_is_started_again() -> None:
    sim = CoinChangerSim()
    async with running_changer(sim) as (device, log):
        sim.reset_itself()
        await log.wait_for(lambda e: isinstance(e, JustReset))
        await wait_until(
            lambda: len(ready_states(log)) == 2 and sim.accept_mask == 0x3F, "READY again, enabled"
        )
        assert device.state is DeviceState.READY


@pytest.mark.parametrize("level", [2, 3])
async def test_changer_reset_during_payout_is_reconciled_from_tubes(level: int) -> None:
    sim = CoinChangerSim(level=level, payout_time_s=0.4)
    async with running_changer(sim) as (device, log):
        if level == 3:
            await device.payout(37)
        else:
            await device.dispense(1, 4)
        await asyncio.sleep(0.2)
        sim.reset_itself()  # the changer forgets the payout and its PAYOUT STATUS counts
        result = await device.wait_payout_done(timeout_s=WAIT_S)
        ledger = sim.ledger()
        assert result.finished and not result.confirmed
        assert result.value == ledger["value_out"]
        paid = {int(t): p["command"] for t, p in ledger["paid_out"].items() if p["command"]}
        assert result.counts == paid
        await wait_until(lambda: len(ready_states(log)) == 2, "READY again")


# --- money-exact on a bus that behaves as real ones may (issue: identical replies, late items)


async def test_two_cashbox_coins_of_one_type_are_two_coins() -> None:
    # `45 00`, `45 00` in consecutive POLLs: byte-identical, and two coins (mdb.md "Wire").
    sim = CoinChangerSim()
    async with running_changer(sim) as (_device, log):
        for n in (1, 2):
            sim.control({"cmd": "insert", "value": 200})
            await log.wait_for(lambda e, n=n: len(log.of(CoinDeposited)) == n)
        deposits = log.of(CoinDeposited)
        assert [(d.coin_type, d.route, d.raw) for d in deposits] == [
            (5, CoinRoute.CASHBOX, bytes((0x45, 0x00))),
            (5, CoinRoute.CASHBOX, bytes((0x45, 0x00))),
        ]


async def test_several_items_in_one_poll_reply_are_all_credited() -> None:
    sim = CoinChangerSim()
    async with running_changer(sim) as (device, log):
        # Queued between two POLLs: one reply carries all three items.
        with sim.lock:
            sim.control({"cmd": "insert", "value": 200})
            sim.control({"cmd": "insert", "value": 200})
            sim.control({"cmd": "insert", "value": 50})
            assert len(sim.poll_items) == 3
        await wait_until(lambda: len(log.of(CoinDeposited)) == 3, "three coins")
        assert sorted(d.value for d in log.of(CoinDeposited)) == [50, 200, 200]
        assert device.state is DeviceState.READY


async def test_a_tube_coin_repeated_with_the_same_count_is_one_coin_two_are_two() -> None:
    sim = CoinChangerSim()
    async with running_changer(sim) as (_device, log):
        with sim.lock:
            sim.faults.lose_acks = 1  # the first report comes again, count unchanged
            sim.control({"cmd": "insert", "value": 50})
        await wait_until(lambda: sim.counters.resends_after_lost_ack == 1, "the repeat")
        sim.control({"cmd": "insert", "value": 50})  # a real second coin: the count grew
        await wait_until(lambda: len(log.of(CoinDeposited)) == 2, "the second coin")
        await wait_until(lambda: not sim.poll_items, "every report ACKed")
        assert [d.tube_count for d in log.of(CoinDeposited)] == [21, 22]


@pytest.mark.parametrize("late", ["deposit", "manual_dispense"])
async def test_an_item_queued_before_a_payout_is_not_counted_in_it(late: str) -> None:
    # The crash campaign's short refund: a coin's "deposited" item still queued in the changer
    # when the payout began came in the same reply as "payout busy" and was counted as a coin
    # that entered during the payout (three paid for two commanded). The mirror case, a late
    # manual-dispense item, counted one coin too few (the machine would pay it again).
    sim = CoinChangerSim(payout_time_s=0.2)
    async with sim_and_master([sim]) as (master, _bus):
        log = EventLog()
        device = CoinChanger(master, poll_interval_s=0.02, on_event=log)
        device.set_enabled(True)
        await device.start_up()  # no supervisor: nothing polls between our commands
        assert device.state is DeviceState.READY
        if late == "deposit":
            sim.control({"cmd": "insert", "value": 50})  # tube 3: 20 -> 21, item queued
        else:
            sim.control({"cmd": "manual_dispense", "coin_type": 3, "count": 1})  # 20 -> 19
        assert sim.poll_items, "the item waits in the changer"
        await device.dispense(3, 2)
        result = await device.wait_payout_done(timeout_s=WAIT_S)
        assert result.finished
        assert result.counts == {3: 2} and result.value == 100
        if late == "deposit":
            deposits = log.of(CoinDeposited)
            assert [(d.route, d.tube_count) for d in deposits] == [(CoinRoute.TUBES, 21)]
        else:
            assert len(log.of(CoinsDispensedManually)) == 1
        assert sim.ledger()["paid_out"]["3"]["command"] == 2


async def test_a_payout_never_records_more_than_it_commanded() -> None:
    sim = CoinChangerSim(payout_time_s=0.2)
    async with sim_and_master([sim]) as (master, _bus):
        device = CoinChanger(master, poll_interval_s=0.02, on_event=EventLog())
        await device.start_up()
        await device.dispense(3, 1)
        # A tube sensor's miscount: two coins fewer than the payout paid show in the tube.
        sim.control({"cmd": "set_tube", "coin_type": 3, "count": 17})
        result = await device.wait_payout_done(timeout_s=WAIT_S)
        assert result.counts == {3: 1} and result.value == 50
