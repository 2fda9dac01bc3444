"""VMC96 motor board: frame codec, payloads, drop detection, the simulator's model, and the
driver against the simulator over a real pty (in a thread, and as a subprocess)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from drivers.errors import DriverError, MotorError
from drivers.motor import (
    MotorBoardOffline,
    MotorOutcome,
    MotorProtocolError,
    SlotOutOfRange,
    TurnAborted,
    TurnOutcomeUnknown,
    TurnResult,
    Vmc96Board,
)
from drivers.motor import vmc96 as proto
from drivers.motor.vmc96 import (
    CONTROLLERS,
    FRAME_MAX_LEN,
    STX,
    DropWatch,
    Frame,
    FrameDecoder,
    ReplyMatch,
    Vmc96ChecksumError,
    Vmc96FramingError,
    classify_reply,
    decode_frame,
    encode_frame,
    encode_request,
)
from hil.sim.control import call_async as control
from hil.sim.vmc96 import Vmc96Model, Vmc96Simulator, ledger_counts

# Generous bounds for a loaded 2-core machine: the fast simulator turns in 50 ms.
TURN_TIMEOUT_S = 2.0
DROP_TIMEOUT_S = 0.4
REPLY_TIMEOUT_S = 0.2
#: Upper bound for "noticed within its timeout" checks, with room for a busy machine.
OFFLINE_BOUND_S = 2.0
#: Waiting for a simulator subprocess to come up or go down.
T_PROCESS_S = 15.0

ALL_SLOTS = frozenset((r, c) for r in range(proto.ROWS) for c in range(proto.COLS))

frames = st.builds(
    Frame,
    st.sampled_from(sorted(CONTROLLERS)),
    st.integers(0, 255),
    st.binary(max_size=proto.PAYLOAD_MAX_LEN),
)
slots = st.tuples(st.integers(0, proto.ROWS - 1), st.integers(0, proto.COLS - 1))


def valid_frame_starts(stream: bytes) -> list[int]:
    """Every offset in ``stream`` where a complete, valid frame begins."""
    starts = []
    for pos in range(len(stream) - 2):
        length = stream[pos + 2]
        if stream[pos] == STX and pos + length <= len(stream):
            try:
                decode_frame(stream[pos : pos + length])
            except Vmc96FramingError:
                continue
            starts.append(pos)
    return starts


def feed_in_pieces(decoder: FrameDecoder, stream: bytes, cuts: list[int]) -> list[Frame]:
    out: list[Frame] = []
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    for a, b in itertools.pairwise(bounds):
        out += decoder.feed(stream[a:b])
        assert decoder.buffered < FRAME_MAX_LEN
    return out


# --- codec: golden vectors pin the wire format --------------------------------------------------


def test_golden_vectors() -> None:
    assert encode_request(proto.PING) == bytes.fromhex("35 30 05 00 00")
    assert encode_request(proto.STOP_ALL) == bytes.fromhex("35 30 05 12 12")
    # Motor (0, 0) is id 0x11; XOR 35^30^06^13^11 = 01.
    assert encode_request(proto.RUN, bytes([proto.motor_id(0, 0)])) == bytes.fromhex(
        "35 30 06 13 11 01"
    )
    assert encode_request(proto.GLOBAL_RESET, b"\xff") == bytes.fromhex("35 00 06 01 ff cd")
    # A status reply: echo 0x10, current byte 0x5C, motor (2, 4) = id 0x35 running.
    reply = decode_frame(bytes.fromhex("35 30 07 10 5c 35 7b"))
    assert reply == Frame(0x30, 0x10, b"\x5c\x35")
    assert proto.parse_status(reply.payload) == proto.ArrayStatus(
        proto.current_ma(0x5C), frozenset({(2, 4)})
    )


def test_decode_frame_rejects_each_defect() -> None:
    good = encode_request(proto.PING)
    with pytest.raises(Vmc96ChecksumError):
        decode_frame(good[:-1] + bytes([good[-1] ^ 1]))
    for bad in (good[:4], b"\x00" + good[1:], good[:1] + b"\x99" + good[2:], good + b"\x00"):
        with pytest.raises(Vmc96FramingError):
            decode_frame(bad)


@settings(deadline=None)  # a loaded machine must not fail a codec property
@given(frames)
def test_frame_round_trip(frame: Frame) -> None:
    raw = encode_frame(frame)
    assert raw[0] == STX and raw[2] == len(raw)
    assert decode_frame(raw) == frame


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_decode_frame_arbitrary_bytes_raise_only_framing_errors(raw: bytes) -> None:
    try:
        frame = decode_frame(raw)
    except Vmc96FramingError as exc:
        assert isinstance(exc, MotorError) and isinstance(exc, DriverError)
    else:
        assert encode_frame(frame) == raw


@settings(deadline=None)
@given(st.lists(st.binary(max_size=400), max_size=12))
def test_decoder_survives_arbitrary_bytes(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    for chunk in chunks:
        for frame in decoder.feed(chunk):
            assert decode_frame(encode_frame(frame)) == frame
        assert decoder.buffered < FRAME_MAX_LEN


@settings(deadline=None)
@given(st.lists(frames, min_size=1, max_size=5), st.lists(st.integers(0, 2000), max_size=8))
def test_decoder_split_anywhere(sent: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(f) for f in sent)
    boundaries = []
    pos = 0
    for f in sent:
        boundaries.append(pos)
        pos += len(encode_frame(f))
    # A payload can itself hold a complete valid frame; the decoder may then resync onto it
    # (documented trade-off). Such streams are a different property.
    assume(valid_frame_starts(stream) == boundaries)
    assert feed_in_pieces(FrameDecoder(), stream, cuts) == sent


def test_decoder_byte_by_byte() -> None:
    sent = [Frame(0x30, 0x10, b"\x5c\x35"), Frame(0x30, 0x00), Frame(0x30, 0x15, b"\x00\x01")]
    stream = b"".join(encode_frame(f) for f in sent)
    decoder = FrameDecoder()
    out = [f for b in stream for f in decoder.feed(bytes([b]))]
    assert out == sent


def _corrupted(frame: Frame) -> bytes:
    raw = encode_frame(frame)
    bad = raw[-1] ^ 0xFF
    return raw[:-1] + bytes([bad if bad != STX else bad ^ 1])


garbage_pieces = st.one_of(
    st.binary(max_size=20),
    st.just(bytes([STX, 0x30, 0xFF])),  # a false header announcing 255 bytes
    st.just(bytes([STX])),
    st.builds(_corrupted, frames.filter(lambda f: len(f.payload) < 20)),
)


@settings(deadline=None)
@given(
    st.lists(garbage_pieces, max_size=6),
    frames.filter(lambda f: len(f.payload) < 40),
    st.lists(st.integers(0, 400), max_size=6),
)
def test_decoder_garbage_then_good_frame(pieces: list[bytes], good: Frame, cuts: list[int]) -> None:
    garbage = b"".join(pieces)
    stream = garbage + encode_frame(good)
    # Only the good frame is a valid frame anywhere in the stream (garbage that happens to
    # contain a valid frame is decoded as one, which is right but a different property).
    assume(valid_frame_starts(stream) == [len(garbage)])
    assert feed_in_pieces(FrameDecoder(), stream, cuts) == [good]


def test_decoder_false_header_does_not_hold_back_a_reply() -> None:
    ack = encode_request(proto.PING)  # same bytes as an ACK from the motor array
    decoder = FrameDecoder()
    assert decoder.feed(bytes([STX, 0x30, 0xFF, 0x12])) == []
    assert decoder.feed(ack) == [Frame(0x30, 0x00)]
    assert decoder.buffered == 0


def test_decoder_bad_checksum_then_good_frame_same_chunk() -> None:
    good = Frame(0x30, 0x15, b"\x01\x02\x03\x04")
    decoder = FrameDecoder()
    assert decoder.feed(_corrupted(good) + encode_frame(good)) == [good]
    assert decoder.discarded == len(encode_frame(good))


# --- payloads ----------------------------------------------------------------------------------


def test_motor_ids_cover_the_matrix() -> None:
    ids = {proto.motor_id(r, c) for r, c in ALL_SLOTS}
    assert len(ids) == 96 and proto.motor_id(7, 11) == 0x8C
    for r, c in ALL_SLOTS:
        assert proto.motor_coordinates(proto.motor_id(r, c)) == (r, c)
    for r, c in ((-1, 0), (8, 0), (0, 12)):
        with pytest.raises(SlotOutOfRange):
            proto.motor_id(r, c)


@settings(deadline=None)
@given(st.integers(0, 255))
def test_motor_coordinates_any_byte(mid: int) -> None:
    try:
        row, col = proto.motor_coordinates(mid)
    except MotorProtocolError:
        assert mid >> 4 in (0, 9, 10, 11, 12, 13, 14, 15) or mid & 0x0F in (0, 13, 14, 15)
    else:
        assert proto.motor_id(row, col) == mid


@settings(deadline=None)
@given(st.integers(0, 255), st.frozensets(slots, max_size=3))
def test_status_round_trip(raw: int, running: frozenset[tuple[int, int]]) -> None:
    status = proto.parse_status(proto.encode_status(raw, running))
    assert status.running == running
    assert status.current_ma == pytest.approx(raw * 500 / 255)


@settings(deadline=None)
@given(st.frozensets(slots))
def test_scan_round_trip(present: frozenset[tuple[int, int]]) -> None:
    assert proto.parse_scan(proto.encode_scan(present)) == present


@settings(deadline=None)
@given(st.lists(st.booleans(), min_size=32, max_size=32))
def test_opto_round_trip(samples: list[bool]) -> None:
    data = proto.encode_opto(samples)
    assert proto.parse_opto(data) == tuple(samples)
    assert (data[0] & 1) == samples[0]  # sample 0 is bit 0 of the first byte


@pytest.mark.parametrize(
    ("command", "frame", "expected"),
    [
        (proto.PING, Frame(0x30, 0x00), ReplyMatch.ANSWER),
        (proto.RUN, Frame(0x30, 0xFF), ReplyMatch.REJECTED),
        (proto.RUN, Frame(0x30, 0x10, b"\x00"), ReplyMatch.UNRELATED),  # late status reply
        (proto.STATUS, Frame(0x30, 0x10, b"\x00"), ReplyMatch.ANSWER),
        (proto.STATUS, Frame(0x30, 0x00), ReplyMatch.UNRELATED),  # late ACK
        (proto.STATUS, Frame(0x30, 0xFF), ReplyMatch.REJECTED),
        (proto.STATUS, Frame(0x26, 0x10, b"\x00"), ReplyMatch.UNRELATED),  # a relay board
    ],
)
def test_classify_reply(command: proto.CommandDef, frame: Frame, expected: ReplyMatch) -> None:
    assert classify_reply(command, frame) is expected


def test_reply_length_checked_against_table() -> None:
    with pytest.raises(MotorProtocolError):
        proto.check_reply_data(proto.OPTO_LINE, Frame(0x30, 0x15, b"\x00\x00\x00"))
    assert proto.check_reply_data(proto.SCAN, Frame(0x30, 0x11, bytes(12))) == bytes(12)


# --- drop detection ----------------------------------------------------------------------------


def _samples(blocked: range) -> list[bool]:
    return [k in blocked for k in range(32)]


def test_drop_watch_sees_an_edge_after_the_baseline() -> None:
    watch = DropWatch(baseline_at=100.0)
    # Sent 0.2 s after the baseline: the newest 5 samples (27..31) certainly began after it.
    assert not watch.update(_samples(range(0)), sent_at=100.2)
    assert watch.update(_samples(range(29, 31)), sent_at=100.2)


def test_drop_watch_ignores_what_may_predate_the_baseline() -> None:
    watch = DropWatch(baseline_at=100.0)
    assert not watch.update(_samples(range(5, 8)), sent_at=100.2)
    # Sample 26 straddles the baseline: the previous product, still falling at RUN time.
    assert not watch.update(_samples(range(26, 28)), sent_at=100.2)
    assert watch.update(_samples(range(27, 28)), sent_at=100.2)


def test_drop_watch_needs_the_beam_clear_first() -> None:
    watch = DropWatch(baseline_at=100.0)
    assert not watch.update(_samples(range(32)), sent_at=100.5)  # blocked all along
    assert not watch.update(_samples(range(0, 31)), sent_at=100.6)  # clearing is no drop


# --- the simulator's model with a fake clock ---------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ask(model: Vmc96Model, command: proto.CommandDef, payload: bytes = b"") -> Frame | None:
    return model.handle(decode_frame(encode_request(command, payload)))


def test_model_turn_and_opto_timing() -> None:
    clock = FakeClock()
    model = Vmc96Model(turn_time_s=1.5, fall_time_s=0.2, beam_block_s=0.06, clock=clock)
    model.set_stock(3, 4, 2)
    assert _ask(model, proto.RUN, bytes([proto.motor_id(3, 4)])) == Frame(0x30, proto.ACK)
    clock.now += 1.0
    status = _ask(model, proto.STATUS)
    assert status is not None
    assert proto.parse_status(status.payload).running == {(3, 4)}
    # Only one motor at a time.
    assert _ask(model, proto.RUN, bytes([proto.motor_id(0, 0)])) == Frame(0x30, proto.NAK)
    clock.now += 0.5 + 0.2 + 0.06 + 0.11  # turn ends, product falls, beam clear again
    opto = _ask(model, proto.OPTO_LINE)
    assert opto is not None
    samples = proto.parse_opto(opto.payload)
    # Blocked from 0.17 s to 0.11 s before now: samples 27..29 (40 ms bins, newest last).
    assert [k for k, s in enumerate(samples) if s] == [27, 28, 29]
    assert model.ledger().dropped == Counter({(3, 4): 1})
    assert model.stock(3, 4) == 1


class ModelMachine(RuleBasedStateMachine):
    """Random stocking, faults, turns and stops: products are conserved, the ledger is sane."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.model = Vmc96Model(turn_time_s=0.05, clock=self.clock)
        self.stocked = 0
        self.missing: set[tuple[int, int]] = set()

    @rule(slot=slots, count=st.integers(0, 5))
    def stock(self, slot: tuple[int, int], count: int) -> None:
        self.stocked += count - self.model.stock(*slot)
        self.model.set_stock(*slot, count)

    @rule(slot=slots, jam=st.booleans(), no_motor=st.booleans(), missed=st.integers(0, 2))
    def fault(self, slot: tuple[int, int], jam: bool, no_motor: bool, missed: int) -> None:
        self.model.set_fault(*slot, jam=jam, no_motor=no_motor, missed_drops=missed)
        (self.missing.add if no_motor else self.missing.discard)(slot)

    @rule(slot=slots)
    def run(self, slot: tuple[int, int]) -> None:
        assert _ask(self.model, proto.RUN, bytes([proto.motor_id(*slot)])) is not None

    @rule(dt=st.floats(0.0, 0.2))
    def wait(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def stop(self) -> None:
        assert _ask(self.model, proto.STOP_ALL) == Frame(0x30, proto.ACK)

    @invariant()
    def conserved(self) -> None:
        ledger = self.model.ledger()
        stock = sum(self.model.stock_levels().values())
        assert stock + sum(ledger.dropped.values()) == self.stocked
        for slot, n in ledger.dropped.items():
            assert n <= ledger.turns[slot]

    @invariant()
    def one_motor_at_most(self) -> None:
        reply = _ask(self.model, proto.STATUS)
        assert reply is not None
        running = proto.parse_status(reply.payload).running
        assert len(running) <= 1
        assert not running & self.missing


ModelMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_model_state_machine = ModelMachine.TestCase


# --- the driver against the simulator over a pty -----------------------------------------------


@pytest.fixture
def sim() -> Iterator[Vmc96Simulator]:
    with Vmc96Simulator() as simulator:
        yield simulator


@pytest.fixture
async def board(sim: Vmc96Simulator) -> AsyncIterator[Vmc96Board]:
    motor_board = Vmc96Board(sim.port, reply_timeout_s=REPLY_TIMEOUT_S)
    await motor_board.open()
    try:
        yield motor_board
    finally:
        await motor_board.close()


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        # The condition lives in the simulator's thread or process: there is no event to await.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def run(board: Vmc96Board, row: int, col: int) -> TurnResult:
    return await board.run_slot(
        row, col, turn_timeout_s=TURN_TIMEOUT_S, drop_timeout_s=DROP_TIMEOUT_S
    )


async def test_ping_version_scan(board: Vmc96Board, sim: Vmc96Simulator) -> None:
    assert await board.ping()
    assert await board.version() == "VMC96-SIM 1.0"
    assert await board.scan() == ALL_SLOTS
    sim.set_fault(2, 3, no_motor=True)
    assert await board.scan() == ALL_SLOTS - {(2, 3)}
    assert not await board.drop_sensor_blocked()


async def test_requests_are_serialised(board: Vmc96Board) -> None:
    results = await asyncio.gather(*(board.status() for _ in range(10)), board.ping())
    assert results[-1] is True
    assert all(r == proto.ArrayStatus(0.0, frozenset()) for r in results[:-1])


async def test_turn_with_drop(board: Vmc96Board, sim: Vmc96Simulator) -> None:
    sim.set_stock(1, 2, 3)
    result = await run(board, 1, 2)
    assert (result.outcome, result.dropped) == (MotorOutcome.TURNED, True)
    ledger = sim.ledger()
    assert (ledger.turns[(1, 2)], ledger.dropped[(1, 2)]) == (1, 1)
    assert sim.stock(1, 2) == 2
    assert (await board.status()).running == frozenset()


async def test_empty_slot_turns_without_drop(board: Vmc96Board, sim: Vmc96Simulator) -> None:
    result = await run(board, 0, 5)
    assert (result.outcome, result.dropped) == (MotorOutcome.TURNED, False)
    assert "no drop" in result.detail
    assert (sim.ledger().turns[(0, 5)], sim.ledger().dropped[(0, 5)]) == (1, 0)


async def test_missed_drop_then_drop_on_second_turn(board: Vmc96Board, sim: Vmc96Simulator) -> None:
    sim.set_stock(4, 7, 1)
    sim.set_fault(4, 7, missed_drops=1)
    first = await run(board, 4, 7)
    assert (first.outcome, first.dropped) == (MotorOutcome.TURNED, False)
    second = await run(board, 4, 7)
    assert (second.outcome, second.dropped) == (MotorOutcome.TURNED, True)
    assert (sim.ledger().turns[(4, 7)], sim.ledger().dropped[(4, 7)]) == (2, 1)
    assert sim.stock(4, 7) == 0


async def test_back_to_back_turns_do_not_share_a_drop() -> None:
    # The previous product is still crossing the beam when the next turn is asked for; it must
    # not be counted again (regression: the empty third turn used to report a drop).
    with Vmc96Simulator(turn_time_s=0.2, fall_time_s=0.1, stock={(2, 6): 2}) as sim:
        async with Vmc96Board(sim.port, reply_timeout_s=REPLY_TIMEOUT_S) as board:
            dropped = [(await run(board, 2, 6)).dropped for _ in range(3)]
            assert dropped == [True, True, False]
            assert (sim.ledger().turns[(2, 6)], sim.ledger().dropped[(2, 6)]) == (3, 2)


async def test_jam(board: Vmc96Board, sim: Vmc96Simulator) -> None:
    sim.set_stock(2, 2, 1)
    sim.set_fault(2, 2, jam=True)
    result = await run(board, 2, 2)
    assert (result.outcome, result.dropped) == (MotorOutcome.JAMMED, False)
    assert "mA" in result.detail
    assert (await board.status()).running == frozenset()  # the driver stopped it
    ledger = sim.ledger()
    assert (ledger.jams[(2, 2)], ledger.turns[(2, 2)], ledger.dropped[(2, 2)]) == (1, 0, 0)


async def test_missing_motor(board: Vmc96Board, sim: Vmc96Simulator) -> None:
    sim.set_stock(7, 11, 1)
    sim.set_fault(7, 11, no_motor=True)
    result = await run(board, 7, 11)
    assert (result.outcome, result.dropped) == (MotorOutcome.NO_MOTOR, False)
    assert sim.ledger().turns[(7, 11)] == 0 and sim.stock(7, 11) == 1


async def test_out_of_range_slot_sends_nothing(board: Vmc96Board, sim: Vmc96Simulator) -> None:
    before = sim.frames_in
    with pytest.raises(SlotOutOfRange):
        await run(board, 8, 0)
    assert sim.frames_in == before


async def test_blocked_beam_never_confirms_a_drop(board: Vmc96Board, sim: Vmc96Simulator) -> None:
    sim.set_stock(0, 0, 1)
    sim.set_beam_blocked(True)
    assert await board.drop_sensor_blocked()
    # Let the obstruction age past the turn's start margin (one sample plus rounding).
    async with asyncio.timeout(5.0):
        while not all((await board.opto_samples())[-5:]):  # noqa: ASYNC110 - polling the board
            await asyncio.sleep(0.01)
    result = await run(board, 0, 0)
    # The product fell (ledger) but a blocked beam cannot show it: the vend is not confirmed.
    assert (result.outcome, result.dropped) == (MotorOutcome.TURNED, False)
    assert sim.ledger().dropped[(0, 0)] == 1
    sim.set_beam_blocked(False)
    async with asyncio.timeout(5.0):  # the newest 40 ms sample still holds the block a moment
        while await board.drop_sensor_blocked():  # noqa: ASYNC110 - polling the board is the test
            await asyncio.sleep(0.01)


async def test_noisy_line_resyncs(board: Vmc96Board, sim: Vmc96Simulator) -> None:
    sim.set_line_noise(bytes([0x00, STX, 0x30, 0xFF, 0x12, STX, 0x99]))
    sim.set_stock(3, 3, 1)
    assert await board.ping()
    result = await run(board, 3, 3)
    assert (result.outcome, result.dropped) == (MotorOutcome.TURNED, True)


async def test_unplugged_is_noticed_within_the_timeout(
    board: Vmc96Board, sim: Vmc96Simulator
) -> None:
    sim.set_unplugged(True)
    start = time.monotonic()
    assert not await board.ping()
    assert time.monotonic() - start < OFFLINE_BOUND_S
    start = time.monotonic()
    with pytest.raises(MotorBoardOffline):
        await run(board, 0, 0)
    assert time.monotonic() - start < OFFLINE_BOUND_S
    before = sim.frames_in
    with pytest.raises(MotorBoardOffline):
        await board.request(proto.RUN, bytes([proto.motor_id(0, 0)]))
    assert sim.frames_in - before == 1  # RUN is never repeated: it could vend twice
    before = sim.frames_in
    with pytest.raises(MotorBoardOffline):
        await board.status()
    assert sim.frames_in - before == proto.REQUEST_ATTEMPTS
    # Plugged back: answers are not confused with the requests that timed out.
    sim.set_unplugged(False)
    assert await board.ping()
    assert (await board.status()).running == frozenset()
    assert sim.ledger().turns[(0, 0)] == 0


async def test_unplugged_mid_turn() -> None:
    with Vmc96Simulator(turn_time_s=5.0) as sim:
        async with Vmc96Board(sim.port, reply_timeout_s=REPLY_TIMEOUT_S) as board:
            sim.set_stock(1, 1, 1)
            turn = asyncio.create_task(run(board, 1, 1))
            await _until(lambda: sim.frames_in >= 3)  # baseline OPTO, RUN, STATUS
            sim.set_unplugged(True)
            start = time.monotonic()
            # The RUN went out: whether the product fell is not known.
            with pytest.raises(TurnOutcomeUnknown) as failed:
                await turn
            assert isinstance(failed.value.cause, MotorBoardOffline)
            assert time.monotonic() - start < OFFLINE_BOUND_S


async def test_stop_all_aborts_a_turn() -> None:
    with Vmc96Simulator(turn_time_s=5.0) as sim:
        async with Vmc96Board(sim.port, reply_timeout_s=REPLY_TIMEOUT_S) as board:
            turn = asyncio.create_task(run(board, 5, 5))
            await _until(lambda: sim.frames_in >= 3)
            await board.stop_all()
            with pytest.raises(TurnAborted) as aborted:
                await turn
            assert (aborted.value.row, aborted.value.col) == (5, 5)
            assert (await board.status()).running == frozenset()
            assert sim.ledger().turns[(5, 5)] == 0


async def test_turn_timeout_stops_the_motor() -> None:
    with Vmc96Simulator(turn_time_s=5.0) as sim:
        async with Vmc96Board(sim.port, reply_timeout_s=REPLY_TIMEOUT_S) as board:
            result = await board.run_slot(6, 0, turn_timeout_s=0.3, drop_timeout_s=DROP_TIMEOUT_S)
            assert result.outcome is MotorOutcome.TIMEOUT
            assert (await board.status()).running == frozenset()


async def test_cancelled_turn_stops_the_motor() -> None:
    with Vmc96Simulator(turn_time_s=5.0) as sim:
        async with Vmc96Board(sim.port, reply_timeout_s=REPLY_TIMEOUT_S) as board:
            turn = asyncio.create_task(run(board, 0, 1))
            await _until(lambda: sim.frames_in >= 3)
            turn.cancel()
            with pytest.raises(asyncio.CancelledError):
                await turn
            assert (await board.status()).running == frozenset()


async def test_port_vanishing_does_not_hang() -> None:
    sim = Vmc96Simulator()
    sim.start()
    board = Vmc96Board(sim.port, reply_timeout_s=REPLY_TIMEOUT_S)
    try:
        await board.open()
        assert await board.ping()
        sim.stop()  # the pty disappears, like a USB adapter pulled out
        start = time.monotonic()
        assert not await board.ping()
        with pytest.raises(MotorBoardOffline):
            await board.status()
        assert time.monotonic() - start < OFFLINE_BOUND_S
    finally:
        await board.close()
        await board.close()  # idempotent
        sim.stop()


async def test_open_missing_port_and_close_unopened(tmp_path: Path) -> None:
    board = Vmc96Board(str(tmp_path / "no-such-tty"))
    with pytest.raises(MotorBoardOffline):
        await board.open()
    await board.close()
    with pytest.raises(MotorBoardOffline):
        await board.status()


# --- the simulator as a process, driven through its control socket -----------------------------


async def ok(path: Path, request: dict[str, object]) -> None:
    assert await control(path, request) == {"ok": True, "result": {}}


async def test_simulator_subprocess_with_control_socket(tmp_path: Path) -> None:
    link_file = tmp_path / "vmc96.link"
    control_path = tmp_path / "vmc96.sock"
    stderr = (tmp_path / "sim.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hil.sim.vmc96",
        "--link-file",
        str(link_file),
        "--control",
        str(control_path),
        "--stock",
        "0,0,1",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        await _until(link_file.exists, T_PROCESS_S)
        port = link_file.read_text().strip()
        assert port.startswith("/dev/")
        await ok(control_path, {"cmd": "set_stock", "row": 0, "col": 1, "count": 2})
        async with Vmc96Board(port, reply_timeout_s=REPLY_TIMEOUT_S) as board:
            for slot in ((0, 0), (0, 1)):
                result = await run(board, *slot)
                assert (result.outcome, result.dropped) == (MotorOutcome.TURNED, True)
            answer = await control(control_path, {"cmd": "ledger"})
            assert answer["ok"] is True
            ledger = answer["result"]
            assert ledger_counts(ledger["turns"]) == Counter({(0, 0): 1, (0, 1): 1})
            assert ledger_counts(ledger["dropped"]) == Counter({(0, 0): 1, (0, 1): 1})
            assert ledger_counts(ledger["stock"]) == Counter({(0, 1): 1})

            await ok(control_path, {"cmd": "fault", "row": 0, "col": 1, "jam": True})
            result = await run(board, 0, 1)
            assert result.outcome is MotorOutcome.JAMMED

            await ok(control_path, {"cmd": "fault", "unplugged": True})
            assert not await board.ping()
            await ok(control_path, {"cmd": "fault", "unplugged": False})
            assert await board.ping()

            bad = await control(control_path, {"cmd": "set_stock", "row": 9, "col": 0, "count": 1})
            assert bad["ok"] is False and "SlotOutOfRange" in str(bad["error"])
            unknown = await control(control_path, {"cmd": "explode"})
            assert unknown["ok"] is False

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(T_PROCESS_S):
            assert await process.wait() == 0
        assert not link_file.exists() and not control_path.exists()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        stderr.close()
