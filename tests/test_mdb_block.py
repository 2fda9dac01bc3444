"""MDB blocks: CHK, the 36-byte limit, both framers, and golden vectors from real captures.

The golden vectors are the captured Necta VMC / PAX reader session quoted in
../shared/reference/mdb.md ("Cashless"); they pin the wire format byte for byte.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench._peripheral import (
    COIN_TYPE,
    EXPANSION_ID,
    FEATURE_ENABLE,
    MINI_CHANGER_TABLE,
    POLL,
    RESET,
    SETUP,
)
from drivers.errors import BlockTooLong, ChecksumError, FramingError
from drivers.mdb.block import (
    ACK,
    MAX_BLOCK_LEN,
    NAK,
    RET,
    AckReply,
    BadCommand,
    BadReply,
    CommandEvent,
    CommandFramer,
    CommandReceived,
    ControlReceived,
    DataReply,
    NakReply,
    ReplyEvent,
    ReplyFramer,
    address_of,
    checksum,
    command_block,
    reply_block,
    split_checked,
)
from drivers.mdb.codec import WordDecoder, encode_command, encode_reply, encode_word
from drivers.mdb.commands import CommandDef, CommandTable

CASHLESS = 0x10
CL_SETUP_CONFIG = CommandDef("SETUP CONFIG DATA", 0x01, sub=0x00, data_len=5)
CL_VEND_REQUEST = CommandDef("VEND REQUEST", 0x03, sub=0x00, data_len=5)
CL_VEND_SUCCESS = CommandDef("VEND SUCCESS", 0x03, sub=0x02, data_len=3)
CL_SESSION_COMPLETE = CommandDef("SESSION COMPLETE", 0x03, sub=0x04, data_len=1)
CASHLESS_TABLE = CommandTable(
    CASHLESS,
    [
        CommandDef("RESET", 0x00),
        CL_SETUP_CONFIG,
        CommandDef("POLL", 0x02),
        CL_VEND_REQUEST,
        CL_VEND_SUCCESS,
        CL_SESSION_COMPLETE,
    ],
)


def hx(text: str) -> bytes:
    return bytes.fromhex(text)


def read_replies(wire: bytes, framer: ReplyFramer | None = None) -> list[ReplyEvent]:
    framer = framer or ReplyFramer()
    return framer.feed(WordDecoder().feed(wire))


def read_commands(wire: bytes, address: int, table: CommandTable) -> list[CommandEvent]:
    return CommandFramer(address, table.length_of()).feed(WordDecoder().feed(wire))


# --- CHK and the 36-byte limit --------------------------------------------------------------


def test_checksum_is_the_sum_modulo_256() -> None:
    assert checksum(b"") == 0
    assert checksum(hx("13 00 00 0A 00 06")) == 0x23
    assert checksum(b"\xff" * 3) == (3 * 0xFF) & 0xFF


def test_address_is_the_top_five_bits() -> None:
    assert address_of(0x13) == 0x10
    assert address_of(0x0B) == 0x08
    assert address_of(0x37) == 0x30


def test_command_block_limit_is_36_bytes_with_chk() -> None:
    assert len(command_block(0x0F, bytes(34))) == MAX_BLOCK_LEN
    with pytest.raises(BlockTooLong) as exc:
        command_block(0x0F, bytes(35))
    assert exc.value.raw[:1] == b"\x0f"


def test_reply_block_limit_is_36_bytes_with_chk() -> None:
    assert len(reply_block(bytes(35))) == MAX_BLOCK_LEN
    with pytest.raises(BlockTooLong):
        reply_block(bytes(36))
    with pytest.raises(FramingError):
        reply_block(b"")


def test_split_checked() -> None:
    assert split_checked(hx("05 00 0A 0F")) == hx("05 00 0A")
    with pytest.raises(ChecksumError) as exc:
        split_checked(hx("05 00 0A 10"))
    assert exc.value.raw == hx("05 00 0A 10")
    with pytest.raises(FramingError):
        split_checked(b"\x07")
    too_long = bytes(36) + b"\x00"
    with pytest.raises(BlockTooLong):
        split_checked(too_long)


@given(st.binary(min_size=1, max_size=35))
def test_reply_block_always_checks(data: bytes) -> None:
    assert split_checked(reply_block(data)) == data


# --- golden vectors ---------------------------------------------------------------------------

GOLDEN_COMMANDS = [
    # (captured block, command, payload after the sub-command, PARMRK bytes on the link)
    ("11 00 02 00 00 02 15", CL_SETUP_CONFIG, "02 00 00 02", "FF 00 11 00 02 00 00 02 15"),
    ("13 00 00 0A 00 06 23", CL_VEND_REQUEST, "00 0A 00 06", "FF 00 13 00 00 0A 00 06 23"),
    ("13 02 00 06 1B", CL_VEND_SUCCESS, "00 06", "FF 00 13 02 00 06 1B"),
    ("13 04 17", CL_SESSION_COMPLETE, "", "FF 00 13 04 17"),
]


@pytest.mark.parametrize(("captured", "command", "payload", "wire"), GOLDEN_COMMANDS)
def test_golden_command_vectors(
    captured: str, command: CommandDef, payload: str, wire: str
) -> None:
    addr_cmd, data = command.request(CASHLESS, hx(payload))
    block = command_block(addr_cmd, data)
    assert block == hx(captured)
    assert encode_command(block) == hx(wire)
    # And a peripheral reading the link gets the block back (without CHK).
    assert read_commands(hx(wire), CASHLESS, CASHLESS_TABLE) == [CommandReceived(block[:-1])]
    assert CASHLESS_TABLE.lookup(block) is command


GOLDEN_REPLIES = [
    # (captured reply, data, PARMRK bytes on the link)
    ("05 00 0A 0F", "05 00 0A", "05 00 0A FF 00 0F"),  # VEND APPROVED, 10 scaled units
    ("07 07", "07", "07 FF 00 07"),  # END SESSION
    # Reader config data; its CHK 0x90 is the sum of the eight bytes before it: consistent.
    ("01 01 16 43 01 02 2D 05 90", "01 01 16 43 01 02 2D 05", "01 01 16 43 01 02 2D 05 FF 00 90"),
]


@pytest.mark.parametrize(("captured", "data", "wire"), GOLDEN_REPLIES)
def test_golden_reply_vectors(captured: str, data: str, wire: str) -> None:
    assert checksum(hx(data)) == hx(captured)[-1]
    assert reply_block(hx(data)) == hx(captured)
    assert encode_reply(hx(captured)) == hx(wire)
    assert read_replies(hx(wire)) == [DataReply(hx(data))]


def test_captured_reader_config_checksum_is_consistent() -> None:
    captured = hx("01 01 16 43 01 02 2D 05 90")
    assert sum(captured[:-1]) == 0x90
    assert split_checked(captured) == captured[:-1]


# --- ReplyFramer --------------------------------------------------------------------------


def test_reply_framer_lone_ack_and_nak() -> None:
    assert read_replies(hx("FF 00 00")) == [AckReply()]
    assert read_replies(hx("FF 00 FF")) == [NakReply()]


def test_reply_framer_lone_word_that_is_neither_ack_nor_nak() -> None:
    (event,) = read_replies(hx("FF 00 42"))
    assert isinstance(event, BadReply)
    assert event.error.raw == b"\x42"


def test_reply_framer_data_with_literal_ff() -> None:
    data = hx("FF 01 FF")
    wire = encode_reply(reply_block(data))
    assert wire.startswith(hx("FF FF 01 FF FF"))
    assert read_replies(wire) == [DataReply(data)]


def test_reply_framer_bad_checksum() -> None:
    (event,) = read_replies(hx("05 00 0A FF 00 10"))
    assert isinstance(event, BadReply)
    assert isinstance(event.error, ChecksumError)
    assert event.error.raw == hx("05 00 0A 10")


def test_reply_framer_too_long_then_recovers() -> None:
    framer = ReplyFramer()
    wire = bytes(range(1, 40)) + hx("FF 00 00")  # 40 words: longer than 36
    (event,) = read_replies(wire, framer)
    assert isinstance(event, BadReply)
    assert isinstance(event.error, BlockTooLong)
    assert len(event.error.raw) == MAX_BLOCK_LEN  # bounded: the rest was never stored
    assert not framer.in_progress
    assert read_replies(hx("07 FF 00 07"), framer) == [DataReply(b"\x07")]


def test_reply_framer_buffer_is_bounded_whatever_arrives() -> None:
    framer = ReplyFramer()
    decoder = WordDecoder()
    for _ in range(100):
        assert framer.feed(decoder.feed(bytes(range(1, 200)))) == []
    (event,) = framer.feed(decoder.feed(hx("FF 00 01")))
    assert isinstance(event, BadReply)
    assert len(event.error.raw) == MAX_BLOCK_LEN


def test_reply_framer_exactly_36_bytes_is_fine() -> None:
    data = bytes(range(1, 36))
    assert read_replies(encode_reply(reply_block(data))) == [DataReply(data)]


def test_reply_framer_resync_inside_a_reply_then_good() -> None:
    framer = ReplyFramer()
    events = read_replies(hx("05 00 FF 31") + hx("07 FF 00 07"), framer)
    assert len(events) == 2
    assert isinstance(events[0], BadReply)
    assert events[0].error.raw == hx("FF 31")
    assert events[1] == DataReply(b"\x07")


def test_reply_framer_resync_between_replies_is_silent() -> None:
    assert read_replies(hx("FF 31") + hx("07 FF 00 07")) == [DataReply(b"\x07")]


def test_reply_framer_garbage_then_good() -> None:
    # Plain garbage words glue onto the next reply: that reply fails its CHK, is reported bad,
    # and the one after it (what RET brings) is read cleanly.
    framer = ReplyFramer()
    events = read_replies(hx("12 34") + hx("05 00 0A FF 00 0F") + hx("05 00 0A FF 00 0F"), framer)
    assert isinstance(events[0], BadReply)
    assert events[1:] == [DataReply(hx("05 00 0A"))]


reply_data = st.binary(min_size=1, max_size=35)
words_noise = st.lists(st.tuples(st.integers(0, 0xFF), st.booleans()), max_size=50)


@given(words_noise, reply_data, st.lists(st.integers(0, 500), max_size=8))
def test_reply_after_any_whole_word_noise_and_a_mode_word(
    noise: list[tuple[int, bool]], data: bytes, cuts: list[int]
) -> None:
    """Noise made of whole words, ended by any mode-bit word, never hides the next reply."""
    wire = b"".join(encode_word(v, m) for v, m in noise) + encode_word(0x5A, True)
    wire += encode_reply(reply_block(data))
    decoder, framer = WordDecoder(), ReplyFramer()
    events: list[ReplyEvent] = []
    points = sorted({c % (len(wire) + 1) for c in cuts})
    for a, b in zip([0, *points], [*points, len(wire)], strict=True):
        events += framer.feed(decoder.feed(wire[a:b]))
    assert events[-1] == DataReply(data)
    assert all(isinstance(e, AckReply | NakReply | DataReply | BadReply) for e in events)


@given(st.binary(max_size=300), reply_data)
def test_reply_after_arbitrary_garbage_and_a_sync(garbage: bytes, data: bytes) -> None:
    """``01`` brings the decoder to a word boundary; the mode-bit word ``FF 00 01`` then closes
    whatever reply the garbage left open. The good reply after that decodes."""
    decoder, framer = WordDecoder(), ReplyFramer()
    events = framer.feed(decoder.feed(garbage + hx("01 FF 00 01")))
    assert all(isinstance(e, AckReply | NakReply | DataReply | BadReply) for e in events)
    assert not framer.in_progress
    assert framer.feed(decoder.feed(encode_reply(reply_block(data)))) == [DataReply(data)]


# --- CommandFramer ------------------------------------------------------------------------


def changer_commands(wire: bytes) -> list[CommandEvent]:
    return read_commands(wire, 0x08, MINI_CHANGER_TABLE)


def test_command_framer_reads_commands_from_the_table() -> None:
    poll = command_block(0x0B)
    coin_type = command_block(0x0C, hx("00 0F 00 03"))
    assert changer_commands(encode_command(poll) + encode_command(coin_type)) == [
        CommandReceived(poll[:-1]),
        CommandReceived(coin_type[:-1]),
    ]


def test_command_framer_sub_commands() -> None:
    exp_id = command_block(*EXPANSION_ID.request(0x08))
    feature = command_block(*FEATURE_ENABLE.request(0x08, hx("00 00 00 03")))
    assert exp_id == hx("0F 00 0F")
    events = changer_commands(encode_command(exp_id) + encode_command(feature))
    assert events == [CommandReceived(exp_id[:-1]), CommandReceived(feature[:-1])]
    assert MINI_CHANGER_TABLE.lookup(exp_id) is EXPANSION_ID
    assert MINI_CHANGER_TABLE.lookup(feature) is FEATURE_ENABLE
    assert MINI_CHANGER_TABLE.lookup(hx("0F")) is None  # sub-command not seen yet


def test_command_framer_unknown_command_and_sub_command() -> None:
    events = changer_commands(encode_command(command_block(0x0A)))  # TUBE STATUS: not in table
    assert isinstance(events[0], BadCommand)
    assert events[0].error.raw == hx("0A")
    events = changer_commands(encode_command(command_block(0x0F, b"\x07")))
    assert isinstance(events[0], BadCommand)
    assert events[0].error.raw == hx("0F 07")
    # The framer is back in step for the next block either way.
    wire = encode_command(command_block(0x0F, b"\x07")) + encode_command(command_block(0x0B))
    assert changer_commands(wire)[-1] == CommandReceived(b"\x0b")


def test_command_framer_unknown_command_words_are_not_control_words() -> None:
    """A peripheral cannot delimit a command it does not know: the rest of that block (data,
    CHK) is skipped up to the next mode-bit word, never taken for VMC control words."""
    # TUBE STATUS (0x0A) is not in the mini changer's table; its CHK 0x0A is part of the block.
    # A data byte 00 of an unknown command would likewise read as an ACK.
    events = changer_commands(encode_command(command_block(0x0A)))
    assert [type(e) for e in events] == [BadCommand]
    events = changer_commands(encode_command(command_block(0x0F, hx("07 00 00"))))
    assert not any(isinstance(e, ControlReceived) for e in events)
    # After the skipped block, control words for our next block are reported again.
    wire = encode_command(command_block(0x0A)) + encode_command(command_block(0x0B))
    assert changer_commands(wire + encode_word(ACK))[-2:] == [
        CommandReceived(b"\x0b"),
        ControlReceived(ACK),
    ]


def test_command_framer_skips_other_addresses_and_their_control_words() -> None:
    other = encode_command(hx("13 00 00 0A 00 06 23")) + encode_word(ACK)
    bill = encode_command(command_block(0x33)) + encode_word(RET)
    ours = encode_command(command_block(0x0B)) + encode_word(ACK)
    assert changer_commands(other + bill + ours) == [
        CommandReceived(b"\x0b"),
        ControlReceived(ACK),
    ]


def test_command_framer_control_words_after_our_block() -> None:
    wire = encode_command(command_block(0x09)) + encode_word(RET) + encode_word(ACK)
    wire += encode_word(NAK)
    assert changer_commands(wire) == [
        CommandReceived(b"\x09"),
        ControlReceived(RET),
        ControlReceived(ACK),
        ControlReceived(NAK),
    ]


def test_command_framer_bad_checksum() -> None:
    (event,) = changer_commands(hx("FF 00 0C 00 0F 00 03 00"))
    assert isinstance(event, BadCommand)
    assert isinstance(event.error, ChecksumError)


def test_command_framer_block_cut_short_by_the_next() -> None:
    wire = hx("FF 00 0C 00 0F") + encode_command(command_block(0x0B))
    events = changer_commands(wire)
    assert isinstance(events[0], BadCommand)
    assert events[0].error.raw == hx("0C 00 0F")
    assert events[1:] == [CommandReceived(b"\x0b")]


def test_command_framer_resync_inside_a_block() -> None:
    wire = hx("FF 00 0C 00 FF 42") + encode_command(command_block(0x0B))
    events = changer_commands(wire)
    assert isinstance(events[0], BadCommand)
    assert events[1:] == [CommandReceived(b"\x0b")]


def test_command_def_checks_its_payload_length() -> None:
    assert COIN_TYPE.request(0x08, hx("00 0F 00 03")) == (0x0C, hx("00 0F 00 03"))
    assert POLL.request(0x08) == (0x0B, b"")
    assert RESET.addr_cmd(0x08) == 0x08
    with pytest.raises(FramingError):
        COIN_TYPE.request(0x08, b"\x00")
    with pytest.raises(FramingError):
        SETUP.request(0x08, b"\x00")


changer_cmds = st.sampled_from([RESET, SETUP, POLL, COIN_TYPE, EXPANSION_ID, FEATURE_ENABLE])
controls = st.one_of(st.none(), st.sampled_from([ACK, RET, NAK]))
ours = st.tuples(st.just("ours"), changer_cmds, st.binary(min_size=5, max_size=5), controls)
theirs = st.tuples(
    st.just("theirs"),
    st.sampled_from([0x10, 0x13, 0x30, 0x33, 0x60, 0x62]),
    st.binary(max_size=34),
    controls,
)


@given(st.lists(st.one_of(ours, theirs), max_size=25))
def test_command_framer_on_a_shared_bus(
    traffic: list[tuple[str, object, bytes, int | None]],
) -> None:
    """Any mix of blocks for us and for other devices, each maybe followed by a control word:
    we see exactly our blocks and the control words that follow them."""
    wire = b""
    expected: list[CommandEvent] = []
    for kind, what, payload, control in traffic:
        if kind == "ours":
            assert isinstance(what, CommandDef)
            sub_len = 1 if what.sub is not None else 0
            addr_cmd, data = what.request(0x08, payload[: what.data_len - sub_len])
            block = command_block(addr_cmd, data)
            expected.append(CommandReceived(block[:-1]))
            if control is not None:
                expected.append(ControlReceived(control))
        else:
            assert isinstance(what, int)
            block = command_block(what, payload)
        wire += encode_command(block)
        if control is not None:
            wire += encode_word(control)
    assert changer_commands(wire) == expected
