"""A VMC96 motor board simulator on a pty, for tests, the bench and the field rig.

``Vmc96Model`` is the board without I/O: it answers frames and models the motors, the stock on
each spiral and the drop sensor against an injectable clock. Nothing in it runs on its own:
motor turns are evaluated lazily from the clock whenever the model is asked anything, so a
fake clock gives exact, repeatable behaviour.

``Vmc96Simulator`` owns a pty pair and serves the model on the master side from a dedicated
thread (not an asyncio task): it keeps answering whatever the test's event loop is doing, and
it runs identically inside a test and as a process::

    python -m hil.sim.vmc96 --link-file PATH [--control SOCKET] [--realistic]

writes the pty slave path to PATH and serves until SIGTERM. The optional control socket takes
JSON lines, answered as the MDB simulators' control socket answers (``hil.sim.control``:
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``)::

    {"cmd": "set_stock", "row": 0, "col": 1, "count": 5}
    {"cmd": "fault", "row": 0, "col": 1, "jam": true, "no_motor": false, "missed_drops": 1}
    {"cmd": "fault", "unplugged": true}
    {"cmd": "beam", "blocked": true}
    {"cmd": "ledger"}   -> result {"turns": [[row, col, n], ...], "dropped": [...],
                                   "jams": [...], "stock": [...]}

Model of the board (documented choices where the public VMC96 source is silent):

* RUN starts one turn of ``turn_time_s``; a second RUN while a motor runs is NAKed (one motor
  energised at a time); paired runs are NAKed (not modelled); PULSE is acknowledged, no effect.
* ``jam``: the motor draws stall current and never reaches its home switch until STOP ALL or
  RESET (counted in ``ledger.jams``). ``no_motor``: RUN is acknowledged but nothing runs, and
  SCAN reports the position empty. ``missed_drops=N``: the next N turns that have stock drop
  nothing (the product hangs on the spiral); the following turn drops it. Stock 0: the turn
  completes and nothing falls. ``unplugged``: no replies at all, input is discarded.
* A product that leaves the spiral crosses the beam ``fall_time_s`` after the turn ends and
  interrupts it for ``beam_block_s``. Opto replies carry the last 32 x 40 ms, oldest first.
* Frames to the relay controllers and frames with a bad check get no reply.
* ``set_line_noise(b"...")`` prefixes every reply with garbage (a noisy cable).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import select
import signal
import sys
import threading
import time
import tty
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drivers.errors import MotorError
from drivers.motor import vmc96 as proto
from hil.sim.control import ControlServer

log = logging.getLogger("hil.sim.vmc96")

Slot = tuple[int, int]

#: Fast profile for tests: a turn in 50 ms, the product through the beam 20 ms later.
TURN_TIME_FAST_S = 0.05
FALL_TIME_FAST_S = 0.02
#: Realistic profile: a spiral turn of ~1.5 s, ~0.2 s to fall past the light curtain.
TURN_TIME_REALISTIC_S = 1.5
FALL_TIME_REALISTIC_S = 0.2
#: How long a falling product interrupts the beam (longer than one 40 ms opto sample).
BEAM_BLOCK_S = 0.06
#: Current of a turning spiral motor and of a stalled one (the board saturates at 500 mA).
RUN_CURRENT_MA = 180.0
STALL_CURRENT_MA = 490.0
VERSION_TEXT = b"VMC96-SIM 1.0"

READ_CHUNK = 1024


@dataclass(frozen=True)
class Ledger:
    """What physically happened: completed turns, products that fell, jams stopped."""

    turns: Counter[Slot]
    dropped: Counter[Slot]
    jams: Counter[Slot]


@dataclass
class SlotFaults:
    """Faults of one spiral position."""

    jam: bool = False
    no_motor: bool = False
    missed_drops: int = 0


@dataclass
class _Turn:
    slot: Slot
    started: float
    jammed: bool


@dataclass
class _Beam:
    intervals: list[tuple[float, float]] = field(default_factory=list)
    forced_since: float | None = None


class Vmc96Model:
    """The VMC96 motor array as a pure function of frames, faults and the clock."""

    def __init__(
        self,
        *,
        turn_time_s: float = TURN_TIME_FAST_S,
        fall_time_s: float = FALL_TIME_FAST_S,
        beam_block_s: float = BEAM_BLOCK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.turn_time_s = turn_time_s
        self.fall_time_s = fall_time_s
        self.beam_block_s = beam_block_s
        self._clock = clock
        self._stock: Counter[Slot] = Counter()
        self._faults: dict[Slot, SlotFaults] = {}
        self._turn: _Turn | None = None
        self._beam = _Beam()
        self.unplugged = False
        self._turns: Counter[Slot] = Counter()
        self._dropped: Counter[Slot] = Counter()
        self._jams: Counter[Slot] = Counter()

    # -- controls --

    def set_stock(self, row: int, col: int, count: int) -> None:
        """Products on the spiral at (row, col)."""
        proto.motor_id(row, col)
        if count < 0:
            raise ValueError("stock cannot be negative")
        self._advance()
        self._stock[(row, col)] = count

    def stock(self, row: int, col: int) -> int:
        self._advance()
        return self._stock[(row, col)]

    def set_fault(
        self,
        row: int,
        col: int,
        *,
        jam: bool | None = None,
        no_motor: bool | None = None,
        missed_drops: int | None = None,
    ) -> None:
        """Set (or clear) faults of one position; ``None`` leaves a fault as it is."""
        proto.motor_id(row, col)
        self._advance()
        faults = self._faults.setdefault((row, col), SlotFaults())
        if jam is not None:
            faults.jam = jam
        if no_motor is not None:
            faults.no_motor = no_motor
            if no_motor and self._turn is not None and self._turn.slot == (row, col):
                self._turn = None  # motor pulled out mid-turn: it stops where it is
        if missed_drops is not None:
            if missed_drops < 0:
                raise ValueError("missed_drops cannot be negative")
            faults.missed_drops = missed_drops

    def set_beam_blocked(self, blocked: bool) -> None:
        """Obstruct the drop sensor (dirt, a stuck product) or clear it."""
        now = self._clock()
        if blocked and self._beam.forced_since is None:
            self._beam.forced_since = now
        elif not blocked and self._beam.forced_since is not None:
            self._beam.intervals.append((self._beam.forced_since, now))
            self._beam.forced_since = None

    def ledger(self) -> Ledger:
        self._advance()
        return Ledger(Counter(self._turns), Counter(self._dropped), Counter(self._jams))

    def stock_levels(self) -> dict[Slot, int]:
        self._advance()
        return {slot: n for slot, n in self._stock.items() if n}

    # -- protocol --

    def handle(self, frame: proto.Frame) -> proto.Frame | None:
        """The reply to one request frame, or None when the board stays silent."""
        self._advance()
        if self.unplugged:
            return None
        if frame.controller == proto.CONTROLLER_BROADCAST:
            if frame.code == proto.GLOBAL_RESET.code:
                self._stop()
                return proto.Frame(proto.CONTROLLER_BROADCAST, proto.ACK)
            return None
        if frame.controller != proto.CONTROLLER_MOTOR_ARRAY:
            return None  # relay controllers are not modelled
        return self._motor_command(frame)

    def _motor_command(self, frame: proto.Frame) -> proto.Frame:
        code, data = frame.code, frame.payload
        ack = proto.Frame(proto.CONTROLLER_MOTOR_ARRAY, proto.ACK)
        nak = proto.Frame(proto.CONTROLLER_MOTOR_ARRAY, proto.NAK)

        def reply(payload: bytes) -> proto.Frame:
            return proto.Frame(proto.CONTROLLER_MOTOR_ARRAY, code, payload)

        if data and code not in (proto.RUN.code, proto.PULSE.code):
            return nak
        if code == proto.PING.code:
            return ack
        if code == proto.VERSION.code:
            return reply(VERSION_TEXT)
        if code in (proto.RESET.code, proto.STOP_ALL.code):
            self._stop()
            return ack
        if code == proto.STATUS.code:
            return reply(self._status())
        if code == proto.SCAN.code:
            present = [
                (r, c)
                for r in range(proto.ROWS)
                for c in range(proto.COLS)
                if not self._faults_of((r, c)).no_motor
            ]
            return reply(proto.encode_scan(present))
        if code == proto.OPTO_LINE.code:
            return reply(proto.encode_opto(self.opto_samples()))
        if code == proto.PULSE.code:
            return ack if len(data) == 2 else nak
        if code == proto.RUN.code:
            return ack if len(data) == 1 and self._start_turn(data[0]) else nak
        return nak

    # -- physics --

    def _faults_of(self, slot: Slot) -> SlotFaults:
        return self._faults.get(slot) or SlotFaults()

    def _start_turn(self, mid: int) -> bool:
        try:
            slot = proto.motor_coordinates(mid)
        except MotorError:
            return False
        if self._turn is not None:
            return False
        faults = self._faults_of(slot)
        if faults.no_motor:
            return True  # the board acknowledges, but no load is there to turn
        self._turn = _Turn(slot, self._clock(), jammed=faults.jam)
        return True

    def _advance(self) -> None:
        now = self._clock()
        turn = self._turn
        if turn is not None and not turn.jammed and now >= turn.started + self.turn_time_s:
            ended = turn.started + self.turn_time_s
            self._turn = None
            self._turns[turn.slot] += 1
            if self._stock[turn.slot] > 0:
                faults = self._faults_of(turn.slot)
                if faults.missed_drops > 0:
                    faults.missed_drops -= 1
                else:
                    self._stock[turn.slot] -= 1
                    self._dropped[turn.slot] += 1
                    fall = ended + self.fall_time_s
                    self._beam.intervals.append((fall, fall + self.beam_block_s))
        horizon = now - 2 * proto.OPTO_WINDOW_S
        self._beam.intervals = [iv for iv in self._beam.intervals if iv[1] >= horizon]

    def _stop(self) -> None:
        turn = self._turn
        if turn is not None:
            if turn.jammed:
                self._jams[turn.slot] += 1
            self._turn = None

    def _status(self) -> bytes:
        turn = self._turn
        if turn is None:
            return proto.encode_status(0, ())
        amps = STALL_CURRENT_MA if turn.jammed else RUN_CURRENT_MA
        return proto.encode_status(proto.current_raw(amps), (turn.slot,))

    def opto_samples(self) -> tuple[bool, ...]:
        """The last 1.28 s of the beam, 32 samples of 40 ms, oldest first, ending now."""
        now = self._clock()
        intervals = list(self._beam.intervals)
        if self._beam.forced_since is not None:
            intervals.append((self._beam.forced_since, now))
        samples = []
        for k in range(proto.OPTO_SAMPLES):
            bin_end = now - (proto.OPTO_SAMPLES - 1 - k) * proto.OPTO_SAMPLE_S
            bin_start = bin_end - proto.OPTO_SAMPLE_S
            samples.append(any(s < bin_end and e > bin_start for s, e in intervals))
        return tuple(samples)


class Vmc96Simulator:
    """A VMC96 board on a pty, served from its own thread; controls are thread-safe.

    ``port`` is the pty slave path to give the driver. The simulator keeps its own descriptor
    on the slave open so the master never sees a hang-up between driver sessions.
    """

    def __init__(
        self,
        *,
        turn_time_s: float = TURN_TIME_FAST_S,
        fall_time_s: float = FALL_TIME_FAST_S,
        beam_block_s: float = BEAM_BLOCK_S,
        reply_delay_s: float = 0.0,
        control_path: str | os.PathLike[str] | None = None,
        stock: Mapping[Slot, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = Vmc96Model(
            turn_time_s=turn_time_s, fall_time_s=fall_time_s, beam_block_s=beam_block_s, clock=clock
        )
        for (row, col), count in (stock or {}).items():
            self.model.set_stock(row, col, count)
        self.reply_delay_s = reply_delay_s
        self.control_path = None if control_path is None else os.fspath(control_path)
        self._lock = threading.Lock()
        self._master = -1
        self._slave = -1
        self._port = ""
        self._wake_r = -1
        self._wake_w = -1
        self._control: ControlServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._decoder = proto.FrameDecoder()
        #: Well-formed frames received, answered or not (for tests and the rig's sanity checks).
        self.frames_in = 0
        self._line_noise = b""

    @property
    def port(self) -> str:
        if not self._port:
            raise RuntimeError("simulator not started")
        return self._port

    # -- lifecycle --

    def start(self) -> None:
        """Create the pty (and control socket) and start serving."""
        if self._thread is not None:
            return
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self._port = os.ttyname(self._slave)
        self._wake_r, self._wake_w = os.pipe()
        if self.control_path is not None:
            self._control = ControlServer(self.control_path, self.dispatch)
            self._control.start()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="vmc96-sim", daemon=True)
        self._thread.start()
        log.info("VMC96 simulator on %s", self._port)

    def stop(self) -> None:
        """Stop serving and close the pty (a connected driver sees the port vanish)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        os.write(self._wake_w, b"x")
        thread.join(timeout=5.0)
        self._thread = None
        if self._control is not None:
            self._control.stop()
            self._control = None
        for fd in (self._master, self._slave, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._master = self._slave = self._wake_r = self._wake_w = -1

    def __enter__(self) -> Vmc96Simulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- controls (any thread) --

    def set_stock(self, row: int, col: int, count: int) -> None:
        with self._lock:
            self.model.set_stock(row, col, count)

    def stock(self, row: int, col: int) -> int:
        with self._lock:
            return self.model.stock(row, col)

    def set_fault(
        self,
        row: int,
        col: int,
        *,
        jam: bool | None = None,
        no_motor: bool | None = None,
        missed_drops: int | None = None,
    ) -> None:
        with self._lock:
            self.model.set_fault(row, col, jam=jam, no_motor=no_motor, missed_drops=missed_drops)

    def set_unplugged(self, unplugged: bool) -> None:
        """Unplugged: the board answers nothing (the pty stays, like a dead board on USB)."""
        with self._lock:
            self.model.unplugged = unplugged

    def beam_blocked(self) -> bool:
        """Whether the drop sensor's latest sample is blocked (a product still crossing)."""
        with self._lock:
            return self.model.opto_samples()[-1]

    def set_beam_blocked(self, blocked: bool) -> None:
        with self._lock:
            self.model.set_beam_blocked(blocked)

    def set_line_noise(self, noise: bytes) -> None:
        """Send these bytes before every reply (a noisy cable; exercises the driver's resync)."""
        with self._lock:
            self._line_noise = bytes(noise)

    def ledger(self) -> Ledger:
        with self._lock:
            return self.model.ledger()

    # -- the serving thread --

    def _serve(self) -> None:
        try:
            while not self._stopping:
                readable, _, _ = select.select([self._master, self._wake_r], [], [])
                if self._master in readable:
                    self._on_line_bytes()
        except Exception:
            log.exception("VMC96 simulator thread failed")
            raise

    def _on_line_bytes(self) -> None:
        try:
            data = os.read(self._master, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            time.sleep(0.01)  # no slave open: not expected while we hold one; do not spin
            return
        for frame in self._decoder.feed(data):
            self.frames_in += 1
            with self._lock:
                answer = self.model.handle(frame)
                noise = self._line_noise
            if answer is None:
                continue
            if self.reply_delay_s:
                time.sleep(self.reply_delay_s)
            self._write_line(noise + proto.encode_frame(answer))

    def _write_line(self, raw: bytes) -> None:
        view = memoryview(raw)
        while view:
            try:
                written = os.write(self._master, view)
            except BlockingIOError:
                log.debug("VMC96 simulator: pty full, reply dropped (nobody reading)")
                return
            view = view[written:]

    def dispatch(self, request: dict[str, object]) -> dict[str, object]:
        """One control request (see the module docstring); raises on a bad one."""
        cmd = request.get("cmd")
        if cmd == "ping":
            return {}
        if cmd == "set_stock":
            self.set_stock(_int(request, "row"), _int(request, "col"), _int(request, "count"))
            return {}
        if cmd == "fault":
            if "unplugged" in request:
                self.set_unplugged(_bool(request, "unplugged"))
            if "row" in request or "col" in request:
                self.set_fault(
                    _int(request, "row"),
                    _int(request, "col"),
                    jam=_bool(request, "jam") if "jam" in request else None,
                    no_motor=_bool(request, "no_motor") if "no_motor" in request else None,
                    missed_drops=(
                        _int(request, "missed_drops") if "missed_drops" in request else None
                    ),
                )
            return {}
        if cmd == "beam":
            self.set_beam_blocked(_bool(request, "blocked"))
            return {}
        if cmd == "ledger":
            with self._lock:
                ledger = self.model.ledger()
                stock = self.model.stock_levels()
            return {
                "turns": _rows(ledger.turns),
                "dropped": _rows(ledger.dropped),
                "jams": _rows(ledger.jams),
                "stock": _rows(stock),
            }
        raise ValueError(f"unknown cmd {cmd!r}")


def _int(request: Mapping[str, object], key: str) -> int:
    value = request[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} must be an integer, found {value!r}")
    return value


def _bool(request: Mapping[str, object], key: str) -> bool:
    value = request[key]
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be true or false, found {value!r}")
    return value


def _rows(counts: Mapping[Slot, int]) -> list[list[int]]:
    return [[row, col, n] for (row, col), n in sorted(counts.items()) if n]


def ledger_counts(rows: object) -> Counter[Slot]:
    """A ledger field from the control socket (``[[row, col, n], ...]``) as a Counter."""
    counts: Counter[Slot] = Counter()
    if isinstance(rows, list):
        for row, col, n in rows:
            counts[(row, col)] = n
    return counts


def _parse_stock(text: str) -> tuple[int, int, int]:
    try:
        row, col, count = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROW,COL,COUNT, found {text!r}") from None
    return row, col, count


def main(argv: Sequence[str] | None = None) -> int:
    """Run a simulator as a process until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m hil.sim.vmc96", description=__doc__)
    parser.add_argument("--link-file", required=True, help="write the pty slave path here")
    parser.add_argument("--control", help="unix socket path for JSON-lines control")
    parser.add_argument("--realistic", action="store_true", help="1.5 s turns, 0.2 s falls")
    parser.add_argument("--turn-time", type=float, help="seconds per turn (overrides profile)")
    parser.add_argument("--reply-delay", type=float, default=0.0, help="seconds before a reply")
    parser.add_argument(
        "--stock", type=_parse_stock, action="append", default=[], metavar="ROW,COL,COUNT"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    turn = TURN_TIME_REALISTIC_S if args.realistic else TURN_TIME_FAST_S
    fall = FALL_TIME_REALISTIC_S if args.realistic else FALL_TIME_FAST_S
    sim = Vmc96Simulator(
        turn_time_s=args.turn_time if args.turn_time is not None else turn,
        fall_time_s=fall,
        reply_delay_s=args.reply_delay,
        control_path=args.control,
        stock={(r, c): n for r, c, n in args.stock},
    )
    # Block the signals before the serving thread exists so only sigwait below receives them.
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    link_file = Path(args.link_file)
    sim.start()
    try:
        staging = link_file.with_name(link_file.name + ".tmp")
        staging.write_text(sim.port + "\n")
        staging.replace(link_file)  # readers never see a half-written path
        received = signal.sigwait(signals)
        log.info("VMC96 simulator stopping on signal %d", received)
    finally:
        sim.stop()
        with contextlib.suppress(FileNotFoundError):
            link_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
