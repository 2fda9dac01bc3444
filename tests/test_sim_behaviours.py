"""The simulators' legitimate-but-awkward behaviours, each over real MDB bytes on a pty (or TCP):
byte-identical events back to back, several items in one POLL reply, late replies answered
again after the VMC's retransmission, NAK, a self-reset mid-session, a port that disappears
and returns, physical state kept across runs, and the ledger's "told the VMC" totals.

Most tests play the VMC byte by byte (``RawVmc``), so that what is asserted is exactly what a
real VMC would read; a few drive ``drivers.mdb.master.BusMaster`` to show the daemon's own
line code copes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
import tty
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.errors import LinkClosed, NoResponse
from drivers.mdb.block import (
    ACK,
    AckReply,
    DataReply,
    NakReply,
    ReplyEvent,
    ReplyFramer,
    command_block,
)
from drivers.mdb.codec import WordDecoder, encode_command, encode_word
from drivers.mdb.link import StreamLink
from drivers.mdb.master import BusMaster, Timing
from hil.sim.bill import BillValidatorSim
from hil.sim.bus import SimBus
from hil.sim.coin import CHANGER_MAX_POLL_BYTES, CoinChangerSim
from hil.sim.control import ControlClient, dispatch
from hil.sim.peripheral import SimPeripheral
from hil.sim.state import SimStateFile
from tests.waiting import WAIT_S, wait_until

COIN = 0x08
COIN_RESET, COIN_SETUP, COIN_TUBE_STATUS, COIN_POLL, COIN_TYPE, COIN_DISPENSE = (
    COIN | c for c in range(6)
)
BILL = 0x30
BILL_RESET, BILL_POLL, BILL_TYPE, BILL_ESCROW = BILL | 0, BILL | 3, BILL | 4, BILL | 5
#: Every coin type of the default changer enabled, no manual dispense.
ALL_COINS = bytes((0x00, 0x3F, 0x00, 0x00))
#: Bill types 0-4 enabled; with and without escrow.
BILLS_WITH_ESCROW = bytes((0x00, 0x1F, 0x00, 0x1F))
BILLS_WITHOUT_ESCROW = bytes((0x00, 0x1F, 0x00, 0x00))
ESCROW_STACK = b"\x01"
COIN_JUST_RESET = b"\x0b"
BILL_JUST_RESET = b"\x06"
BILL_DISABLED = b"\x09"
#: A healthy simulator answers within this (its serving thread is idle): used only where a
#: test must see that nothing came, never as a timing assertion.
QUIET_S = 0.05
#: The MDB response window a real VMC waits before it retransmits.
T_RESPONSE_S = 0.005
#: A payout short enough for a test to wait out.
FAST_PAYOUT_S = 0.05
#: How long a dropped link stays down in these tests.
LINK_DOWN_S = 0.3
#: The master's scheduling slack beyond the 5 ms window: generous where a test must not see a
#: retransmission on a loaded machine, tight where a late reply must miss the window.
LOADED_SLACK_S = 0.03
TIGHT_SLACK_S = 0.002


# --- the VMC, byte by byte ----------------------------------------------------------------


class RawVmc:
    """The VMC's side of a simulated link: command blocks in the PARMRK encoding out, replies
    framed with the drivers' own ``ReplyFramer`` in."""

    def __init__(self, port: str) -> None:
        self.sock: socket.socket | None = None
        if port.startswith("socket://"):
            host, _, number = port.removeprefix("socket://").rpartition(":")
            self.sock = socket.create_connection((host, int(number)), WAIT_S)
            self.sock.setblocking(False)
            self.fd = self.sock.fileno()
        else:
            self.fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            tty.setraw(self.fd)
        self._decoder = WordDecoder()
        self._framer = ReplyFramer()
        self._events: deque[ReplyEvent] = deque()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        else:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def send(self, addr_cmd: int, data: bytes = b"") -> None:
        os.write(self.fd, encode_command(command_block(addr_cmd, data)))

    def ack(self) -> None:
        os.write(self.fd, encode_word(ACK))

    def read_bytes(self, timeout_s: float) -> bytes:
        """What arrives within ``timeout_s``; b"" on a timeout. Raises EOFError at hang-up."""
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return b""
        try:
            data = os.read(self.fd, 4096)
        except OSError as exc:
            raise EOFError(f"link read failed: {exc}") from exc
        if not data:
            raise EOFError("link closed by the simulator")
        return data

    def reply(self, timeout_s: float = WAIT_S) -> ReplyEvent:
        deadline = time.monotonic() + timeout_s
        while not self._events:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no reply within {timeout_s} s")
            chunk = self.read_bytes(remaining)
            self._events.extend(self._framer.feed(self._decoder.feed(chunk)))
        return self._events.popleft()

    def nothing_within(self, timeout_s: float) -> bool:
        if self._events:
            return False
        chunk = self.read_bytes(timeout_s)
        self._events.extend(self._framer.feed(self._decoder.feed(chunk)))
        return not chunk

    def exchange(self, addr_cmd: int, data: bytes = b"", *, ack: bool = True) -> bytes | None:
        """One command; the reply's data (b"" for a lone ACK, None for a NAK), ACKed."""
        self.send(addr_cmd, data)
        event = self.reply()
        if isinstance(event, DataReply):
            if ack:
                self.ack()
            return event.data
        if isinstance(event, AckReply):
            return b""
        if isinstance(event, NakReply):
            return None
        raise AssertionError(f"bad reply: {event}")


@contextlib.contextmanager
def raw_bus(*peripherals: SimPeripheral) -> Iterator[tuple[RawVmc, SimBus]]:
    bus = SimBus.on_pty(list(peripherals))
    bus.start()
    vmc = RawVmc(bus.port)
    try:
        yield vmc, bus
    finally:
        vmc.close()
        bus.stop()


@contextlib.asynccontextmanager
async def master_on_sim(sim: SimPeripheral, slack_s: float) -> AsyncIterator[BusMaster]:
    """The daemon's own line code on a simulated bus."""
    bus = SimBus.on_pty([sim])
    bus.start()
    master = BusMaster(StreamLink(bus.port), timing=Timing(slack_s=slack_s))
    master.start()
    try:
        yield master
    finally:
        await master.close()
        bus.stop()


def start_coin(vmc: RawVmc, sim: CoinChangerSim) -> None:
    """RESET, JUST RESET taken, every coin type enabled; ends with nothing in flight."""
    assert vmc.exchange(COIN_RESET) == b""
    assert vmc.exchange(COIN_POLL) == COIN_JUST_RESET
    assert vmc.exchange(COIN_TYPE, ALL_COINS) == b""
    assert sim.counters.acks == 1  # the ACK of JUST RESET was read before COIN TYPE


def start_bill(vmc: RawVmc, types: bytes) -> None:
    assert vmc.exchange(BILL_RESET) == b""
    assert vmc.exchange(BILL_POLL) == BILL_JUST_RESET + BILL_DISABLED
    assert vmc.exchange(BILL_TYPE, types) == b""
    assert vmc.exchange(BILL_POLL) == b""


def control(sim: SimPeripheral, request: dict[str, Any], bus: SimBus | None = None) -> Any:
    """A control request as the JSON-lines socket delivers it."""
    return dispatch([sim], {"device": sim.NAME, **json.loads(json.dumps(request))}, bus)


# --- 1. identical events back to back -----------------------------------------------------


def test_two_coins_to_the_cashbox_give_byte_identical_poll_replies() -> None:
    sim = CoinChangerSim()
    with raw_bus(sim) as (vmc, _bus):
        start_coin(vmc, sim)
        control(sim, {"cmd": "set_tube", "coin_type": 4, "count": 0})
        answer = control(sim, {"cmd": "insert", "coin_type": 4, "route": "cashbox", "count": 2})
        assert answer["result"] == "cashbox" and answer["waiting"] == 1
        assert vmc.exchange(COIN_POLL) == b"\x44\x00"
        assert vmc.exchange(COIN_POLL) == b"\x44\x00"
        assert vmc.exchange(COIN_POLL) == b""
        ledger = sim.ledger()
        assert ledger["inserted"]["4"] == {"tubes": 0, "cashbox": 2, "rejected": 0}
        assert ledger["tubes"]["4"] == 0
        assert ledger["acked_deposited"] == {"count": 2, "value": 200}


def test_coins_forced_into_a_tube_report_the_growing_count() -> None:
    sim = CoinChangerSim()
    with raw_bus(sim) as (vmc, _bus):
        start_coin(vmc, sim)
        control(sim, {"cmd": "set_tube", "coin_type": 0, "count": 3})
        control(sim, {"cmd": "insert", "value": 5, "route": "tubes", "count": 2})
        assert vmc.exchange(COIN_POLL) == b"\x50\x04"
        assert vmc.exchange(COIN_POLL) == b"\x50\x05"
        assert vmc.exchange(COIN_TUBE_STATUS)[2] == 5  # type: ignore[index]


@pytest.mark.parametrize(
    "request_fields",
    [
        {"coin_type": 5, "route": "tubes"},  # 2 EUR has no tube
        {"coin_type": 0, "route": "hopper"},
        {"coin_type": 0, "count": 0},
        {"coin_type": 4, "route": "tubes", "count": 41},  # 10 in a tube of 50
    ],
)
def test_coin_insert_refuses_what_no_changer_can_do(request_fields: dict[str, Any]) -> None:
    sim = CoinChangerSim()
    sim.accept_mask = 0x3F
    with pytest.raises(ValueError):
        control(sim, {"cmd": "insert", **request_fields})
    assert sim.poll_items == [COIN_JUST_RESET]  # nothing was inserted


def test_bills_inserted_with_a_count_each_go_through_escrow() -> None:
    sim = BillValidatorSim()
    with raw_bus(sim) as (vmc, _bus):
        start_bill(vmc, BILLS_WITH_ESCROW)
        answer = control(sim, {"cmd": "insert", "bill_type": 1, "count": 2})
        assert answer["outcome"] == "escrow" and answer["waiting"] == 1
        assert vmc.exchange(BILL_POLL) == b"\x91"  # bill 1 in escrow
        assert sim.ledger()["bills_waiting"] == 1  # the second waits for the escrow to free
        assert vmc.exchange(BILL_POLL) == b""  # the escrow is taken: the next bill waits
        assert vmc.exchange(BILL_ESCROW, ESCROW_STACK) == b""
        assert vmc.exchange(BILL_POLL) == b"\x81"  # stacked; now the next one goes in
        assert vmc.exchange(BILL_POLL) == b"\x91"
        assert vmc.exchange(BILL_ESCROW, ESCROW_STACK) == b""
        assert vmc.exchange(BILL_POLL) == b"\x81"
        assert vmc.exchange(BILL_POLL) == b""
        ledger = sim.ledger()
        assert ledger["stacked"]["1"] == 2 and ledger["bills_waiting"] == 0
        assert ledger["stacked_total"] == {"count": 2, "value": 2000}
        assert ledger["acked_stacked"] == {"count": 2, "value": 2000}


def test_bills_without_escrow_give_byte_identical_poll_replies() -> None:
    sim = BillValidatorSim()
    with raw_bus(sim) as (vmc, _bus):
        start_bill(vmc, BILLS_WITHOUT_ESCROW)
        answer = control(sim, {"cmd": "insert", "value": 500, "count": 2})
        assert answer["outcome"] == "stacked" and answer["waiting"] == 1
        assert vmc.exchange(BILL_POLL) == b"\x80"
        assert vmc.exchange(BILL_POLL) == b"\x80"
        assert vmc.exchange(BILL_POLL) == b""
        assert sim.ledger()["acked_stacked"] == {"count": 2, "value": 1000}


# --- 2. several activity items in one POLL reply ------------------------------------------


def test_batch_items_holds_poll_items_until_that_many_are_queued() -> None:
    sim = CoinChangerSim()
    with raw_bus(sim) as (vmc, _bus):
        start_coin(vmc, sim)
        control(sim, {"cmd": "fault", "batch_items": 3})
        control(sim, {"cmd": "set_tube", "coin_type": 1, "count": 0})
        control(sim, {"cmd": "insert", "coin_type": 1, "count": 2})
        assert vmc.exchange(COIN_POLL) == b""  # one queued, held back; the second drops in
        assert vmc.exchange(COIN_POLL) == b""  # two queued, held back
        control(sim, {"cmd": "lever"})
        assert vmc.exchange(COIN_POLL) == b"\x51\x01\x51\x02\x01"
        assert vmc.exchange(COIN_POLL) == b""
        assert sim.ledger()["acked_deposited"] == {"count": 2, "value": 20}


def test_flush_sends_held_items_without_a_full_batch() -> None:
    sim = CoinChangerSim()
    with raw_bus(sim) as (vmc, _bus):
        start_coin(vmc, sim)
        control(sim, {"cmd": "fault", "batch_items": 5})
        control(sim, {"cmd": "lever"})
        assert vmc.exchange(COIN_POLL) == b""
        assert control(sim, {"cmd": "flush"}) == {"queued": 1}
        assert vmc.exchange(COIN_POLL) == b"\x01"
        control(sim, {"cmd": "lever"})
        assert vmc.exchange(COIN_POLL) == b""  # held again: flush is once


async def test_a_changer_poll_reply_carries_at_most_16_bytes_and_the_master_reads_them_all() -> (
    None
):
    sim = CoinChangerSim()
    async with master_on_sim(sim, LOADED_SLACK_S) as master:
        assert (await master.request(COIN_RESET)).is_ack
        assert (await master.request(COIN_POLL)).data == COIN_JUST_RESET
        assert (await master.request(COIN_TYPE, ALL_COINS)).is_ack
        control(sim, {"cmd": "fault", "batch_items": 10})
        control(sim, {"cmd": "set_tube", "coin_type": 0, "count": 0})
        control(sim, {"cmd": "insert", "coin_type": 0, "count": 10})
        for _ in range(9):  # one coin drops in after each POLL; all are held back
            assert (await master.request(COIN_POLL)).is_ack
        first = await master.request(COIN_POLL)
        assert len(first.data) == CHANGER_MAX_POLL_BYTES
        assert first.data == bytes(b for n in range(1, 9) for b in (0x50, n))
        # The rest of a released batch follows at once, not after 10 more coins.
        second = await master.request(COIN_POLL)
        assert second.data == b"\x50\x09\x50\x0a"
        await wait_until(lambda: sim.counters.acks == 3, "the sim to hear our ACKs")
        assert sim.ledger()["acked_deposited"] == {"count": 10, "value": 50}


def test_a_validator_poll_reply_carries_at_most_16_bytes() -> None:
    sim = BillValidatorSim()
    with raw_bus(sim) as (vmc, _bus):
        start_bill(vmc, BILLS_WITHOUT_ESCROW)
        control(sim, {"cmd": "fault", "batch_items": 20})
        control(sim, {"cmd": "insert", "bill_type": 0, "count": 20})
        for _ in range(19):  # one bill goes in after each POLL; all are held back
            assert vmc.exchange(BILL_POLL) == b""
        assert vmc.exchange(BILL_POLL) == b"\x80" * 16
        assert vmc.exchange(BILL_POLL) == b"\x80" * 4
        assert vmc.exchange(BILL_POLL) == b""  # read after our last ACK
        assert sim.ledger()["acked_stacked"] == {"count": 20, "value": 10000}


# --- 3. replies late past the response window ---------------------------------------------


@pytest.mark.parametrize("late_by_s", [0.01, 0.02, 0.05, 0.1])
def test_a_late_reply_is_sent_again_for_the_retransmission(late_by_s: float) -> None:
    """A peripheral slow to answer still answers; the VMC, having waited its 5 ms, sent the
    command again meanwhile, and the peripheral answers that too: a second copy of the same
    data, because the first was not ACKed when the retransmission came."""
    sim = CoinChangerSim()
    with raw_bus(sim) as (vmc, _bus):
        start_coin(vmc, sim)
        control(sim, {"cmd": "insert", "coin_type": 2})
        control(sim, {"cmd": "fault", "late_replies": 1, "late_by_s": late_by_s})
        sent = time.monotonic()
        vmc.send(COIN_POLL)
        vmc.nothing_within(T_RESPONSE_S)  # the response window passes: the VMC retransmits
        vmc.send(COIN_POLL)
        first = vmc.reply()
        waited = time.monotonic() - sent
        second = vmc.reply()
        assert waited >= late_by_s
        assert first == second == DataReply(b"\x52\x1f")  # coin 2 into its tube of 31
        vmc.ack()  # the VMC takes one copy
        assert vmc.nothing_within(QUIET_S)  # and no third
        assert vmc.exchange(COIN_POLL) == b""
        assert sim.counters.resends_after_lost_ack == 1
        assert sim.ledger()["acked_deposited"]["count"] == 1


@pytest.mark.parametrize("late_by_s", [0.02, 0.05, 0.1])
async def test_the_master_takes_a_late_reported_coin_exactly_once(late_by_s: float) -> None:
    sim = CoinChangerSim()
    async with master_on_sim(sim, TIGHT_SLACK_S) as master:
        assert (await master.request(COIN_RESET, max_attempts=5)).is_ack
        for _ in range(5):
            if (await master.request(COIN_POLL)).data == COIN_JUST_RESET:
                break
        assert (await master.request(COIN_TYPE, ALL_COINS, max_attempts=5)).is_ack
        control(sim, {"cmd": "insert", "coin_type": 3})
        control(sim, {"cmd": "fault", "late_replies": 1, "late_by_s": late_by_s})
        seen: list[bytes] = []
        for _ in range(10):
            try:
                reply = await master.request(COIN_POLL)
            except NoResponse:
                continue
            if not reply.data:
                break
            seen.append(reply.data)
        assert seen == [b"\x53\x15"]  # coin 3 into its tube of 21, taken once
        assert sim.counters.resends_after_lost_ack >= 1  # the retransmission was answered
        await wait_until(lambda: sim.ledger()["acked_deposited"]["count"] == 1, "our ACK")


# --- 4. NAK ---------------------------------------------------------------------------------


def test_nak_replies_refuse_commands_without_carrying_them_out() -> None:
    sim = CoinChangerSim()
    with raw_bus(sim) as (vmc, _bus):
        start_coin(vmc, sim)
        control(sim, {"cmd": "fault", "nak_replies": 2})
        assert vmc.exchange(COIN_TYPE, bytes(4)) is None
        assert vmc.exchange(COIN_TYPE, bytes(4)) is None
        assert sim.accept_mask == 0x3F  # not carried out
        assert vmc.exchange(COIN_TYPE, bytes(4)) == b""
        assert sim.accept_mask == 0
        assert sim.counters.naks_sent == 2 and sim.faults.nak_replies == 0


async def test_the_master_retries_a_nak_and_gets_the_answer() -> None:
    sim = CoinChangerSim()
    async with master_on_sim(sim, LOADED_SLACK_S) as master:
        sim.faults.nak_replies = 2
        reply = await master.request(COIN_SETUP)
        assert reply.attempts == 3 and reply.data[0] == 3  # level 3
        assert master.stats.naks_received == 2


# --- 5. self-reset mid-session --------------------------------------------------------------


def test_reset_after_commands_forgets_set_up_and_reports_just_reset() -> None:
    sim = CoinChangerSim()
    with raw_bus(sim) as (vmc, _bus):
        start_coin(vmc, sim)
        control(sim, {"cmd": "fault", "reset_after_commands": 2})
        assert vmc.exchange(COIN_TUBE_STATUS)  # command 1
        assert vmc.exchange(COIN_POLL) == b""  # command 2, answered in full
        assert sim.accept_mask == 0x3F and sim.counters.self_resets == 0
        assert vmc.exchange(COIN_POLL) == COIN_JUST_RESET
        assert sim.accept_mask == 0
        assert sim.counters.self_resets == 1 and sim.faults.reset_after_commands == 0
        assert vmc.exchange(COIN_POLL) == b""  # once


def test_a_bill_validator_resetting_itself_hands_back_the_escrowed_bill() -> None:
    sim = BillValidatorSim()
    with raw_bus(sim) as (vmc, _bus):
        start_bill(vmc, BILLS_WITH_ESCROW)
        control(sim, {"cmd": "insert", "bill_type": 2})
        control(sim, {"cmd": "fault", "reset_after_commands": 1})
        assert vmc.exchange(BILL_POLL) == b"\x92"
        assert vmc.exchange(BILL_POLL) == BILL_JUST_RESET + BILL_DISABLED
        ledger = sim.ledger()
        assert ledger["in_escrow"] is None and ledger["returned"]["2"] == 1


# --- 6. a port that disappears and returns ------------------------------------------------


def test_drop_link_on_a_pty_hangs_up_then_publishes_a_new_pty(tmp_path: Path) -> None:
    sim = CoinChangerSim()
    bus = SimBus.on_pty([sim])
    bus.start()
    link_file = tmp_path / "mdb.link"
    bus.publish_link_file(link_file)
    vmc = RawVmc(link_file.read_text().strip())
    try:
        start_coin(vmc, sim)
        control(sim, {"cmd": "insert", "coin_type": 0})
        tubes_before = vmc.exchange(COIN_TUBE_STATUS)
        old_port = bus.port
        answer = dispatch([sim], {"cmd": "drop_link", "seconds": LINK_DOWN_S}, bus)
        assert answer["port"] == old_port
        assert dispatch([sim], {"cmd": "link"}, bus)["up"] is False
        with pytest.raises(EOFError):
            vmc.read_bytes(WAIT_S)  # the VMC side sees the hang-up
        vmc.close()
        deadline = time.monotonic() + WAIT_S
        while not bus.link_status()["up"]:
            assert time.monotonic() < deadline, "the link did not come back"
            time.sleep(0.01)
        assert link_file.read_text().strip() == bus.port
        vmc = RawVmc(bus.port)
        # The device kept everything through the outage, its set-up included.
        assert vmc.exchange(COIN_TUBE_STATUS) == tubes_before
        assert vmc.exchange(COIN_POLL) == b"\x50\x29"  # the coin not yet polled
        assert bus.link_status()["drops"] == 1
    finally:
        vmc.close()
        bus.stop()


def test_drop_link_on_tcp_refuses_connections_then_listens_on_the_same_port() -> None:
    sim = CoinChangerSim()
    bus = SimBus.on_tcp([sim])
    bus.start()
    vmc = RawVmc(bus.port)
    host, port = bus.port.removeprefix("socket://").rsplit(":", 1)
    try:
        start_coin(vmc, sim)
        control(sim, {"cmd": "set_tube", "coin_type": 1, "count": 7})
        dispatch([sim], {"cmd": "drop_link", "seconds": LINK_DOWN_S}, bus)
        with pytest.raises(EOFError):
            vmc.read_bytes(WAIT_S)
        vmc.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), WAIT_S).close()
        deadline = time.monotonic() + WAIT_S
        while not bus.link_status()["up"]:
            assert time.monotonic() < deadline, "the link did not come back"
            time.sleep(0.01)
        assert bus.port == f"socket://{host}:{port}"
        vmc = RawVmc(bus.port)
        tubes = vmc.exchange(COIN_TUBE_STATUS)
        assert tubes is not None and tubes[3] == 7
    finally:
        vmc.close()
        bus.stop()


async def test_the_master_sees_a_dropped_pty_as_link_closed() -> None:
    sim = CoinChangerSim()
    bus = SimBus.on_pty([sim])
    bus.start()
    master = BusMaster(StreamLink(bus.port), timing=Timing(slack_s=LOADED_SLACK_S))
    master.start()
    try:
        assert (await master.request(COIN_RESET)).is_ack
        await asyncio.to_thread(bus.drop_link, LINK_DOWN_S)
        with pytest.raises(LinkClosed):
            await master.request(COIN_POLL)
    finally:
        await master.close()
        bus.stop()


def test_drop_link_refuses_while_down_and_without_a_bus() -> None:
    sim = CoinChangerSim()
    with pytest.raises(KeyError):
        dispatch([sim], {"cmd": "drop_link", "seconds": 1})
    with raw_bus(sim) as (_vmc, bus):
        with pytest.raises(ValueError):
            bus.drop_link(-1)
        bus.drop_link(LINK_DOWN_S)
        with pytest.raises(RuntimeError):
            bus.drop_link(LINK_DOWN_S)


# --- 7. physical state across restarts ------------------------------------------------------


def test_state_file_follows_every_physical_change(tmp_path: Path) -> None:
    path = tmp_path / "sim-mdb.state.json"
    coin, bill = CoinChangerSim(), BillValidatorSim()
    state = SimStateFile(path, [coin, bill])
    assert state.load() is False
    bus = SimBus.on_pty([coin, bill])
    bus.state_file = state
    bus.start()
    vmc = RawVmc(bus.port)

    def saved() -> dict[str, Any]:
        devices: dict[str, Any] = json.loads(path.read_text())["devices"]
        return devices

    try:
        control(coin, {"cmd": "set_tube", "coin_type": 0, "count": 12, "capacity": 90}, bus)
        assert saved()["coin"]["tubes"]["0"] == {"count": 12, "capacity": 90}
        start_coin(vmc, coin)
        control(coin, {"cmd": "insert", "coin_type": 0}, bus)
        assert saved()["coin"]["tubes"]["0"]["count"] == 13
        control(coin, {"cmd": "set_payout_time", "seconds": FAST_PAYOUT_S}, bus)
        assert vmc.exchange(COIN_DISPENSE, bytes((0x30,))) == b""  # 3 coins of type 0
        time.sleep(FAST_PAYOUT_S)  # the coins leave over the payout time
        vmc.exchange(COIN_POLL)
        assert saved()["coin"]["tubes"]["0"]["count"] == 10
        start_bill(vmc, BILLS_WITHOUT_ESCROW)
        control(bill, {"cmd": "insert", "bill_type": 0, "count": 2}, bus)
        assert saved()["bill"]["stacker_count"] == 1
        assert vmc.exchange(BILL_POLL) == b"\x80"  # the second bill goes in after this POLL
        assert saved()["bill"]["stacker_count"] == 2
        control(bill, {"cmd": "remove_cashbox"}, bus)
        assert saved()["bill"]["cashbox_in"] is False
        control(bill, {"cmd": "replace_cashbox"}, bus)
        assert saved()["bill"] == {
            "stacker_count": 0,
            "cashbox_in": True,
            "jammed": False,
            "jammed_bill": None,
        }
    finally:
        vmc.close()
        bus.stop()
    again_coin, again_bill = CoinChangerSim(), BillValidatorSim()
    assert SimStateFile(path, [again_coin, again_bill]).load() is True
    assert (again_coin.coins[0].count, again_coin.coins[0].capacity) == (10, 90)
    assert again_coin.coins[1].count == coin.coins[1].count


def test_a_jam_survives_a_restart_and_is_reported_after_just_reset(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    coin = CoinChangerSim()
    control(coin, {"cmd": "jam", "kind": "coin"})
    SimStateFile(path, [coin]).save_if_changed()
    again = CoinChangerSim()
    SimStateFile(path, [again]).load()
    assert again.coin_jam and again.poll_items == [COIN_JUST_RESET, b"\x0c"]


def test_a_state_file_that_is_not_ours_stops_the_start(tmp_path: Path) -> None:
    from hil.sim.__main__ import main

    path = tmp_path / "state.json"
    path.write_text('{"version": 1, "devices": {"coin": {"tubes": {"5": {}}}}}')
    with pytest.raises(SystemExit, match="coin"):
        main(["--devices", "coin", "--pty-link", str(tmp_path / "l"), "--state", str(path)])


def test_python_m_hil_sim_keeps_tube_counts_across_restarts(tmp_path: Path) -> None:
    state = tmp_path / "sim-mdb.state.json"
    sock = tmp_path / "sim.sock"
    link = tmp_path / "mdb.link"

    def run() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "hil.sim", "--devices", "coin,bill"),
                *("--pty-link", str(link), "--control", str(sock), "--state", str(state)),
            ],
            stdout=subprocess.DEVNULL,
        )

    def client() -> ControlClient:
        deadline = time.monotonic() + WAIT_S
        while True:
            with contextlib.suppress(OSError):
                if link.exists():
                    return ControlClient(sock)
            assert time.monotonic() < deadline, "the simulator did not start"
            time.sleep(0.02)

    process = run()
    try:
        with client() as sim:
            sim.call({"device": "coin", "cmd": "set_tube", "coin_type": 2, "count": 17})
        process.terminate()
        assert process.wait(WAIT_S) == 0
        link.unlink()
        process = run()
        with client() as sim:
            assert sim.call({"cmd": "ledger"})["coin"]["tubes"]["2"] == 17
            assert sim.call({"cmd": "link"})["up"] is True
    finally:
        process.terminate()
        process.wait(WAIT_S)


# --- 8. what the VMC was told ---------------------------------------------------------------


def test_ledger_tells_coins_the_vmc_acked_from_coins_it_was_not_told_of() -> None:
    sim = CoinChangerSim()
    with raw_bus(sim) as (vmc, _bus):
        start_coin(vmc, sim)
        control(sim, {"cmd": "insert", "coin_type": 5, "count": 2})  # 2 EUR: the cashbox
        assert vmc.exchange(COIN_POLL) == b"\x45\x00"
        assert vmc.exchange(COIN_POLL, ack=False) == b"\x45\x00"  # our ACK never went
        control(sim, {"cmd": "insert", "coin_type": 4, "route": "cashbox"})
        ledger = sim.ledger()
        assert ledger["deposited"] == {"count": 3, "value": 500}
        assert ledger["acked_deposited"] == {"count": 1, "value": 200}
        # The unACKed reply comes again; once ACKed it counts, once.
        assert vmc.exchange(COIN_POLL) == b"\x45\x00"
        assert vmc.exchange(COIN_POLL) == b"\x44\x0a"
        assert vmc.exchange(COIN_POLL) == b""  # read after our ACK
        assert sim.ledger()["acked_deposited"] == {"count": 3, "value": 500}


def test_manual_dispenses_the_vmc_acked_are_counted_apart() -> None:
    sim = CoinChangerSim()
    with raw_bus(sim) as (vmc, _bus):
        start_coin(vmc, sim)
        sim.manual_mask = 0x3F
        control(sim, {"cmd": "manual_dispense", "coin_type": 1, "count": 3})
        assert vmc.exchange(COIN_POLL) == b"\xb1\x25"
        assert vmc.exchange(COIN_POLL) == b""  # read after our ACK
        assert sim.ledger()["acked_dispensed_manually"] == {"count": 3, "value": 30}


# --- faults through the control socket ------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [{"nak_replies": -1}, {"unplugged": "yes"}, {"no_such_fault": 1}, {"late_by_s": -0.1}],
)
def test_bad_fault_requests_change_nothing(fields: dict[str, Any]) -> None:
    sim = CoinChangerSim()
    before = sim.faults.as_dict()
    with pytest.raises((KeyError, ValueError)):
        control(sim, {"cmd": "fault", "drop_replies": 3, **fields})
    assert sim.faults.as_dict() == before
