"""Bill validator: wire tables and codecs, the simulator, and the VMC device against it on a pty."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from drivers.errors import MdbError
from drivers.mdb.bill import (
    BILL_TYPE,
    ESCROW,
    EXPANSION_ID_L1,
    EXPANSION_ID_L2,
    FEATURE_ENABLE,
    LEVEL1_TABLE,
    LEVEL2_TABLE,
    POLL,
    RESET,
    SECURITY,
    SETUP,
    STACKER,
    STATUS_BILL_REMOVED,
    STATUS_CASHBOX_OUT,
    STATUS_DISABLED,
    STATUS_INVALID_ESCROW,
    STATUS_JAMMED,
    STATUS_TEXT,
    AttemptsWhileDisabled,
    BillEvent,
    BillIdentity,
    BillInEscrow,
    BillRejected,
    BillReturned,
    BillRoute,
    BillRouted,
    BillSetup,
    BillStacked,
    BillTypeSetting,
    BillValidator,
    EscrowInProgress,
    EscrowOutcome,
    RejectReason,
    StackerStatus,
    StatusCleared,
    attempts_item,
    decode_escrow,
    decode_features,
    decode_mask16,
    encode_escrow,
    encode_features,
    encode_mask16,
    parse_poll_items,
    routing_item,
    status_item,
)
from drivers.mdb.block import (
    ACK,
    CommandFramer,
    CommandReceived,
    command_block,
)
from drivers.mdb.codec import WordDecoder, encode_command
from drivers.mdb.commands import CommandDef
from drivers.mdb.device import DeviceEvent, DeviceState, JustReset, StatusReported
from drivers.mdb.link import StreamLink
from drivers.mdb.master import BusMaster, Timing
from hil.sim.bill import BillValidatorSim
from hil.sim.control import ControlClient
from tests.mdb_harness import TEST_SLACK_S, sim_and_master

ADDR = 0x30
REPO_ROOT = Path(__file__).resolve().parent.parent
DEV = "bill"

# --- shared helpers --------------------------------------------------------------------------


class FakeClock:
    """Time under the test's control (for the simulator's escrow timeout)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def received(command: CommandDef, payload: bytes = b"") -> CommandReceived:
    addr_cmd, data = command.request(ADDR, payload)
    return CommandReceived(bytes((addr_cmd,)) + data)


def exchange(
    sim: BillValidatorSim, command: CommandDef, payload: bytes = b"", *, ack: bool = True
) -> bytes | None:
    """One command straight into the simulator (no bus), ACKing a data reply like the VMC."""
    reply = sim.answer(received(command, payload))
    if reply and ack:
        sim.control_word(ACK)
    return reply


def poll(sim: BillValidatorSim, *, ack: bool = True) -> bytes:
    reply = exchange(sim, POLL, ack=ack)
    assert reply is not None
    return reply


def enable(sim: BillValidatorSim, enable_mask: int, escrow_mask: int | None = None) -> None:
    setting = BillTypeSetting(enable_mask, enable_mask if escrow_mask is None else escrow_mask)
    assert exchange(sim, BILL_TYPE, setting.encode()) == b""


def started_sim(**kwargs: Any) -> BillValidatorSim:
    """A simulator past its JUST RESET report."""
    sim = BillValidatorSim(**kwargs)
    poll(sim)
    return sim


def of_type(events: list[DeviceEvent], kind: type[DeviceEvent]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


# --- tables and golden vectors -----------------------------------------------------------------

GOLDEN_COMMANDS = [
    (RESET, b"", "30 30"),
    (SETUP, b"", "31 31"),
    (SECURITY, b"\x00\x00", "32 00 00 32"),
    (POLL, b"", "33 33"),
    (BILL_TYPE, b"\xff\xff\xff\xff", "34 ff ff ff ff 30"),
    (BILL_TYPE, b"\x00\x1f\x00\x1f", "34 00 1f 00 1f 72"),
    (ESCROW, b"\x01", "35 01 36"),
    (ESCROW, b"\x00", "35 00 35"),
    (STACKER, b"", "36 36"),
    (EXPANSION_ID_L1, b"", "37 00 37"),
    (FEATURE_ENABLE, b"\x00\x00\x00\x00", "37 01 00 00 00 00 38"),
    (EXPANSION_ID_L2, b"", "37 02 39"),
]


@pytest.mark.parametrize(("command", "payload", "wire"), GOLDEN_COMMANDS)
def test_command_golden_bytes(command: CommandDef, payload: bytes, wire: str) -> None:
    assert command_block(*command.request(ADDR, payload)).hex(" ") == wire


def test_tables_delimit_per_level() -> None:
    l1, l2 = LEVEL1_TABLE.length_of(), LEVEL2_TABLE.length_of()
    assert l1(b"\x33") == 1 and l1(b"\x34") == 5 and l1(b"\x35") == 2
    assert l1(b"\x37") is None  # the sub-command byte decides
    assert l1(b"\x37\x00") == 2
    assert l1(b"\x37\x01") == 0 and l1(b"\x37\x02") == 0  # level 1 has no such commands
    assert l2(b"\x37\x01") == 6 and l2(b"\x37\x02") == 2


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 60), max_size=8), noise=st.binary(max_size=4))
def test_level2_start_up_stream_delimits_split_anywhere(cuts: list[int], noise: bytes) -> None:
    """The whole start-up sequence as one byte stream, split at arbitrary points, behind noise
    addressed to another device: the table delimits every block."""
    sequence = [
        (RESET, b""),
        (POLL, b""),
        (SETUP, b""),
        (SECURITY, b"\x00\x03"),
        (EXPANSION_ID_L2, b""),
        (FEATURE_ENABLE, b"\x00\x00\x00\x00"),
        (STACKER, b""),
        (BILL_TYPE, b"\x00\x1f\x00\x1f"),
        (ESCROW, b"\x01"),
    ]
    other = encode_command(command_block(0x08 | 0x03, noise.replace(b"\xff", b"")))
    stream = other + b"".join(
        encode_command(command_block(*c.request(ADDR, p))) for c, p in sequence
    )
    decoder, framer = WordDecoder(), CommandFramer(ADDR, LEVEL2_TABLE.length_of())
    got: list[bytes] = []
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        for event in framer.feed(decoder.feed(stream[start:cut])):
            assert isinstance(event, CommandReceived)
            got.append(event.block)
        start = max(start, cut)
    want = [bytes((a,)) + d for a, d in (c.request(ADDR, p) for c, p in sequence)]
    assert got == want


# Reply vectors as published for real validators (an ITL NV11 and a BGN-configured unit).
SETUP_VECTOR = "021975006402012cffffff02050a14326400000000000000000000"
ID_L1_VECTOR = "49544c3030303030363138353136314e56313120333834203030300425"
ID_L2_VECTOR = ID_L1_VECTOR + "00000002"


def test_setup_golden_vector() -> None:
    setup = BillSetup.decode(bytes.fromhex(SETUP_VECTOR))
    assert setup.level == 2
    assert setup.currency_code == 0x1975 and setup.currency_numeric == 975
    assert setup.scaling == 100 and setup.decimals == 2
    assert setup.stacker_capacity == 300
    assert setup.security_levels == 0xFFFF and setup.escrow_capable
    assert [setup.value_of(t) for t in range(6)] == [200, 500, 1000, 2000, 5000, 10000]
    assert setup.value_of(6) == 0 and setup.value_of(15) == 0
    assert setup.known_types_mask == 0b11_1111
    assert setup.encode().hex() == SETUP_VECTOR


def test_identity_golden_vectors() -> None:
    l1 = BillIdentity.decode(bytes.fromhex(ID_L1_VECTOR), with_features=False)
    assert (l1.manufacturer, l1.serial, l1.model) == ("ITL", "000006185161", "NV11 384 000")
    assert l1.software_version == 0x0425 and l1.features is None
    assert l1.encode().hex() == ID_L1_VECTOR
    l2 = BillIdentity.decode(bytes.fromhex(ID_L2_VECTOR), with_features=True)
    assert l2.features == 0x02 and l2.model == "NV11 384 000"
    assert l2.encode().hex() == ID_L2_VECTOR


def test_stacker_golden_vectors() -> None:
    assert StackerStatus.decode(bytes.fromhex("0014")) == StackerStatus(False, 20)
    assert StackerStatus.decode(bytes.fromhex("8164")) == StackerStatus(True, 0x164)


def test_setup_without_escrow_and_country_code() -> None:
    setup = BillSetup(1, 0x0001, 5, 2, 100, 0, False, (1, 2))
    decoded = BillSetup.decode(setup.encode())
    assert not decoded.escrow_capable and decoded.currency_numeric is None
    assert decoded.value_of(1) == 10


def test_short_replies_raise_mdb_errors() -> None:
    for decode in (
        BillSetup.decode,
        StackerStatus.decode,
        lambda d: BillIdentity.decode(d, with_features=True),
        BillTypeSetting.decode,
        decode_mask16,
        decode_escrow,
        decode_features,
    ):
        with pytest.raises(MdbError):
            decode(b"\x07")


# --- codec round trips -----------------------------------------------------------------------

ascii_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12
).map(lambda s: s.strip())
setups = st.builds(
    BillSetup,
    level=st.integers(1, 2),
    currency_code=st.integers(0, 0xFFFF),
    scaling=st.integers(1, 0xFFFF),
    decimals=st.integers(0, 255),
    stacker_capacity=st.integers(0, 0xFFFF),
    security_levels=st.integers(0, 0xFFFF),
    escrow_capable=st.booleans(),
    credits=st.lists(st.integers(0, 255), max_size=16).map(tuple),
)


@given(setups)
def test_setup_round_trip(setup: BillSetup) -> None:
    assert BillSetup.decode(setup.encode()) == setup


@given(
    manufacturer=ascii_text.map(lambda s: s[:3]),
    serial=ascii_text,
    model=ascii_text,
    version=st.integers(0, 0xFFFF),
    features=st.none() | st.integers(0, 0xFFFF_FFFF),
)
def test_identity_round_trip(
    manufacturer: str, serial: str, model: str, version: int, features: int | None
) -> None:
    identity = BillIdentity(manufacturer, serial, model, version, features)
    encoded = identity.encode()
    assert len(encoded) == (29 if features is None else 33)
    assert BillIdentity.decode(encoded, with_features=features is not None) == identity


@given(full=st.booleans(), count=st.integers(0, 0x7FFF))
def test_stacker_round_trip(full: bool, count: int) -> None:
    assert StackerStatus.decode(StackerStatus(full, count).encode()) == StackerStatus(full, count)


@given(
    enable=st.integers(0, 0xFFFF), escrow=st.integers(0, 0xFFFF), features=st.integers(0, 2**32 - 1)
)
def test_request_payload_round_trips(enable: int, escrow: int, features: int) -> None:
    setting = BillTypeSetting(enable, escrow)
    assert BillTypeSetting.decode(setting.encode()) == setting
    assert decode_mask16(encode_mask16(enable)) == enable
    assert decode_features(encode_features(features)) == features
    assert decode_escrow(encode_escrow(True)) is True
    assert decode_escrow(encode_escrow(False)) is False


# One POLL item as the simulator encodes it, and the event the VMC must decode it to.
ItemSpec = tuple[str, int]
item_specs = st.one_of(
    st.tuples(st.just("route"), st.integers(0, 7 * 16 + 15)),
    st.tuples(st.just("attempts"), st.integers(1, 40)),
    st.tuples(st.just("status"), st.sampled_from(sorted(STATUS_TEXT))),
)


def encode_spec(spec: ItemSpec) -> bytes:
    kind, n = spec
    if kind == "route":
        return routing_item(BillRoute(n >> 4), n & 0x0F)
    if kind == "attempts":
        return attempts_item(n)
    return status_item(n)


def expected_event(spec: ItemSpec, setup: BillSetup) -> DeviceEvent:
    kind, n = spec
    if kind == "attempts":
        return AttemptsWhileDisabled(DEV, min(n, 31))
    if kind == "status":
        if n == 0x06:
            return JustReset(DEV)
        if n == 0x0B:
            return BillRejected(DEV, RejectReason.UNRECOGNISED)
        return StatusReported(DEV, n, STATUS_TEXT[n], fault=n in (1, 2, 4, 5, 8))
    route, bill_type = BillRoute(n >> 4), n & 0x0F
    credit = setup.credit_of(bill_type)
    value = credit * setup.scaling
    if route is BillRoute.ESCROW:
        return BillInEscrow(DEV, bill_type, value, credit)
    if route is BillRoute.STACKED:
        return BillStacked(DEV, bill_type, value, credit)
    if route is BillRoute.RETURNED:
        return BillReturned(DEV, bill_type, value, credit)
    if route is BillRoute.DISABLED_REJECTED:
        return BillRejected(DEV, RejectReason.TYPE_DISABLED, bill_type, value)
    return BillRouted(DEV, bill_type, value, credit, route)


@given(setup=setups, specs=st.lists(item_specs, max_size=16))
def test_poll_items_round_trip(setup: BillSetup, specs: list[ItemSpec]) -> None:
    data = b"".join(encode_spec(s) for s in specs)
    assert parse_poll_items(data, setup, DEV) == [expected_event(s, setup) for s in specs]


@given(data=st.binary(max_size=40), setup=st.none() | setups)
def test_parse_poll_never_raises(data: bytes, setup: BillSetup | None) -> None:
    events = parse_poll_items(data, setup, DEV)
    assert len(events) <= len(data)
    for event in events:
        assert isinstance(event, DeviceEvent)
        if isinstance(event, BillEvent):
            assert event.value == (0 if setup is None else setup.value_of(event.bill_type))
    unknown = [e for e in events if isinstance(e, StatusReported) and "unknown" in e.text]
    if unknown:
        assert events[-1] is unknown[0] and not unknown[0].fault


@given(data=st.binary(max_size=40))
def test_reply_decoders_raise_only_mdb_errors(data: bytes) -> None:
    for decode in (
        BillSetup.decode,
        StackerStatus.decode,
        lambda d: BillIdentity.decode(d, with_features=False),
        lambda d: BillIdentity.decode(d, with_features=True),
    ):
        with contextlib.suppress(MdbError):
            decode(data)


def test_unknown_item_stops_parsing() -> None:
    setup = BillSetup(2, 0x1978, 100, 2, 500, 0, True, (5, 10))
    events = parse_poll_items(bytes((0x81, 0x20, 0x80)), setup, DEV)
    assert events[0] == BillStacked(DEV, 1, 1000, 10)
    assert len(events) == 2
    unknown = events[1]
    assert isinstance(unknown, StatusReported) and unknown.text.startswith("unknown item 0x20")
    assert unknown.code == 0x20 and not unknown.fault


# --- the simulator, driven directly ----------------------------------------------------------


def test_sim_reports_just_reset_and_disabled_first() -> None:
    sim = BillValidatorSim()
    assert poll(sim) == bytes((0x06, STATUS_DISABLED))
    assert poll(sim) == bytes((STATUS_DISABLED,))  # standing: repeated every POLL
    enable(sim, 0b1)
    assert poll(sim) == b""


def test_sim_setup_and_identity_by_level() -> None:
    sim2 = BillValidatorSim(level=2, bill_credits=(1, 2, 5), scaling=1000, features=0x03)
    setup = BillSetup.decode(exchange(sim2, SETUP) or b"")
    assert (setup.level, setup.scaling, setup.credits) == (2, 1000, (1, 2, 5))
    assert setup.security_levels == 0b111  # no security levels: "high" for every type
    l2 = BillIdentity.decode(exchange(sim2, EXPANSION_ID_L2) or b"", with_features=True)
    assert l2.features == 0x03 and l2.manufacturer == "SIM"
    assert exchange(sim2, FEATURE_ENABLE, encode_features(0xFF)) == b""
    assert sim2.features_enabled == 0x03  # only what it offers
    l1 = BillIdentity.decode(exchange(sim2, EXPANSION_ID_L1) or b"", with_features=False)
    assert l1.features is None and l1.model == l2.model
    sim1 = BillValidatorSim(level=1)
    assert sim1.answer(received(EXPANSION_ID_L2)) is None
    assert sim1.answer(received(FEATURE_ENABLE, encode_features(0))) is None
    assert BillSetup.decode(exchange(sim1, SETUP) or b"").level == 1


def test_sim_escrow_stack_and_return() -> None:
    sim = started_sim()
    enable(sim, 0b11111)
    assert sim.control({"cmd": "insert", "value": 2000}) == {"bill_type": 2, "outcome": "escrow"}
    assert poll(sim) == routing_item(BillRoute.ESCROW, 2)
    assert exchange(sim, ESCROW, encode_escrow(True)) == b""
    assert poll(sim) == routing_item(BillRoute.STACKED, 2)
    assert StackerStatus.decode(exchange(sim, STACKER) or b"") == StackerStatus(False, 1)
    sim.control({"cmd": "insert", "bill_type": 0})
    poll(sim)
    exchange(sim, ESCROW, encode_escrow(False))
    assert poll(sim) == routing_item(BillRoute.RETURNED, 0)
    exchange(sim, ESCROW, encode_escrow(True))
    assert poll(sim) == status_item(STATUS_INVALID_ESCROW)
    ledger = sim.ledger()
    assert ledger["stacked"]["2"] == 1 and ledger["returned"]["0"] == 1
    assert ledger["value_stacked"] == 2000 and ledger["stacker_count"] == 1


def test_sim_direct_stack_without_escrow_bit() -> None:
    sim = started_sim()
    enable(sim, 0b11, escrow_mask=0b01)
    assert sim.insert(1) == "stacked"
    assert poll(sim) == routing_item(BillRoute.STACKED, 1)


def test_sim_rejections() -> None:
    sim = started_sim()
    assert [sim.insert(0), sim.insert(1), sim.insert(0)] == ["refused while disabled"] * 3
    assert poll(sim) == bytes((STATUS_DISABLED,)) + attempts_item(3)
    enable(sim, 0b01)
    assert sim.insert(1) == "type disabled"
    assert sim.control({"cmd": "insert", "value": 123}) == {
        "bill_type": None,
        "outcome": "unrecognised",
    }
    assert poll(sim) == routing_item(BillRoute.DISABLED_REJECTED, 1) + status_item(0x0B)
    sim.insert(0)
    assert sim.insert(0) == "rejected: escrow occupied"
    ledger = sim.ledger()
    assert ledger["rejected"] == {"0": 3, "1": 2, "2": 0, "3": 0, "4": 0}
    assert ledger["unrecognised"] == 1 and ledger["attempts_while_disabled"] == 3


def test_sim_escrow_timeout_returns_the_bill() -> None:
    clock = FakeClock()
    sim = started_sim(clock=clock, escrow_timeout_s=5.0)
    enable(sim, 0b1)
    sim.insert(0)
    assert poll(sim) == routing_item(BillRoute.ESCROW, 0)
    clock.now += 4.9
    assert poll(sim) == b""
    clock.now += 0.2
    assert poll(sim) == routing_item(BillRoute.RETURNED, 0)
    assert sim.control({"cmd": "set_escrow_timeout", "seconds": None}) == {"escrow_timeout_s": None}
    sim.insert(0)
    clock.now += 1e6
    assert poll(sim) == routing_item(BillRoute.ESCROW, 0)
    assert poll(sim) == b""  # held for ever


def test_sim_jam_in_transport_until_cleared() -> None:
    sim = started_sim()
    enable(sim, 0b1)
    sim.control({"cmd": "jam"})
    sim.insert(0)
    poll(sim)
    exchange(sim, ESCROW, encode_escrow(True))
    jammed = bytes((STATUS_JAMMED, STATUS_DISABLED))
    assert poll(sim) == jammed and poll(sim) == jammed
    assert sim.ledger()["jammed_bill"] == 0 and sim.ledger()["stacked"]["0"] == 0
    assert sim.insert(0) == "refused while disabled"
    assert sim.control({"cmd": "clear_jam"}) == {"bill_type": 0, "bill": "stacked"}
    assert poll(sim) == routing_item(BillRoute.STACKED, 0) + attempts_item(1)
    assert poll(sim) == b""
    sim.control({"cmd": "jam", "now": True})
    assert poll(sim) == jammed
    cleared = sim.control({"cmd": "clear_jam", "bill": "returned"})
    assert cleared == {"bill_type": None, "bill": None}  # jammed with no bill in it


def test_sim_cashbox_and_full_stacker() -> None:
    sim = started_sim(stacker_capacity=2)
    enable(sim, 0b1, escrow_mask=0)
    sim.insert(0)
    sim.insert(0)
    assert poll(sim) == routing_item(BillRoute.STACKED, 0) * 2 + bytes((STATUS_DISABLED,))
    assert StackerStatus.decode(exchange(sim, STACKER) or b"") == StackerStatus(True, 2)
    sim.control({"cmd": "remove_cashbox"})
    assert poll(sim) == bytes((STATUS_CASHBOX_OUT, STATUS_DISABLED))
    assert sim.control({"cmd": "replace_cashbox"}) == {"cashbox_in": True, "stacker_count": 0}
    exchange(sim, STACKER)  # any command drops standing reports that no longer hold
    assert poll(sim) == b""
    assert sim.ledger()["bills_emptied"] == 2


def test_sim_reset_returns_escrowed_bill_and_clears_setup() -> None:
    sim = started_sim()
    enable(sim, 0b1)
    sim.insert(0)
    poll(sim)
    exchange(sim, RESET)
    assert sim.enable_mask == 0 and sim.ledger()["returned"]["0"] == 1
    assert poll(sim) == bytes((0x06, STATUS_DISABLED))


def test_sim_resends_unacked_poll_identically() -> None:
    sim = started_sim()
    enable(sim, 0b1)
    sim.insert(0)
    first = poll(sim, ack=False)
    assert poll(sim) == first == routing_item(BillRoute.ESCROW, 0)
    assert poll(sim) == b""


def test_sim_controls_validate_and_are_json() -> None:
    sim = BillValidatorSim()
    with pytest.raises(KeyError):
        sim.control({"cmd": "fly"})
    for bad in (
        {"cmd": "insert"},
        {"cmd": "insert", "bill_type": 16},
        {"cmd": "insert", "value": "5"},
        {"cmd": "clear_jam", "bill": "eaten"},
        {"cmd": "set_escrow_timeout", "seconds": -1},
    ):
        with pytest.raises(ValueError):
            sim.control(bad)
    answers = [
        sim.control({"cmd": "jam"}),
        sim.control({"cmd": "remove_cashbox"}),
        sim.control({"cmd": "set_escrow_timeout", "seconds": 2}),
        sim.ledger(),
        sim.status(),
    ]
    assert json.loads(json.dumps(answers)) == answers
    with pytest.raises(ValueError):
        BillValidatorSim(level=3)


class SimAgainstDecoder(RuleBasedStateMachine):
    """The simulator driven by random physical actions and VMC commands, its POLL replies
    decoded by the VMC's parser: what the VMC has heard plus what is still queued must always
    equal what physically happened (the simulator's ledger)."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.sim = BillValidatorSim(bill_credits=(5, 10, 20), clock=self.clock, escrow_timeout_s=3)
        self.setup = self.sim.setup_reply
        self.heard: Counter[tuple[str, int]] = Counter()
        self.lost: Counter[tuple[str, int]] = Counter()

    def _hear(self, data: bytes) -> None:
        for event in parse_poll_items(data, self.setup, DEV):
            if isinstance(event, BillStacked):
                self.heard["stacked", event.bill_type] += 1
            elif isinstance(event, BillReturned):
                self.heard["returned", event.bill_type] += 1
            assert not (isinstance(event, StatusReported) and "unknown" in event.text)

    def _queued(self) -> Counter[tuple[str, int]]:
        queued: Counter[tuple[str, int]] = Counter()
        for item in self.sim.poll_items:
            for byte in item:
                if byte & 0xF0 == 0x80:
                    queued["stacked", byte & 0x0F] += 1
                elif byte & 0xF0 == 0xA0:
                    queued["returned", byte & 0x0F] += 1
        return queued

    @rule(bill_type=st.integers(0, 4))
    def insert(self, bill_type: int) -> None:
        self.sim.insert(bill_type)

    @rule(enable_mask=st.integers(0, 7), escrow_mask=st.integers(0, 7))
    def bill_type(self, enable_mask: int, escrow_mask: int) -> None:
        enable(self.sim, enable_mask, escrow_mask)

    @rule(stack=st.booleans())
    def escrow(self, stack: bool) -> None:
        assert exchange(self.sim, ESCROW, encode_escrow(stack)) == b""

    @rule()
    def poll(self) -> None:
        self._hear(poll(self.sim))

    @rule()
    def poll_with_lost_ack(self) -> None:
        first = poll(self.sim, ack=False)
        again = poll(self.sim)
        assert again == first  # the same data again: the VMC counts it once
        self._hear(first)

    @rule()
    def jam(self) -> None:
        self.sim.control({"cmd": "jam"})

    @rule(stacked=st.booleans())
    def clear_jam(self, stacked: bool) -> None:
        self.sim.control({"cmd": "clear_jam", "bill": "stacked" if stacked else "returned"})

    @rule(present=st.booleans())
    def cashbox(self, present: bool) -> None:
        self.sim.control({"cmd": "replace_cashbox" if present else "remove_cashbox"})

    @rule(seconds=st.floats(0, 5))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def reset(self) -> None:
        self.lost.update(self._queued())
        if self.sim.escrow_bill is not None:
            self.lost["returned", self.sim.escrow_bill] += 1  # handed back without a report
        exchange(self.sim, RESET)

    @invariant()
    def heard_plus_queued_is_what_happened(self) -> None:
        ledger = self.sim.ledger()
        seen = self.heard + self._queued() + self.lost
        for kind in ("stacked", "returned"):
            for t in range(3):
                assert seen[kind, t] == ledger[kind][str(t)], (kind, t)

    @invariant()
    def every_bill_is_somewhere(self) -> None:
        ledger = self.sim.ledger()
        for t in range(3):
            k = str(t)
            held = (ledger["in_escrow"] == t) + (ledger["jammed_bill"] == t)
            assert ledger["inserted"][k] == (
                ledger["stacked"][k] + ledger["returned"][k] + ledger["rejected"][k] + held
            )
        assert ledger["value_stacked"] == sum(
            ledger["stacked"][str(t)] * self.setup.value_of(t) for t in range(3)
        )


TestSimAgainstDecoder = SimAgainstDecoder.TestCase
TestSimAgainstDecoder.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# --- the VMC device against the simulator over a real pty ----------------------------------

#: Small cadence: the simulator answers at once, so a fast poll keeps the tests short.
POLL_S = 0.01
#: Upper bound for anything the tests wait for (start-up includes the 0.5 s settle after RESET).
WAIT_S = 10.0


class RecordingBillSim(BillValidatorSim):
    """The real simulator, noting which commands it was sent (and able to lose ESCROW's ACK)."""

    NAMES: ClassVar[dict[tuple[int, int | None], str]] = {
        (0, None): "RESET",
        (1, None): "SETUP",
        (2, None): "SECURITY",
        (3, None): "POLL",
        (4, None): "BILL TYPE",
        (5, None): "ESCROW",
        (6, None): "STACKER",
        (7, 0): "EXP ID L1",
        (7, 1): "FEATURE ENABLE",
        (7, 2): "EXP ID L2",
    }

    def __init__(self, **kwargs: Any) -> None:
        self.seen: list[str] = []
        self.mute_escrow_reply = False
        self.ignore_escrow = False
        super().__init__(**kwargs)

    def answer(self, command: CommandReceived) -> bytes | None:
        with self.lock:
            cmd = command.addr_cmd & 0x07
            sub = command.data[0] if cmd == 7 and command.data else None
            self.seen.append(self.NAMES.get((cmd, sub), "?"))
            return super().answer(command)

    def handle(self, command: CommandReceived) -> bytes | None:
        with self.lock:
            if command.addr_cmd & 0x07 == ESCROW.command:
                if self.ignore_escrow:
                    return b""  # ACKs but does nothing: no outcome will ever come
                if self.mute_escrow_reply:
                    self.faults.drop_replies = 1  # the bus drops this very reply
            return super().handle(command)

    def last_start_up(self) -> list[str]:
        """Commands other than POLL since the last RESET, each retransmission counted once (a
        loaded machine may see a start-up attempt fail and restart, or a command resent)."""
        with self.lock:
            seen = list(self.seen)
        since = seen[len(seen) - 1 - seen[::-1].index("RESET") :]
        out: list[str] = []
        for name in since:
            if name != "POLL" and (not out or out[-1] != name):
                out.append(name)
        return out


@dataclass
class Rig:
    sim: RecordingBillSim
    device: BillValidator
    events: list[DeviceEvent] = field(default_factory=list)

    async def until(self, what: Callable[[], object], timeout_s: float = WAIT_S) -> None:
        """Wait for a condition, bounded; the device's loop runs meanwhile."""
        async with asyncio.timeout(timeout_s):
            # The state lives in the simulator's thread and the device's task: poll it.
            while not what():  # noqa: ASYNC110
                await asyncio.sleep(POLL_S)

    def of(self, kind: type[DeviceEvent]) -> list[Any]:
        return of_type(self.events, kind)

    def control(self, **request: Any) -> dict[str, Any]:
        return self.sim.control(request)


@contextlib.asynccontextmanager
async def running(
    sim: RecordingBillSim | None = None, *, enabled: bool = True, **device_kwargs: Any
) -> AsyncIterator[Rig]:
    sim = sim or RecordingBillSim()
    async with sim_and_master([sim]) as (master, _bus):
        events: list[DeviceEvent] = []
        device = BillValidator(
            master, poll_interval_s=POLL_S, on_event=events.append, **device_kwargs
        )
        device.set_enabled(enabled)
        rig = Rig(sim, device, events)
        task = asyncio.create_task(device.run())
        try:
            await rig.until(lambda: device.state is DeviceState.READY)
            if enabled:
                await rig.until(lambda: sim.enable_mask != 0)
            yield rig
        finally:
            await stop(task)


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel the device loop and wait for it. The cancel is repeated: on Python 3.11
    ``asyncio.wait_for`` (used by ``BusMaster.request``) drops a cancel that races with the
    reply it was waiting for."""
    async with asyncio.timeout(WAIT_S):
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.05)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_start_up_level2() -> None:
    async with running(enabled=False, security_mask=0x0003) as rig:
        sim, device = rig.sim, rig.device
        assert sim.last_start_up() == [
            "RESET",
            "SETUP",
            "SECURITY",
            "EXP ID L2",
            "FEATURE ENABLE",
            "STACKER",
            "BILL TYPE",
        ]
        assert sim.security_mask == 0x0003 and sim.features_enabled == 0
        assert sim.enable_mask == 0
        info = device.info
        assert (info.level, info.manufacturer, info.model, info.version) == (
            2,
            "SIM",
            "BILL-SIM",
            0x0100,
        )
        assert info.details["bill_values"] == [500, 1000, 2000, 5000, 10000]
        assert info.details["currency_numeric"] == 978
        assert info.details["stacker_count"] == 0
        # "disabled" stands in every POLL; it is reported once.
        await rig.until(lambda: sim.counters.polls > 10)
        disabled = [e for e in rig.of(StatusReported) if e.code == STATUS_DISABLED]
        assert len(disabled) == 1 and not disabled[0].fault
        assert device.conditions == {STATUS_DISABLED}
        device.set_enabled(True)
        await rig.until(lambda: sim.enable_mask == 0b11111 == sim.escrow_mask)
        await rig.until(lambda: rig.of(StatusCleared))
        assert rig.of(StatusCleared)[0].code == STATUS_DISABLED


async def test_start_up_level1() -> None:
    async with running(RecordingBillSim(level=1, bill_credits=(1, 5))) as rig:
        assert rig.sim.last_start_up() == [
            "RESET",
            "SETUP",
            "SECURITY",
            "EXP ID L1",
            "STACKER",
            "BILL TYPE",
        ]
        assert rig.device.info.level == 1 and rig.device.level == 1
        assert rig.device.details.identity is not None
        assert rig.device.details.identity.features is None
        assert rig.sim.enable_mask == 0b11


async def test_escrow_stack_and_stacker() -> None:
    async with running() as rig:
        rig.control(cmd="insert", value=5000)
        await rig.until(lambda: rig.device.escrowed is not None)
        assert rig.of(BillInEscrow) == [BillInEscrow(DEV, 3, 5000, 50)]
        assert await rig.device.escrow(True) is EscrowOutcome.STACKED
        assert rig.of(BillStacked) == [BillStacked(DEV, 3, 5000, 50)]
        assert rig.device.escrowed is None
        assert await rig.device.stacker() == StackerStatus(False, 1)
        assert rig.sim.ledger()["value_stacked"] == 5000


async def test_escrow_return_invalid_and_concurrent() -> None:
    async with running() as rig:
        rig.control(cmd="insert", bill_type=0)
        await rig.until(lambda: rig.of(BillInEscrow))
        first = asyncio.create_task(rig.device.escrow(False))
        await asyncio.sleep(0)
        with pytest.raises(EscrowInProgress):
            await rig.device.escrow(True)
        assert await first is EscrowOutcome.RETURNED
        assert rig.of(BillReturned) == [BillReturned(DEV, 0, 500, 5)]
        assert await rig.device.escrow(True) is EscrowOutcome.INVALID_REQUEST
        assert rig.sim.ledger()["returned"]["0"] == 1


async def test_escrow_confirmed_by_poll_when_its_reply_is_lost() -> None:
    sim = RecordingBillSim()
    async with running(sim) as rig:
        rig.control(cmd="insert", bill_type=1)
        await rig.until(lambda: rig.of(BillInEscrow))
        sim.mute_escrow_reply = True
        assert await rig.device.escrow(True) is EscrowOutcome.STACKED
        assert sim.seen.count("ESCROW") == 1  # never sent twice
        assert sim.ledger()["stacked"]["1"] == 1


async def test_escrow_outcome_unknown_after_timeout() -> None:
    sim = RecordingBillSim()
    async with running(sim) as rig:
        rig.control(cmd="insert", bill_type=1)
        await rig.until(lambda: rig.of(BillInEscrow))
        sim.ignore_escrow = True
        assert await rig.device.escrow(True, timeout_s=0.2) is EscrowOutcome.UNKNOWN


async def test_validator_returns_unclaimed_bill_after_escrow_timeout() -> None:
    clock = FakeClock()
    async with running(RecordingBillSim(clock=clock, escrow_timeout_s=30)) as rig:
        rig.control(cmd="insert", bill_type=2)
        await rig.until(lambda: rig.device.escrowed is not None)
        clock.now += 31
        await rig.until(lambda: rig.of(BillReturned))
        assert rig.of(BillReturned) == [BillReturned(DEV, 2, 2000, 20)]
        assert rig.device.escrowed is None


async def test_rejections_reach_the_vmc() -> None:
    async with running() as rig:
        await rig.device.set_accepted(0b00011)
        await rig.until(lambda: rig.sim.enable_mask == 0b00011 == rig.sim.escrow_mask)
        rig.control(cmd="insert", bill_type=4)
        rig.control(cmd="insert", value=777)
        await rig.until(lambda: len(rig.of(BillRejected)) == 2)
        assert rig.of(BillRejected) == [
            BillRejected(DEV, RejectReason.TYPE_DISABLED, 4, 10000),
            BillRejected(DEV, RejectReason.UNRECOGNISED),
        ]
        rig.device.set_enabled(False)
        await rig.until(lambda: rig.sim.enable_mask == 0)
        with rig.sim.lock:  # three bills offered between two POLLs
            for _ in range(3):
                rig.sim.insert(0)
        await rig.until(lambda: rig.of(AttemptsWhileDisabled))
        assert rig.of(AttemptsWhileDisabled) == [AttemptsWhileDisabled(DEV, 3)]


async def test_jam_puts_device_in_fault_until_cleared() -> None:
    async with running() as rig:
        rig.control(cmd="jam")
        rig.control(cmd="insert", bill_type=0)
        await rig.until(lambda: rig.of(BillInEscrow))
        assert await rig.device.escrow(True) is EscrowOutcome.JAMMED
        await rig.until(lambda: rig.device.state is DeviceState.FAULT)
        jams = [e for e in rig.of(StatusReported) if e.code == STATUS_JAMMED]
        assert len(jams) == 1 and jams[0].fault
        assert not rig.of(BillStacked)
        rig.control(cmd="clear_jam")
        await rig.until(lambda: rig.device.state is DeviceState.READY)
        await rig.until(lambda: rig.of(BillStacked))
        assert rig.of(BillStacked) == [BillStacked(DEV, 0, 500, 5)]
        cleared = [e.code for e in rig.of(StatusCleared)]
        assert STATUS_JAMMED in cleared
        assert len([e for e in rig.of(StatusReported) if e.code == STATUS_JAMMED]) == 1


async def test_cashbox_removed_and_replaced() -> None:
    async with running() as rig:
        rig.control(cmd="remove_cashbox")
        await rig.until(lambda: rig.device.state is DeviceState.FAULT)
        out = [e for e in rig.of(StatusReported) if e.code == STATUS_CASHBOX_OUT]
        assert len(out) == 1 and out[0].fault and out[0].text == "cash box out of position"
        rig.control(cmd="replace_cashbox")
        await rig.until(lambda: rig.device.state is DeviceState.READY)
        await rig.until(lambda: STATUS_CASHBOX_OUT not in rig.device.conditions)


async def test_full_stacker() -> None:
    async with running(RecordingBillSim(stacker_capacity=1)) as rig:
        rig.control(cmd="insert", bill_type=0)
        await rig.until(lambda: rig.of(BillInEscrow))
        assert await rig.device.escrow(True) is EscrowOutcome.STACKED
        assert await rig.device.stacker() == StackerStatus(True, 1)
        assert rig.device.info.details["stacker_full"] is True
        await rig.until(lambda: STATUS_DISABLED in rig.device.conditions)


async def test_peripheral_reset_restarts_the_device() -> None:
    async with running() as rig:
        with rig.sim.lock:
            mark = len(rig.sim.seen)
            rig.sim.reset_itself()
        await rig.until(lambda: rig.of(JustReset))
        await rig.until(lambda: rig.device.state is DeviceState.READY)
        await rig.until(lambda: rig.sim.enable_mask == 0b11111)
        assert "SETUP" in rig.sim.seen[mark:]
        assert rig.sim.last_start_up() == [
            "RESET",
            "SETUP",
            "SECURITY",
            "EXP ID L2",
            "FEATURE ENABLE",
            "STACKER",
            "BILL TYPE",
        ]


async def test_lost_ack_does_not_double_count() -> None:
    async with running() as rig:
        rig.sim.faults.lose_acks = 1
        rig.control(cmd="insert", bill_type=1)
        await rig.until(lambda: rig.sim.counters.resends_after_lost_ack >= 1)
        await rig.until(lambda: rig.sim.counters.polls > 20)
        assert rig.of(BillInEscrow) == [BillInEscrow(DEV, 1, 1000, 10)]


async def test_unknown_poll_item_is_reported_not_fatal() -> None:
    async with running() as rig:
        rig.sim.queue_item(bytes((0x20, 0x81)))
        await rig.until(lambda: any("unknown" in e.text for e in rig.of(StatusReported)))
        unknown = [e for e in rig.of(StatusReported) if "unknown" in e.text]
        assert unknown[0].text.startswith("unknown item 0x20") and not unknown[0].fault
        assert not rig.of(BillStacked)  # the rest of that reply was not trusted
        assert rig.device.state is DeviceState.READY


async def test_bill_removed_from_escrow_settles_escrow() -> None:
    async with running() as rig:
        rig.control(cmd="insert", bill_type=0)
        await rig.until(lambda: rig.of(BillInEscrow))
        rig.sim.ignore_escrow = True
        task = asyncio.create_task(rig.device.escrow(True))
        await rig.until(lambda: "ESCROW" in rig.sim.seen)
        rig.sim.queue_item(status_item(STATUS_BILL_REMOVED))
        assert await task is EscrowOutcome.BILL_REMOVED
        assert rig.device.escrowed is None


async def test_simulator_process_with_control_socket(tmp_path: Path) -> None:
    """``python -m hil.sim`` as its own process: the device on its pty, bills through the JSON
    control socket, and the ledger read back the same way."""
    link, sock = tmp_path / "mdb.link", tmp_path / "sim.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hil.sim",
        "--devices",
        "bill",
        "--pty-link",
        str(link),
        "--control",
        str(sock),
        stdout=asyncio.subprocess.DEVNULL,
        cwd=str(REPO_ROOT),
    )
    master: BusMaster | None = None
    task: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(WAIT_S):
            while not link.exists() or not sock.exists():  # noqa: ASYNC110 - another process
                await asyncio.sleep(POLL_S)
        master = BusMaster(
            StreamLink(link.read_text().strip()), timing=Timing(slack_s=TEST_SLACK_S)
        )
        master.start()
        events: list[DeviceEvent] = []
        device = BillValidator(master, poll_interval_s=POLL_S, on_event=events.append)
        device.set_enabled(True)
        task = asyncio.create_task(device.run())
        client = ControlClient(sock)
        try:

            def call(request: dict[str, Any]) -> Any:
                return client.call(request)

            def sim_enabled() -> bool:
                return bool(call({"cmd": "status"})["bill"]["bill"]["enable_mask"])

            async with asyncio.timeout(WAIT_S):
                while not await asyncio.to_thread(sim_enabled):  # noqa: ASYNC110 - other process
                    await asyncio.sleep(POLL_S)
            answer = await asyncio.to_thread(
                call, {"device": "bill", "cmd": "insert", "value": 2000}
            )
            assert answer == {"bill_type": 2, "outcome": "escrow"}
            async with asyncio.timeout(WAIT_S):
                while device.escrowed is None:  # noqa: ASYNC110 - set by the device's loop
                    await asyncio.sleep(POLL_S)
            assert await device.escrow(True) is EscrowOutcome.STACKED
            ledger = (await asyncio.to_thread(call, {"cmd": "ledger"}))["bill"]
            assert ledger["stacked"]["2"] == 1 and ledger["value_stacked"] == 2000
            assert of_type(events, BillStacked) == [BillStacked(DEV, 2, 2000, 20)]
        finally:
            client.close()
    finally:
        if task is not None:
            await stop(task)
        if master is not None:
            await master.close()
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(WAIT_S):
            assert await proc.wait() == 0
