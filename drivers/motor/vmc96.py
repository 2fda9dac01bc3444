"""VMC96 motor board (MoneyFlex VMC96, 8 x 12 spiral motor matrix) over its FTDI serial port.

Protocol facts come from the public C/Python library ``LacobusVentura/VMC96API``
(``vmc96api.c``, ``vmc96api.h``, ``vmc96.c``, ``VMC96.py``); where that source is silent, the
choice made here is marked "choice" and collected in ``docs/motor.md``.

Three layers, as in the other drivers:

* a pure frame codec (``encode_frame``, ``decode_frame``, ``FrameDecoder``) with no I/O;
* the command table (``CommandDef`` rows in ``COMMANDS``) and payload parsers;
* ``Vmc96Board``, the ``MotorBoard`` implementation that owns the port, the single request in
  flight, and the timing of a vend turn.

Wire format (both directions)::

    0x35 | controller | length | code | payload ... | xor

``length`` counts the whole frame (5 + payload, so 5..255); ``xor`` is the XOR of every byte
before it, STX included. In a request ``code`` is the command. In a reply ``code`` is 0x00 (ACK)
or 0xFF (NAK) with no payload for commands that are merely acknowledged, or the command code
echoed back followed by the data for commands that return data.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import serial_asyncio_fast

from drivers.errors import MotorError
from drivers.motor.base import (
    MotorBoard,
    MotorBoardOffline,
    MotorOutcome,
    MotorProtocolError,
    SlotOutOfRange,
    TurnAborted,
    TurnOutcomeUnknown,
    TurnResult,
)
from drivers.recurring import FailureLog

log = logging.getLogger("drivers.motor.vmc96")
TRACE = 5  # below DEBUG: every frame exchanged

# --- Link and frame constants (VMC96API vmc96api.c unless noted) -------------------------------

#: vmc96api.c: ftdi_set_baudrate(19200), 8 data bits, 1 stop bit, no parity, no flow control.
BAUDRATE = 19200
STX = 0x35
#: STX, controller, length, code, xor.
FRAME_MIN_LEN = 5
#: The length field is one byte and counts the whole frame.
FRAME_MAX_LEN = 255
PAYLOAD_MAX_LEN = FRAME_MAX_LEN - FRAME_MIN_LEN
ACK = 0x00
#: vmc96.c: VMC96_NEGATIVE_ACK_CODE. Any other code in a 5-byte reply is treated as a NAK too.
NAK = 0xFF

CONTROLLER_BROADCAST = 0x00
CONTROLLER_RELAY_1 = 0x26
CONTROLLER_RELAY_2 = 0x27
CONTROLLER_MOTOR_ARRAY = 0x30
#: The decoder only syncs on frames from these addresses: fewer false starts in line noise.
CONTROLLERS = frozenset(
    {CONTROLLER_BROADCAST, CONTROLLER_RELAY_1, CONTROLLER_RELAY_2, CONTROLLER_MOTOR_ARRAY}
)

#: vmc96api.h: VMC96_MOTOR_ARRAY_ROWS_COUNT / _COLUMNS_COUNT. (The README's CLI help swaps
#: them; the header, the coordinate check and the scan reply layout agree on 8 x 12.)
ROWS = 8
COLS = 12
#: vmc96api.c: the status current byte is 0..255 for 0..500 mA.
CURRENT_FULL_SCALE_MA = 500.0
#: vmc96api.h: the opto line reply holds 32 samples of 40 ms, a 1.28 s window.
OPTO_SAMPLES = 32
OPTO_SAMPLE_S = 0.040
OPTO_WINDOW_S = OPTO_SAMPLES * OPTO_SAMPLE_S

# --- Timing (every await on the board is bounded by one of these) ------------------------------

#: vmc96.c reads the reply 20 ms after writing (VMC96_DEFAULT_RESPONSE_DELAY_US); VMC96.py polls
#: for up to 1 s. 250 ms is over 10x what the C library relies on, yet an unplugged board is
#: noticed in well under a second.
T_REPLY_S = 0.25
#: Attempts for commands that are safe to repeat. RUN is never repeated: if its reply was lost
#: the motor may already be turning, and a second RUN could vend twice.
REQUEST_ATTEMPTS = 2
#: Opening the port runs in a thread (pyserial); a USB adapter that is being re-enumerated can
#: take a few seconds to appear.
T_OPEN_S = 5.0
#: Closing: the port close runs in a thread; give up waiting (and log) after this.
T_CLOSE_S = 2.0
#: Poll period during a turn and the drop watch. Choice: a turn takes ~1.5 s and an opto sample
#: 40 ms; 50 ms keeps the 19200-baud link mostly idle (a status + opto exchange is ~30 bytes,
#: ~16 ms on the wire) and reads every opto window many times over.
T_POLL_S = 0.05
#: Choice: a motor that has not shown as running this long after RUN was acknowledged is
#: checked with a scan (missing motor, or a turn too short to observe).
T_START_GRACE_S = 0.25
#: Choice: a spiral motor runs at roughly 100-300 mA; a stalled one saturates the board's
#: 500 mA reading. Current at or above this is a jam when it lasts T_JAM_CONFIRM_S.
JAM_CURRENT_MA = 400.0
#: Choice: the inrush when a motor starts lasts tens of milliseconds; a jam lasts.
T_JAM_CONFIRM_S = 0.1
#: Choice: before RUN, wait this long at most for the drop sensor to clear (the previous
#: product still crossing it). A falling product crosses the beam in well under this.
T_BEAM_SETTLE_S = 0.5
#: Best-effort STOP ALL when a turn is cancelled (daemon stopping): one request and its retry.
T_STOP_ON_CANCEL_S = REQUEST_ATTEMPTS * T_REPLY_S + 0.5

READ_CHUNK = 256
#: Frames waiting for the requester; only one request is in flight, so more is line noise.
REPLY_QUEUE_MAX = 16


# --- Errors ------------------------------------------------------------------------------------


class Vmc96FramingError(MotorProtocolError):
    """Bytes that are not one well-formed VMC96 frame."""

    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(f"{message} (raw {raw.hex(' ') or '-'})")
        self.raw = raw


class Vmc96ChecksumError(Vmc96FramingError):
    """A frame whose last byte is not the XOR of the bytes before it."""


class Vmc96CommandRejected(MotorProtocolError):
    """The board answered NAK (or another non-ACK code) to a command."""

    def __init__(self, command: CommandDef, frame: Frame) -> None:
        super().__init__(f"VMC96 rejected {command.name}: code 0x{frame.code:02X}")
        self.command = command
        self.frame = frame


# --- Frame codec (pure) ------------------------------------------------------------------------


def xor_checksum(data: Iterable[int]) -> int:
    """XOR of all bytes (the VMC96 frame check)."""
    return functools.reduce(operator.xor, data, 0)


@dataclass(frozen=True)
class Frame:
    """One frame either way: ``code`` is the command (request) or ACK/NAK/echo (reply)."""

    controller: int
    code: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        if self.controller not in CONTROLLERS:
            raise ValueError(f"unknown VMC96 controller 0x{self.controller:02X}")
        if not 0 <= self.code <= 0xFF:
            raise ValueError(f"code {self.code} is not a byte")
        if len(self.payload) > PAYLOAD_MAX_LEN:
            raise ValueError(f"payload of {len(self.payload)} bytes (max {PAYLOAD_MAX_LEN})")


def encode_frame(frame: Frame) -> bytes:
    """The bytes of ``frame`` on the wire."""
    body = bytes((STX, frame.controller, FRAME_MIN_LEN + len(frame.payload), frame.code)) + bytes(
        frame.payload
    )
    return body + bytes((xor_checksum(body),))


def decode_frame(raw: bytes) -> Frame:
    """Exactly one frame from ``raw``; raises ``Vmc96FramingError`` for anything else."""
    raw = bytes(raw)
    if len(raw) < FRAME_MIN_LEN:
        raise Vmc96FramingError("frame shorter than 5 bytes", raw)
    if raw[0] != STX:
        raise Vmc96FramingError("frame does not start with STX 0x35", raw)
    if raw[1] not in CONTROLLERS:
        raise Vmc96FramingError(f"unknown controller 0x{raw[1]:02X}", raw)
    if raw[2] != len(raw):
        raise Vmc96FramingError(f"length field {raw[2]} but {len(raw)} bytes", raw)
    if xor_checksum(raw[:-1]) != raw[-1]:
        raise Vmc96ChecksumError("bad XOR check", raw)
    return Frame(raw[1], raw[3], raw[4:-1])


class _Candidate(enum.Enum):
    BAD = enum.auto()
    INCOMPLETE = enum.auto()
    COMPLETE = enum.auto()


class FrameDecoder:
    """Turns a byte stream into frames, resynchronising after garbage.

    Frames are delimited by STX, length and XOR only (never by silence: USB adapters batch
    bytes). A candidate whose header is impossible or whose check fails costs one byte: the
    search resumes at the next STX. While a candidate is incomplete, a later complete and valid
    frame wins over it (a false STX in noise can announce up to 255 bytes, and the real reply
    must not wait behind it). The buffer never holds more than one partial frame after ``feed``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        #: Bytes thrown away as garbage or by ``reset`` since construction.
        self.discarded = 0

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame (always < FRAME_MAX_LEN)."""
        return len(self._buf)

    def reset(self) -> bytes:
        """Drop any partial frame (before a new request); returns what was dropped."""
        dropped = bytes(self._buf)
        self.discarded += len(dropped)
        self._buf.clear()
        return dropped

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return the frames they complete, in order."""
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        while buf:
            start = buf.find(STX)
            if start < 0:
                self._discard(len(buf))
                break
            if start:
                self._discard(start)
            state, length = self._candidate(0)
            if state is _Candidate.BAD:
                self._discard(1)
                continue
            if state is _Candidate.COMPLETE:
                frames.append(Frame(buf[1], buf[3], bytes(buf[4 : length - 1])))
                del buf[:length]
                continue
            later = self._later_complete_frame()
            if later is None:
                break
            self._discard(later)
        return frames

    def _discard(self, count: int) -> None:
        self.discarded += count
        del self._buf[:count]

    def _candidate(self, pos: int) -> tuple[_Candidate, int]:
        buf = self._buf
        have = len(buf) - pos
        if have < 2:
            return _Candidate.INCOMPLETE, 0
        if buf[pos + 1] not in CONTROLLERS:
            return _Candidate.BAD, 0
        if have < 3:
            return _Candidate.INCOMPLETE, 0
        length = buf[pos + 2]
        if length < FRAME_MIN_LEN:
            return _Candidate.BAD, 0
        if have < length:
            return _Candidate.INCOMPLETE, length
        if xor_checksum(buf[pos : pos + length - 1]) != buf[pos + length - 1]:
            return _Candidate.BAD, 0
        return _Candidate.COMPLETE, length

    def _later_complete_frame(self) -> int | None:
        pos = self._buf.find(STX, 1)
        while pos >= 0:
            if self._candidate(pos)[0] is _Candidate.COMPLETE:
                return pos
            pos = self._buf.find(STX, pos + 1)
        return None


# --- Commands as data --------------------------------------------------------------------------


class ReplyKind(enum.Enum):
    """What a command is answered with."""

    #: A 5-byte frame with code ACK (0x00) or NAK.
    ACK = "ack"
    #: The command code echoed, then data.
    DATA = "data"


@dataclass(frozen=True)
class CommandDef:
    """One VMC96 command: where it goes, what it carries, what comes back."""

    name: str
    controller: int
    code: int
    request_len: int
    reply: ReplyKind
    #: Bytes of reply data after the echoed code: (min, max). ACK replies carry none.
    reply_len: tuple[int, int]
    #: Safe to send again when the reply was lost.
    idempotent: bool


def _motor(
    name: str, code: int, request_len: int, reply: ReplyKind, reply_len: tuple[int, int], idem: bool
) -> CommandDef:
    return CommandDef(name, CONTROLLER_MOTOR_ARRAY, code, request_len, reply, reply_len, idem)


_ACK, _DATA = ReplyKind.ACK, ReplyKind.DATA
PING = _motor("ping", 0x00, 0, _ACK, (0, 0), True)
VERSION = _motor("version", 0x02, 0, _DATA, (0, PAYLOAD_MAX_LEN - 1), True)
RESET = _motor("reset", 0x05, 0, _ACK, (0, 0), True)
#: Reply: current byte, then the motor id of every running motor.
STATUS = _motor("status", 0x10, 0, _DATA, (1, PAYLOAD_MAX_LEN - 1), True)
#: Reply: one byte per column (12), bit ``row`` set when a motor is fitted there.
SCAN = _motor("scan", 0x11, 0, _DATA, (COLS, COLS), True)
STOP_ALL = _motor("stop_all", 0x12, 0, _ACK, (0, 0), True)
#: Request: motor id. The board runs the motor for one turn (to its home switch).
RUN = _motor("run", 0x13, 1, _ACK, (0, 0), False)
#: Request: two motor ids in the same row (double-width spirals).
RUN_PAIR = _motor("run_pair", 0x13, 2, _ACK, (0, 0), False)
#: Request: motor id, duration in ms.
PULSE = _motor("pulse", 0x14, 2, _ACK, (0, 0), False)
#: Reply: 4 bytes, 32 drop-sensor samples of 40 ms, least significant bit first.
OPTO_LINE = _motor("opto_line", 0x15, 0, _DATA, (4, 4), True)
#: Broadcast to every controller; the public library sends data 0xFF.
GLOBAL_RESET = CommandDef(
    "global_reset", CONTROLLER_BROADCAST, 0x01, 1, ReplyKind.ACK, (0, 0), True
)

COMMANDS: dict[str, CommandDef] = {
    c.name: c
    for c in (PING, VERSION, RESET, STATUS, SCAN, STOP_ALL, RUN, RUN_PAIR, PULSE, OPTO_LINE)
}
COMMANDS[GLOBAL_RESET.name] = GLOBAL_RESET


def encode_request(command: CommandDef, payload: bytes = b"") -> bytes:
    """The request frame for ``command`` on the wire."""
    if len(payload) != command.request_len:
        raise ValueError(f"{command.name} carries {command.request_len} bytes, got {len(payload)}")
    return encode_frame(Frame(command.controller, command.code, payload))


class ReplyMatch(enum.Enum):
    """How a received frame relates to the request in flight."""

    ANSWER = "answer"
    REJECTED = "rejected"
    #: Not an answer to this request: a late reply to an earlier one, or noise.
    UNRELATED = "unrelated"


def classify_reply(command: CommandDef, frame: Frame) -> ReplyMatch:
    """Whether ``frame`` answers ``command``, rejects it, or belongs to something else.

    The protocol has no sequence numbers: a late ACK to an earlier request is indistinguishable
    from an ACK to this one. The driver purges its input before every request to narrow that.
    """
    if frame.controller != command.controller:
        return ReplyMatch.UNRELATED
    short = not frame.payload
    if command.reply is ReplyKind.ACK:
        if short:
            return ReplyMatch.ANSWER if frame.code == ACK else ReplyMatch.REJECTED
        return ReplyMatch.UNRELATED
    if frame.code == command.code:
        return ReplyMatch.ANSWER
    if short and frame.code != ACK:
        return ReplyMatch.REJECTED
    return ReplyMatch.UNRELATED


def check_reply_data(command: CommandDef, frame: Frame) -> bytes:
    """The data of an answer, after checking its length against the table."""
    low, high = command.reply_len
    if not low <= len(frame.payload) <= high:
        raise MotorProtocolError(
            f"{command.name} reply carries {len(frame.payload)} bytes, expected {low}..{high}"
            f" (payload {frame.payload.hex(' ') or '-'})"
        )
    return frame.payload


# --- Payloads ----------------------------------------------------------------------------------


def motor_id(row: int, col: int) -> int:
    """The board's id for the motor at (row, col): row + 1 in the high nibble, col + 1 low."""
    if not (0 <= row < ROWS and 0 <= col < COLS):
        raise SlotOutOfRange(row, col, ROWS, COLS)
    return ((row + 1) << 4) | (col + 1)


def motor_coordinates(mid: int) -> tuple[int, int]:
    """(row, col) of a motor id; ``MotorProtocolError`` if the id names no motor."""
    row, col = (mid >> 4) - 1, (mid & 0x0F) - 1
    if not (0 <= row < ROWS and 0 <= col < COLS):
        raise MotorProtocolError(f"motor id 0x{mid:02X} outside the {ROWS}x{COLS} matrix")
    return row, col


def current_ma(raw: int) -> float:
    """Motor current in mA from the status byte."""
    return raw * CURRENT_FULL_SCALE_MA / 255.0


def current_raw(milliamps: float) -> int:
    """The status byte for a current (saturates at the board's 500 mA full scale)."""
    return max(0, min(255, round(milliamps * 255.0 / CURRENT_FULL_SCALE_MA)))


@dataclass(frozen=True)
class ArrayStatus:
    """Status reply: total motor current and which motors are running."""

    current_ma: float
    running: frozenset[tuple[int, int]]


def parse_status(data: bytes) -> ArrayStatus:
    """Decode STATUS data (current byte, then running motor ids)."""
    if not data:
        raise MotorProtocolError("status reply without the current byte")
    return ArrayStatus(current_ma(data[0]), frozenset(motor_coordinates(m) for m in data[1:]))


def encode_status(raw_current: int, running: Iterable[tuple[int, int]]) -> bytes:
    """STATUS data for a current byte and running motors (the simulator's side)."""
    return bytes((raw_current,)) + bytes(motor_id(r, c) for r, c in sorted(running))


def parse_scan(data: bytes) -> frozenset[tuple[int, int]]:
    """Decode SCAN data: byte ``col``, bit ``row`` set when a motor is fitted."""
    if len(data) != COLS:
        raise MotorProtocolError(f"scan reply of {len(data)} bytes, expected {COLS}")
    return frozenset(
        (row, col) for col in range(COLS) for row in range(ROWS) if data[col] >> row & 1
    )


def encode_scan(present: Iterable[tuple[int, int]]) -> bytes:
    """SCAN data for a set of fitted motors."""
    columns = bytearray(COLS)
    for row, col in present:
        motor_id(row, col)  # range check
        columns[col] |= 1 << row
    return bytes(columns)


def parse_opto(data: bytes) -> tuple[bool, ...]:
    """Decode OPTO LINE data into 32 samples, True where the beam was interrupted.

    Bit order is the public library's (byte 0 bit 0 is sample 0). Choice, the source being
    silent: sample 0 is the oldest and sample 31 the newest of the 1.28 s window ending when
    the board answered.
    """
    if len(data) != OPTO_SAMPLES // 8:
        raise MotorProtocolError(f"opto reply of {len(data)} bytes, expected 4")
    return tuple(bool(data[k // 8] >> (k % 8) & 1) for k in range(OPTO_SAMPLES))


def encode_opto(samples: Sequence[bool]) -> bytes:
    """OPTO LINE data for 32 samples, oldest first."""
    if len(samples) != OPTO_SAMPLES:
        raise ValueError(f"{len(samples)} opto samples, expected {OPTO_SAMPLES}")
    out = bytearray(OPTO_SAMPLES // 8)
    for k, blocked in enumerate(samples):
        if blocked:
            out[k // 8] |= 1 << (k % 8)
    return bytes(out)


class DropWatch:
    """Finds a product falling through the drop sensor after a baseline read.

    A drop is a rising edge (beam clear, then interrupted) whose interrupted sample certainly
    began after ``baseline_at``, the moment the baseline opto reply (taken just before RUN)
    arrived. Requiring the edge means a beam already blocked (dirt, a stuck product) never
    counts as a vend. The board's window is rolling and carries no timestamps, so each read is
    placed conservatively: its window ended no earlier than when the request was sent, hence
    the newest ``floor((sent_at - baseline_at) / 40 ms)`` samples all began after the
    baseline. The sample straddling the baseline is never counted: a product that fell then,
    before RUN was even sent, belongs to an earlier turn.
    """

    def __init__(self, baseline_at: float) -> None:
        self.baseline_at = baseline_at
        self.dropped = False

    def update(self, samples: Sequence[bool], sent_at: float) -> bool:
        """Take one opto reply whose request was sent at ``sent_at``; return ``dropped``."""
        if self.dropped:
            return True
        since = max(0.0, sent_at - self.baseline_at)
        # The epsilon keeps an exact multiple from losing a sample to float rounding.
        fresh = min(len(samples), math.floor(since / OPTO_SAMPLE_S + 1e-9))
        for k in range(max(len(samples) - fresh, 1), len(samples)):
            if samples[k] and not samples[k - 1]:
                self.dropped = True
                break
        return self.dropped


# --- The board ---------------------------------------------------------------------------------


class Vmc96Board(MotorBoard):
    """A VMC96 motor array on a serial port (``/dev/ttyUSB0``, or a simulator's pty).

    One request is in flight at a time (an ``asyncio.Lock``); a reader task feeds received bytes
    to the frame decoder and hands frames to the requester. Every wait on the board is bounded:
    a silent board raises ``MotorBoardOffline`` after ``attempts`` x ``reply_timeout_s``.

    A vend turn (``run_slot``): a baseline drop-sensor read (waiting up to T_BEAM_SETTLE_S for
    the beam to clear), RUN, then STATUS (running motors, current) and the drop sensor every
    ``poll_interval_s`` until the motor stops; a current at or above ``jam_current_ma`` lasting
    ``jam_confirm_s`` is a jam; a motor never seen running is checked with SCAN (missing
    motor); a turn past ``turn_timeout_s`` is stopped. Then the drop sensor is watched until a
    drop or ``drop_timeout_s``. See ``DropWatch`` for how a drop is recognised.
    """

    def __init__(
        self,
        port: str,
        *,
        reply_timeout_s: float = T_REPLY_S,
        attempts: int = REQUEST_ATTEMPTS,
        poll_interval_s: float = T_POLL_S,
        start_grace_s: float = T_START_GRACE_S,
        jam_current_ma: float = JAM_CURRENT_MA,
        jam_confirm_s: float = T_JAM_CONFIRM_S,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if min(reply_timeout_s, poll_interval_s) <= 0:
            raise ValueError("reply_timeout_s and poll_interval_s must be positive")
        self.port = port
        self._reply_timeout_s = reply_timeout_s
        self._attempts = attempts
        self._poll_s = poll_interval_s
        self._start_grace_s = start_grace_s
        self._jam_current_ma = jam_current_ma
        self._jam_confirm_s = jam_confirm_s
        self._decoder = FrameDecoder()
        self._replies: asyncio.Queue[Frame | None] = asyncio.Queue(REPLY_QUEUE_MAX)
        self._request_lock = asyncio.Lock()
        self._turn_lock = asyncio.Lock()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._link_lost = False
        self._offline_log = FailureLog(log)
        self._stop_generation = 0

    # -- lifecycle --

    async def open(self) -> None:
        """Open the port and start the reader task. Does not require the board to answer."""
        if self._writer is not None:
            return
        try:
            async with asyncio.timeout(T_OPEN_S):
                reader, writer = await serial_asyncio_fast.open_serial_connection(
                    url=self.port, baudrate=BAUDRATE
                )
        except (OSError, TimeoutError) as exc:  # serial.SerialException is an OSError
            # On timeout the open may still complete in its thread and that descriptor leaks;
            # T_OPEN_S is long enough that only a wedged USB stack gets here.
            raise MotorBoardOffline(f"cannot open VMC96 port {self.port}: {exc}") from exc
        self._writer = writer
        self._link_lost = False
        self._decoder.reset()
        self._drain_replies()
        self._reader_task = asyncio.create_task(
            self._read_loop(reader), name=f"vmc96-reader {self.port}"
        )
        log.info("VMC96 port %s open", self.port)

    async def close(self) -> None:
        """Stop the reader task and close the port. Idempotent."""
        task, writer = self._reader_task, self._writer
        self._reader_task, self._writer = None, None
        self._link_lost = True
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=T_CLOSE_S)
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.debug("VMC96 reader ended with %r", task.exception())
        self._wake_requester()
        if writer is None:
            return
        # abort, not close: close() would first drain the output in a thread (tcdrain), which
        # never returns on a pty whose other side stopped reading.
        if not writer.transport.is_closing():
            writer.transport.abort()
        try:
            async with asyncio.timeout(T_CLOSE_S):
                await writer.wait_closed()
        except TimeoutError:
            log.warning("VMC96 port %s did not close within %.1f s", self.port, T_CLOSE_S)
        except OSError as exc:
            log.debug("VMC96 port %s closed with %r", self.port, exc)
        log.info("VMC96 port %s closed", self.port)

    async def __aenter__(self) -> Vmc96Board:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- requests --

    async def request(self, command: CommandDef, payload: bytes = b"") -> bytes:
        """Send one command and return the reply data (empty for ACK commands).

        Raises ``MotorBoardOffline`` when no answer comes, ``Vmc96CommandRejected`` on NAK,
        ``MotorProtocolError`` for a malformed answer.
        """
        raw = encode_request(command, payload)
        attempts = self._attempts if command.idempotent else 1
        async with self._request_lock:
            for attempt in range(1, attempts + 1):
                writer = self._require_link()
                # Like the public library's purge before each write: whatever is pending now
                # answers nothing we are about to ask.
                stale = self._decoder.reset()
                self._drain_replies()
                if stale and log.isEnabledFor(TRACE):
                    log.log(TRACE, "vmc96 stale bytes dropped: %s", stale.hex(" "))
                if log.isEnabledFor(TRACE):
                    log.log(TRACE, "vmc96 > %s", raw.hex(" "))
                try:
                    async with asyncio.timeout(self._reply_timeout_s):
                        writer.write(raw)
                        await writer.drain()
                        data = await self._await_answer(command)
                except TimeoutError:
                    log.debug(
                        "vmc96 %s: no reply within %.3f s (attempt %d/%d)",
                        command.name,
                        self._reply_timeout_s,
                        attempt,
                        attempts,
                    )
                    continue
                except (ConnectionError, OSError) as exc:
                    self._link_lost = True
                    raise self._offline(f"VMC96 link lost during {command.name}: {exc}") from exc
                self._offline_log.recovered("VMC96 answers again", port=self.port)
                return data
        raise self._offline(
            f"VMC96 on {self.port}: no reply to {command.name} after {attempts} attempt(s)"
            f" of {self._reply_timeout_s:.3f} s"
        )

    async def _await_answer(self, command: CommandDef) -> bytes:
        while True:
            frame = await self._replies.get()
            if frame is None:
                raise ConnectionError("serial port closed")
            match = classify_reply(command, frame)
            if match is ReplyMatch.ANSWER:
                return check_reply_data(command, frame)
            if match is ReplyMatch.REJECTED:
                raise Vmc96CommandRejected(command, frame)
            log.debug("vmc96 %s: ignoring unrelated frame %s", command.name, frame)

    def _require_link(self) -> asyncio.StreamWriter:
        if self._writer is None or self._link_lost:
            raise self._offline(f"VMC96 port {self.port} is not open")
        return self._writer

    def _offline(self, message: str) -> MotorBoardOffline:
        # First failure at WARNING, repeats at DEBUG until the board answers again.
        self._offline_log.failed("VMC96 offline", port=self.port, error=message)
        return MotorBoardOffline(message)

    def _drain_replies(self) -> None:
        while not self._replies.empty():
            self._replies.get_nowait()

    def _wake_requester(self) -> None:
        if self._replies.full():
            self._replies.get_nowait()
        self._replies.put_nowait(None)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    log.warning("VMC96 port %s: end of stream", self.port)
                    return
                if log.isEnabledFor(TRACE):
                    log.log(TRACE, "vmc96 < %s", chunk.hex(" "))
                for frame in self._decoder.feed(chunk):
                    if self._replies.full():
                        self._replies.get_nowait()  # keep the newest: older ones are stale
                    self._replies.put_nowait(frame)
        except Exception as exc:  # the reader's supervision point: log, mark the link lost
            log.warning("VMC96 port %s failed: %r", self.port, exc)
        finally:
            self._link_lost = True
            self._wake_requester()

    # -- commands --

    async def ping(self) -> bool:
        """True when the motor array controller acknowledges a ping."""
        try:
            await self.request(PING)
        except MotorBoardOffline:
            return False
        except MotorProtocolError as exc:
            log.warning("VMC96 ping answered wrongly: %s", exc)
            return False
        return True

    async def version(self) -> str:
        """The motor array controller's firmware version string."""
        return (await self.request(VERSION)).decode("ascii", errors="replace").rstrip("\0")

    async def reset(self) -> None:
        """Reset the motor array controller (stops any motor)."""
        self._stop_generation += 1
        await self.request(RESET)

    async def status(self) -> ArrayStatus:
        """Running motors and their current."""
        return parse_status(await self.request(STATUS))

    async def scan(self) -> frozenset[tuple[int, int]]:
        """The (row, col) of every motor the board finds fitted."""
        return parse_scan(await self.request(SCAN))

    async def opto_samples(self) -> tuple[bool, ...]:
        """The last 1.28 s of the drop sensor, 32 samples, oldest first."""
        return parse_opto(await self.request(OPTO_LINE))

    async def drop_sensor_blocked(self) -> bool:
        return (await self.opto_samples())[-1]

    async def stop_all(self) -> None:
        self._stop_generation += 1
        await self.request(STOP_ALL)

    # -- the vend turn --

    async def run_slot(
        self, row: int, col: int, *, turn_timeout_s: float, drop_timeout_s: float
    ) -> TurnResult:
        mid = motor_id(row, col)
        async with self._turn_lock:
            try:
                return await self._turn(row, col, mid, turn_timeout_s, drop_timeout_s)
            except asyncio.CancelledError:
                await self._stop_after_cancel()
                raise

    async def _turn(
        self, row: int, col: int, mid: int, turn_timeout_s: float, drop_timeout_s: float
    ) -> TurnResult:
        loop = asyncio.get_running_loop()
        generation = self._stop_generation
        slot = (row, col)
        watch = await self._baseline()
        started = loop.time()
        try:
            await self.request(RUN, bytes((mid,)))
        except Vmc96CommandRejected:
            if slot not in await self.scan():
                return TurnResult(MotorOutcome.NO_MOTOR, False, "RUN rejected; scan: no motor")
            raise
        except MotorError as exc:
            # The RUN may have reached the board and its answer been lost.
            raise TurnOutcomeUnknown(row, col, exc) from exc
        try:
            return await self._follow_turn(
                row, col, generation, watch, started, turn_timeout_s, drop_timeout_s
            )
        except (TurnAborted, TurnOutcomeUnknown):
            raise
        except MotorError as exc:
            raise TurnOutcomeUnknown(row, col, exc) from exc

    async def _follow_turn(
        self,
        row: int,
        col: int,
        generation: int,
        watch: DropWatch,
        started: float,
        turn_timeout_s: float,
        drop_timeout_s: float,
    ) -> TurnResult:
        """After the RUN was ACKed: watch the motor until it stops (or jams, or times out),
        then the drop sensor."""
        loop = asyncio.get_running_loop()
        slot = (row, col)
        acked = loop.time()
        deadline = started + turn_timeout_s
        seen_running = False
        high_since: float | None = None
        high_reads = 0
        last_ma = 0.0
        outcome: MotorOutcome | None = None
        detail = ""
        while outcome is None:
            status = await self.status()
            now = loop.time()
            await self._watch(watch)
            if self._stop_generation != generation:
                # That STOP ALL may have reached the board before our RUN: stop again.
                await self.request(STOP_ALL)
                raise TurnAborted(row, col, watch.dropped)
            running = slot in status.running
            last_ma = status.current_ma if running else 0.0
            if running:
                seen_running = True
                if last_ma >= self._jam_current_ma:
                    high_since = now if high_since is None else high_since
                    high_reads += 1
                    if high_reads >= 2 and now - high_since >= self._jam_confirm_s:
                        await self.request(STOP_ALL)
                        outcome = MotorOutcome.JAMMED
                        detail = f"current {last_ma:.0f} mA for {now - high_since:.2f} s"
                        break
                else:
                    high_since, high_reads = None, 0
            elif seen_running:
                outcome, detail = MotorOutcome.TURNED, f"turn took ~{now - started:.2f} s"
                break
            elif now - acked >= self._start_grace_s:
                if slot in await self.scan():
                    outcome, detail = MotorOutcome.TURNED, "turn ended before it was observed"
                else:
                    outcome, detail = MotorOutcome.NO_MOTOR, "never ran; scan: no motor"
                break
            if now >= deadline:
                await self.request(STOP_ALL)
                if last_ma >= self._jam_current_ma:
                    outcome, detail = MotorOutcome.JAMMED, f"still {last_ma:.0f} mA at timeout"
                elif not seen_running and slot not in await self.scan():
                    outcome, detail = MotorOutcome.NO_MOTOR, "never ran; scan: no motor"
                else:
                    outcome = MotorOutcome.TIMEOUT
                    detail = f"turn not finished after {turn_timeout_s:.2f} s; stopped"
                break
            await asyncio.sleep(self._poll_s)

        if outcome is MotorOutcome.TURNED:
            drop_deadline = loop.time() + drop_timeout_s
            while not watch.dropped:
                remaining = drop_deadline - loop.time()
                if remaining <= 0:
                    break
                # A stop_all now is harmless: the turn is over, only the sensor is watched.
                await asyncio.sleep(min(self._poll_s, remaining))
                await self._watch(watch)
        else:
            # One last look: the product may have fallen before the jam or timeout.
            await self._watch(watch)
        if not watch.dropped and outcome is MotorOutcome.TURNED:
            detail += f"; no drop within {drop_timeout_s:.2f} s"
        log.info(
            "VMC96 slot (%d, %d): %s, dropped=%s (%s)",
            row,
            col,
            outcome.value,
            watch.dropped,
            detail,
        )
        return TurnResult(outcome, watch.dropped, detail)

    async def _baseline(self) -> DropWatch:
        """Read the drop sensor before RUN, waiting a little for a blocked beam to clear."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + T_BEAM_SETTLE_S
        while True:
            samples = await self.opto_samples()
            received = loop.time()
            if not samples[-1] or received >= give_up:
                if samples[-1]:
                    log.warning("VMC96: drop sensor blocked at the start of a turn")
                return DropWatch(received)
            await asyncio.sleep(self._poll_s)

    async def _watch(self, watch: DropWatch) -> None:
        sent = asyncio.get_running_loop().time()
        watch.update(await self.opto_samples(), sent)

    async def _stop_after_cancel(self) -> None:
        """Stop the motor of a cancelled turn, best effort; never raises."""
        try:
            async with asyncio.timeout(T_STOP_ON_CANCEL_S):
                await self.request(STOP_ALL)
        except (TimeoutError, MotorBoardOffline, MotorProtocolError) as exc:
            log.warning("VMC96: could not stop motors after a cancelled turn: %s", exc)
