"""The MDB bus master: one request in flight, served from a dedicated line thread.

Why a thread: the VMC must ACK a peripheral's reply within the MDB timing and answer the next
byte without waiting for the event loop, which may be busy with JSON, TLS or journal work. The
line thread owns the link; asyncio code submits requests through ``BusMaster.request`` and awaits
a future that the thread resolves with ``call_soon_threadsafe``. The thread writes the ACK the
moment a reply's CHK checks out, before any application code sees the reply.

Retries follow MDB 4.2 §2.2:
* no reply within t-response (5 ms): the VMC sends the command again;
* a reply whose CHK fails: the VMC sends RET and the peripheral sends the same data again;
* NAK from the peripheral (it could not take the command): the VMC sends the command again.
* a reply whose length or shape does not fit the command (``ReplyShape``): not ACKed, the line
  is let fall silent, and the command is sent again: a late reply of another device is never
  taken as this command's answer (mdb.md "Wire").
Every reply the master ACKs is handed up as an event: two byte-identical replies in a row are
normally two events (two coins of one type to the cashbox), so nothing here drops a reply for
matching the one before. Only a device fact can prove a repeat; that is the device layer's call.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import itertools
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from drivers.errors import BlockTooLong, LinkClosed, MdbError, NakReceived, NoResponse
from drivers.mdb.block import (
    ACK,
    MAX_BLOCK_LEN,
    RET,
    AckReply,
    BadReply,
    DataReply,
    NakReply,
    ReplyEvent,
    ReplyFramer,
    address_of,
    command_block,
)
from drivers.mdb.codec import WordDecoder
from drivers.mdb.commands import ACK_OR_DATA, ReplyShape
from drivers.mdb.link import MdbLink
from drivers.mdb.pcap import Direction, PcapWriter

if TYPE_CHECKING:
    # At run time, imported by the async methods that use it: the MDB line process runs the
    # line thread's half only and need not load asyncio (its memory and start-up time:
    # bench/footprint.py).
    import asyncio

log = logging.getLogger("drivers.mdb.master")
TRACE = 5  # below DEBUG: every byte exchanged

#: MDB 4.2 §2.3 t-response: a peripheral starts its reply within 5 ms of the command's end.
T_RESPONSE_S = 0.005
#: MDB 4.2 §2.3 t-inter-byte: at most 1 ms of idle line between the words of one block.
T_INTER_BYTE_S = 0.001
#: One 11-bit word at 9600 baud (start, 8 data, mode, stop): the pace of a paced reply.
WORD_TIME_S = 11 / 9600
#: MDB 4.2 §2.2: how often the VMC asks for a retransmission (RET) of a garbled reply before
#: it gives up on that attempt and sends the command again.
MAX_RET_PER_ATTEMPT = 2
#: Attempts per request (first send + retransmissions) before NoResponse / NakReceived. The
#: device's non-response time (2 s coin, 5 s bill) decides when it is gone, not this.
DEFAULT_MAX_ATTEMPTS = 3
#: Longest drain after a timed-out attempt, in first-word timeouts (a peripheral still
#: sending a long late reply at 9600 baud needs up to 36 word times).
MAX_DRAIN_FACTOR = 8
#: Upper bound for one request from submission to result: queueing behind other devices'
#: exchanges plus every attempt's timeouts. Only a dead line thread can reach it.
REQUEST_DEADLINE_S = 2.0
#: How long the line thread waits on its queue before checking for a stop request.
QUEUE_WAIT_S = 0.1
#: MDB 4.2 §2.3: a bus reset is a BREAK of at least 100 ms ...
BUS_RESET_BREAK_S = 0.1
#: ... and after it, 200 ms before talking to peripherals.
BUS_RESET_QUIET_S = 0.2
#: The interpreter's GIL switch interval while the bus runs (default 5 ms): a thread holding
#: the GIL in pure Python gives it up within this, so the line thread can ACK in time.
GIL_SWITCH_INTERVAL_S = 0.0005


class Priority(enum.IntEnum):
    """Lower runs first: resets before polls before everything else."""

    RESET = 0
    POLL = 1
    COMMAND = 2


#: How a line reports its scheduling when it is not real-time.
SCHED_NORMAL = "normal"


def set_realtime_priority(priority: int) -> str:
    """Put the calling thread (in the line process: the process) under SCHED_FIFO at
    ``priority``, best effort: without RLIMIT_RTPRIO or CAP_SYS_NICE the kernel refuses, and the
    line still works, only with a longer tail. Returns how the line is now scheduled."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as exc:
        return f"{SCHED_NORMAL} (SCHED_FIFO {priority} refused: {exc.strerror or exc})"
    return f"SCHED_FIFO {priority}"


@dataclass(frozen=True, slots=True)
class Reply:
    """A peripheral's answer. ``data`` is empty for a lone ACK."""

    addr_cmd: int
    data: bytes
    attempts: int = 1
    reply_ns: int = 0  # perf_counter_ns when the reply's last word arrived
    ack_ns: int = 0  # perf_counter_ns when our ACK was written (0 for a lone ACK)

    @property
    def is_ack(self) -> bool:
        return not self.data


@dataclass(slots=True)
class Timing:
    """Timeouts for one link; ``slack_s`` absorbs scheduling delay on a loaded board."""

    response_s: float = T_RESPONSE_S
    inter_byte_s: float = T_INTER_BYTE_S
    word_s: float = WORD_TIME_S
    slack_s: float = 0.002

    @property
    def first_word_s(self) -> float:
        return self.response_s + self.word_s + self.slack_s

    @property
    def next_word_s(self) -> float:
        return self.word_s + self.inter_byte_s + self.slack_s


@dataclass(slots=True)
class BusStats:
    exchanges: int = 0
    retransmissions: int = 0
    rets_sent: int = 0
    naks_received: int = 0
    timeouts: int = 0
    misfits: int = 0  # replies whose shape did not fit the command: not ACKed
    stale_bytes: int = 0


@dataclass(order=True, slots=True)
class _Request:
    priority: int
    seq: int
    addr_cmd: int = field(compare=False)
    data: bytes = field(compare=False)
    max_attempts: int = field(compare=False)
    future: asyncio.Future[Reply] | None = field(compare=False)
    loop: asyncio.AbstractEventLoop | None = field(compare=False)
    expect: ReplyShape = field(compare=False, default=ACK_OR_DATA)


class MdbBus(abc.ABC):
    """One MDB bus as device classes use it: one request in flight, by priority, each reply
    already ACKed. ``BusMaster`` serves the line from a thread of this process;
    ``drivers.mdb.line_process.LineProcessMaster`` from a process of its own."""

    timing: Timing
    stats: BusStats
    #: How the line is scheduled, once started (see ``set_realtime_priority``).
    scheduling: str

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def request(
        self,
        addr_cmd: int,
        data: bytes = b"",
        *,
        priority: Priority = Priority.COMMAND,
        max_attempts: int | None = None,
        expect: ReplyShape = ACK_OR_DATA,
    ) -> Reply: ...

    @abc.abstractmethod
    async def bus_reset(self, duration_s: float = BUS_RESET_BREAK_S) -> bool: ...


class BusMaster(MdbBus):
    """Serialises every exchange on one MDB bus through a line thread."""

    def __init__(
        self,
        link: MdbLink,
        *,
        timing: Timing | None = None,
        pcap: PcapWriter | None = None,
        realtime_priority: int | None = None,
    ) -> None:
        self.link = link
        self.timing = timing or Timing()
        self.pcap = pcap
        self.stats = BusStats()
        self._realtime_priority = realtime_priority
        #: How the line thread is scheduled once started (see ``set_realtime_priority``).
        self.scheduling = SCHED_NORMAL
        self._queue: queue.PriorityQueue[_Request] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # One user of the wire at a time: the line thread's exchanges, a bus reset from another.
        self._wire = threading.Lock()
        self._decoder = WordDecoder()
        self._framer = ReplyFramer()
        self._saved_switch_interval: float | None = None

    # --- asyncio side ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._saved_switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._saved_switch_interval, GIL_SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._serve, name="mdb-line", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop the line thread, fail what is queued, close the link. Idempotent."""
        thread = self._thread
        if thread is not None:
            self._stopping.set()
            self._queue.put(_Request(-1, -1, 0, b"", 0, None, None))
            import asyncio  # see the TYPE_CHECKING import

            await asyncio.to_thread(thread.join, 1.0)
            self._thread = None
        self._fail_queued(LinkClosed("bus master closed"))
        self.link.close()
        if self.pcap is not None:
            self.pcap.close()
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None

    async def request(
        self,
        addr_cmd: int,
        data: bytes = b"",
        *,
        priority: Priority = Priority.COMMAND,
        max_attempts: int | None = None,
        expect: ReplyShape = ACK_OR_DATA,
    ) -> Reply:
        """Send one command block and return the peripheral's reply (already ACKed).

        Raises NoResponse, NakReceived or LinkClosed. ``max_attempts=1`` for commands that must
        not be sent twice blindly (a payout whose ACK was lost is checked by status instead).
        ``expect``: the shape of a valid answer; anything else is not ACKed and counts as no
        answer.
        """
        import asyncio  # see the TYPE_CHECKING import

        if self._thread is None or self._stopping.is_set():
            raise LinkClosed("bus master is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        attempts = max_attempts if max_attempts is not None else DEFAULT_MAX_ATTEMPTS
        command_block(addr_cmd, data)  # raise BlockTooLong here, in the caller
        self._queue.put(
            _Request(int(priority), next(self._seq), addr_cmd, data, attempts, future, loop, expect)
        )
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that lands in the same loop turn as the result, and a cancelled device task would
            # then go on polling.
            async with asyncio.timeout(REQUEST_DEADLINE_S):
                return await asyncio.shield(future)
        except TimeoutError as exc:
            future.cancel()
            raise NoResponse(address_of(addr_cmd), 0) from exc
        except asyncio.CancelledError:
            future.cancel()  # the line thread skips it if it has not started it
            raise

    async def bus_reset(self, duration_s: float = BUS_RESET_BREAK_S) -> bool:
        """MDB bus reset (BREAK ≥ 100 ms, then 200 ms quiet). False on simulated links."""
        import asyncio  # see the TYPE_CHECKING import

        sent = await asyncio.to_thread(self.bus_reset_blocking, duration_s)
        if sent:
            await asyncio.sleep(BUS_RESET_QUIET_S)
        return sent

    # --- line thread -----------------------------------------------------------------------

    def _serve(self) -> None:
        if self._realtime_priority:
            self.scheduling = set_realtime_priority(self._realtime_priority)
        while not self._stopping.is_set():
            try:
                req = self._queue.get(timeout=QUEUE_WAIT_S)
            except queue.Empty:
                continue
            if req.future is None:
                continue  # the stop sentinel
            if req.future.cancelled():
                continue
            result: Reply | MdbError
            try:
                result = self._exchange(req.addr_cmd, req.data, req.max_attempts, req.expect)
            except MdbError as exc:
                result = exc
            except Exception as exc:  # a bug here must fail the caller, not kill the thread
                log.exception("mdb line thread: unexpected error")
                result = MdbError(f"line thread error: {exc!r}")
            self._resolve(req, result)
            if isinstance(result, LinkClosed):
                self._stopping.set()
                self._fail_queued(result)

    def _fail_queued(self, error: MdbError) -> None:
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                return
            self._resolve(req, error)

    @staticmethod
    def _resolve(req: _Request, result: Reply | MdbError) -> None:
        future, loop = req.future, req.loop
        if future is None or loop is None:
            return

        def settle() -> None:
            if future.done():
                return
            if isinstance(result, Reply):
                future.set_result(result)
            else:
                future.set_exception(result)

        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(settle)

    def exchange_blocking(
        self,
        addr_cmd: int,
        data: bytes = b"",
        max_attempts: int = 1,
        expect: ReplyShape = ACK_OR_DATA,
    ) -> Reply:
        """One exchange from the calling thread (benchmarks and tools without a loop)."""
        return self._exchange(addr_cmd, data, max_attempts, expect)

    def bus_reset_blocking(self, duration_s: float) -> bool:
        """Send the BREAK (not the quiet time after it) and record it in the capture."""
        with self._wire:
            sent = self.link.send_break(duration_s)
            if sent:
                if self.pcap is not None:
                    self.pcap.record(Direction.BUS_RESET, b"")
                log.log(TRACE, "mdb bus reset (BREAK %.3f s)", duration_s)
        return sent

    def _exchange(self, addr_cmd: int, data: bytes, max_attempts: int, expect: ReplyShape) -> Reply:
        with self._wire:
            return self._exchange_on_wire(addr_cmd, data, max_attempts, expect)

    def _exchange_on_wire(
        self, addr_cmd: int, data: bytes, max_attempts: int, expect: ReplyShape
    ) -> Reply:
        block = command_block(addr_cmd, data)
        address = address_of(addr_cmd)
        naks = 0
        self.stats.exchanges += 1
        tracing = log.isEnabledFor(TRACE)
        for attempt in range(1, max_attempts + 1):
            if attempt > 1:
                self.stats.retransmissions += 1
            stale = self.link.discard_input()
            if stale:
                self.stats.stale_bytes += len(stale)
                if tracing:
                    log.log(TRACE, "mdb stale bytes dropped: %s", stale.hex(" "))
            self._decoder.reset()
            self._framer.reset()
            self.link.send_command(block)
            if self.pcap is not None:
                self.pcap.record(Direction.MASTER_TO_PERIPHERAL, block)
            if tracing:
                log.log(TRACE, "mdb > %s", block.hex(" "))
            event = self._read_reply()
            rets = 0
            while isinstance(event, BadReply) and rets < MAX_RET_PER_ATTEMPT:
                log.debug("mdb 0x%02X: %s; sending RET", address, event.error)
                self.link.send_control(RET)
                self.stats.rets_sent += 1
                rets += 1
                if self.pcap is not None:
                    self.pcap.record(Direction.MASTER_TO_PERIPHERAL, bytes((RET,)))
                event = self._read_reply()
            if isinstance(event, (DataReply, AckReply)) and not expect.fits(
                event.data if isinstance(event, DataReply) else b""
            ):
                # Not this command's answer (a late reply of another exchange, or of another
                # device): never ACK it. The line falls silent, then the command goes again.
                self.stats.misfits += 1
                got = event.data.hex(" ") if isinstance(event, DataReply) else "ACK"
                if self.pcap is not None and isinstance(event, DataReply):
                    self.pcap.record(Direction.PERIPHERAL_TO_MASTER, event.data, address, True)
                log.debug(
                    "mdb 0x%02X: reply %s does not fit 0x%02X (expected %s); not ACKed",
                    address,
                    got,
                    addr_cmd,
                    expect.describe(),
                )
                self.stats.stale_bytes += self._drain_until_quiet(self._quiet_after_timeout_s)
                continue
            if isinstance(event, DataReply):
                reply_ns = time.perf_counter_ns()
                self.link.send_control(ACK)  # at once: before anything else looks at the data
                ack_ns = time.perf_counter_ns()
                if self.pcap is not None:
                    self.pcap.record(Direction.PERIPHERAL_TO_MASTER, event.data, address, True)
                    self.pcap.record(Direction.MASTER_TO_PERIPHERAL, bytes((ACK,)))
                if tracing:
                    log.log(TRACE, "mdb < %s (ACKed)", event.data.hex(" "))
                self._after_retransmission(attempt)
                return Reply(addr_cmd, event.data, attempt, reply_ns, ack_ns)
            if isinstance(event, AckReply):
                if self.pcap is not None:
                    self.pcap.record(Direction.PERIPHERAL_TO_MASTER, bytes((ACK,)), address)
                if tracing:
                    log.log(TRACE, "mdb < ACK")
                reply_ns = time.perf_counter_ns()
                self._after_retransmission(attempt)
                return Reply(addr_cmd, b"", attempt, reply_ns, 0)
            if isinstance(event, NakReply):
                naks += 1
                self.stats.naks_received += 1
                if self.pcap is not None:
                    self.pcap.record(Direction.PERIPHERAL_TO_MASTER, b"\xff", address)
                log.debug("mdb 0x%02X: NAK (attempt %d)", address, attempt)
                continue
            self.stats.timeouts += 1
            log.debug("mdb 0x%02X: no valid reply (attempt %d): %s", address, attempt, event)
            # A reply that comes after its deadline must not be read as the answer to the
            # retransmission (or to the next command): wait for the line to go quiet first.
            self.stats.stale_bytes += self._drain_until_quiet(self._quiet_after_timeout_s)
        if naks == max_attempts:
            raise NakReceived(address, max_attempts)
        raise NoResponse(address, max_attempts)

    @property
    def _quiet_after_timeout_s(self) -> float:
        """mdb.md "Wire": after a time-out the line must fall silent before the next command.
        Silent for a whole response window (t-response 5 ms + one word + slack): a peripheral
        that answers late starts its reply within it, and its bytes are dropped instead of
        being read as the answer to the next command (or to another device's)."""
        return self.timing.first_word_s

    def _after_retransmission(self, attempt: int) -> None:
        """After an answer to a retransmitted command: the answer taken may have been the
        earlier attempt's late reply, with the retransmission's own reply still to come. Wait
        one response window for it, so it is not read as the answer to the next command."""
        if attempt > 1:
            self.stats.stale_bytes += self._drain_until_quiet(self.timing.first_word_s)

    def _drain_until_quiet(self, quiet_s: float) -> int:
        """Read and drop bytes until none arrived for ``quiet_s``; bounded by MAX_DRAIN_FACTOR
        response windows (a line that never falls silent must not hold the line thread)."""
        dropped = 0
        deadline = time.monotonic() + self.timing.first_word_s * MAX_DRAIN_FACTOR
        while time.monotonic() < deadline:
            chunk = self.link.read(quiet_s)
            if not chunk:
                break
            dropped += len(chunk)
        return dropped

    def _read_reply(self) -> ReplyEvent | None:
        """Wait for one reply: its first word within t-response, each next within the
        inter-byte limit. None on a timeout (a reply cut short is a timeout too)."""
        start = time.monotonic()
        deadline = start + self.timing.first_word_s
        # However the words keep coming, a reply is at most 36 words: a line that never sends a
        # mode-bit word must not hold the line thread.
        cap = deadline + MAX_BLOCK_LEN * self.timing.next_word_s
        while True:
            now = time.monotonic()
            if now >= cap:
                return BadReply(BlockTooLong("reply without an end within 36 word times"))
            remaining = min(deadline, cap) - now
            if remaining <= 0:
                return None
            chunk = self.link.read(remaining)
            if not chunk:
                continue
            events = self._framer.feed(self._decoder.feed(chunk))
            if events:
                return events[0]
            deadline = time.monotonic() + self.timing.next_word_s
