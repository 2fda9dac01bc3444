"""The PARMRK word codec (../shared/contracts/mdb-sim-link.md): properties and edge cases."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.errors import MdbError
from drivers.mdb.codec import (
    Resync,
    Word,
    WordDecoder,
    encode_command,
    encode_reply,
    encode_word,
    encode_words,
)

words = st.builds(Word, st.integers(0, 0xFF), st.booleans())
word_lists = st.lists(words, max_size=80)


def decode_all(chunks: list[bytes]) -> list[Word | Resync]:
    decoder = WordDecoder()
    out: list[Word | Resync] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
        assert len(decoder.pending) <= 2
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- the contract's table, byte for byte --------------------------------------------------


@pytest.mark.parametrize(
    ("value", "mode", "wire"),
    [
        (0x00, False, b"\x00"),
        (0x13, False, b"\x13"),
        (0xFE, False, b"\xfe"),
        (0xFF, False, b"\xff\xff"),
        (0x00, True, b"\xff\x00\x00"),
        (0x13, True, b"\xff\x00\x13"),
        (0xFF, True, b"\xff\x00\xff"),
    ],
)
def test_encode_word_follows_the_contract_table(value: int, mode: bool, wire: bytes) -> None:
    assert encode_word(value, mode) == wire
    assert WordDecoder().feed(wire) == [Word(value, mode)]


def test_command_carries_the_mode_bit_on_its_first_word_only() -> None:
    assert encode_command(bytes.fromhex("0b0b")) == bytes.fromhex("ff000b0b")
    assert encode_command(bytes.fromhex("0cffff00001a")) == bytes.fromhex("ff000cffffffff00001a")
    assert encode_command(b"") == b""


def test_reply_carries_the_mode_bit_on_its_last_word_only() -> None:
    assert encode_reply(bytes.fromhex("0707")) == bytes.fromhex("07ff0007")
    assert encode_reply(b"\x00") == bytes.fromhex("ff0000")  # a lone ACK
    assert encode_reply(b"\xff") == bytes.fromhex("ff00ff")  # a lone NAK
    assert encode_reply(bytes.fromhex("ff01")) == bytes.fromhex("ffffff0001")
    assert encode_reply(b"") == b""


def test_word_rejects_values_outside_a_byte() -> None:
    with pytest.raises(ValueError):
        Word(0x100)
    with pytest.raises(ValueError):
        Word(-1)


# --- round trips -------------------------------------------------------------------------


@given(word_lists)
def test_round_trip_fed_whole(ws: list[Word]) -> None:
    assert decode_all([encode_words(ws)]) == ws


@given(word_lists)
def test_round_trip_fed_byte_by_byte(ws: list[Word]) -> None:
    wire = encode_words(ws)
    assert decode_all([wire[i : i + 1] for i in range(len(wire))]) == ws


@given(word_lists, st.lists(st.integers(0, 10_000), max_size=12))
def test_round_trip_split_anywhere(ws: list[Word], cuts: list[int]) -> None:
    wire = encode_words(ws)
    chunks = split_at(wire, cuts)
    assert b"".join(chunks) == wire
    assert decode_all(chunks) == ws


@given(st.binary(min_size=1, max_size=36), st.lists(st.integers(0, 200), max_size=6))
def test_command_and_reply_blocks_round_trip(block: bytes, cuts: list[int]) -> None:
    command = decode_all(split_at(encode_command(block), cuts))
    assert command == [Word(block[0], True)] + [Word(b) for b in block[1:]]
    reply = decode_all(split_at(encode_reply(block), cuts))
    assert reply == [Word(b) for b in block[:-1]] + [Word(block[-1], True)]


# --- garbage -------------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=40), max_size=10))
def test_arbitrary_bytes_give_only_words_and_resyncs(chunks: list[bytes]) -> None:
    decoder = WordDecoder()
    try:
        for chunk in chunks:
            for item in decoder.feed(chunk):
                assert isinstance(item, Word | Resync)
                if isinstance(item, Resync):
                    # A resync reports exactly the two bytes that broke the encoding.
                    assert len(item.raw) == 2
                    assert item.raw[0] == 0xFF
                    assert item.raw[1] not in (0x00, 0xFF)
            assert len(decoder.pending) <= 2
    except MdbError:  # the only errors the project allows here (the decoder raises none)
        pass


@given(st.binary(max_size=200))
def test_every_input_byte_is_accounted_for(data: bytes) -> None:
    """Words, resyncs and the pending tail re-encode to exactly the input: nothing is lost."""
    decoder = WordDecoder()
    out = decoder.feed(data)
    rebuilt = b"".join(
        item.raw if isinstance(item, Resync) else encode_word(item.value, item.mode) for item in out
    )
    assert rebuilt + decoder.pending == data


@pytest.mark.parametrize("other", [b for b in range(0x01, 0xFF)])
def test_escape_followed_by_another_byte_is_a_resync(other: int) -> None:
    decoder = WordDecoder()
    assert decoder.feed(bytes((0xFF, other))) == [Resync(bytes((0xFF, other)))]
    assert decoder.pending == b""
    # And the decoder is back in step: the next block decodes.
    assert decoder.feed(bytes.fromhex("07ff0007")) == [Word(7), Word(7, True)]


@given(st.binary(max_size=60), word_lists)
def test_garbage_then_sync_then_good_words(garbage: bytes, ws: list[Word]) -> None:
    """Whatever state garbage leaves behind, one byte that is neither FF nor 00 brings the
    decoder back to a word boundary (it completes a marker, resyncs, or is a plain word), so
    the words after it decode exactly."""
    decoder = WordDecoder()
    decoder.feed(garbage)
    decoder.feed(b"\x01")
    assert decoder.pending == b""
    assert decoder.feed(encode_words(ws)) == ws


def test_split_marker_is_held_across_reads() -> None:
    decoder = WordDecoder()
    assert decoder.feed(b"\x05\xff") == [Word(5)]
    assert decoder.pending == b"\xff"
    assert decoder.feed(b"\x00") == []
    assert decoder.pending == b"\xff\x00"
    assert decoder.feed(b"\x0f\x01") == [Word(0x0F, True), Word(1)]
    assert decoder.pending == b""


def test_reset_drops_a_half_read_marker() -> None:
    decoder = WordDecoder()
    decoder.feed(b"\xff\x00")
    decoder.reset()
    assert decoder.pending == b""
    assert decoder.feed(b"\x42") == [Word(0x42)]
