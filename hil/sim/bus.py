"""A simulated MDB bus: peripherals served over a pty or TCP in the PARMRK encoding.

One thread reads the VMC's words, hands each peripheral's command framer the same words (each
answers only blocks for its address), and writes the replies back, optionally at 9600-baud word
pace (the MDB word-stream contract, mdb-sim-link, "Timing"). Faults configured on a peripheral
are applied here, where the bytes are written.

A late reply is a sleep of this thread before it writes: commands that arrive meanwhile (the
VMC's retransmission of the same command) wait in the link's buffer and are answered after it,
as a real peripheral that was slow to answer would: a second copy of the same data, since the
first was not ACKed yet.

``drop_link`` makes the port disappear and come back (a USB adapter pulled and plugged in, a
ser2net bridge restarting): the devices keep their state meanwhile, as physical ones would.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import threading
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.mdb.block import (
    ACK,
    NAK,
    CommandEvent,
    CommandFramer,
    CommandReceived,
    ControlReceived,
    reply_block,
)
from drivers.mdb.codec import WordDecoder, encode_word
from hil.sim.control import write_link_file
from hil.sim.peripheral import SimPeripheral
from hil.sim.state import SimStateFile

#: One 11-bit word at 9600 baud: the pace of replies when timing is emulated.
WORD_TIME_S = 11 / 9600
#: With timing emulated, how long after the command's last word a peripheral starts answering
#: (MDB allows up to 5 ms; real peripherals typically take around 1 ms).
RESPONSE_DELAY_S = 0.001
#: How often the serving thread wakes to check for a stop request.
SERVE_WAKE_S = 0.1
#: Most ACK-turnaround samples kept (the benchmark reads them).
MAX_SAMPLES = 2_000_000
#: Longest ``drop_link`` outage accepted (a test or rig asking for more has a typo).
MAX_LINK_DOWN_S = 3600.0
#: How long ``drop_link`` waits for the serving thread to have closed the link.
DROP_LINK_WAIT_S = 2.0


@dataclass(slots=True)
class BusSamples:
    """Timing seen from the peripherals' side (perf_counter_ns)."""

    ack_turnaround_ns: list[int] = field(default_factory=list)  # reply's last word -> ACK read
    command_arrival_ns: list[int] = field(default_factory=list)  # POLL arrival times


class SimBus:
    """Serve simulated peripherals on one byte-stream link."""

    def __init__(self, peripherals: list[SimPeripheral], *, timing: bool = False) -> None:
        self.peripherals = list(peripherals)
        self.timing = timing
        self.port = ""
        self.samples = BusSamples()
        self.record_samples = False
        #: Where the physical state is kept across runs (``--state``); None: nowhere.
        self.state_file: SimStateFile | None = None
        #: Where the pty path is published (``--pty-link``); rewritten after ``drop_link``.
        self.link_file: Path | None = None
        self.link_drops = 0
        self._decoder = WordDecoder()
        self._framers = self._new_framers()
        self._by_address = {p.ADDRESS: p for p in peripherals}
        self._awaiting: SimPeripheral | None = None  # sent data, waiting for ACK/RET
        self._reply_done_ns = 0
        self._kind = ""  # "pty" or "tcp"
        self._fd = -1
        self._slave_fd = -1
        self._tcp_address: tuple[str, int] = ("", 0)
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()
        # drop_link: the control thread asks, the serving thread (which owns the fds) does it.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._drop_request_s: float | None = None
        self._link_dropped = threading.Event()
        self._link_up = True

    def _new_framers(self) -> dict[int, CommandFramer]:
        return {p.ADDRESS: CommandFramer(p.ADDRESS, p.length_of()) for p in self.peripherals}

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def on_pty(cls, peripherals: list[SimPeripheral], *, timing: bool = False) -> SimBus:
        bus = cls(peripherals, timing=timing)
        bus._kind = "pty"
        bus._open_pty()
        return bus

    def _open_pty(self) -> None:
        master_fd, slave_fd = os.openpty()
        tty.setraw(master_fd)
        tty.setraw(slave_fd)
        self._fd = master_fd
        # Keep the slave open ourselves, so the VMC may close and reopen it without the
        # master side reading EIO in between.
        self._slave_fd = slave_fd
        self.port = os.ttyname(slave_fd)

    @classmethod
    def on_tcp(
        cls,
        peripherals: list[SimPeripheral],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        timing: bool = False,
    ) -> SimBus:
        bus = cls(peripherals, timing=timing)
        bus._kind = "tcp"
        listener = socket.create_server((host, port))
        bus._listener = listener
        bound_host, bound_port = listener.getsockname()[:2]
        # Listen again on the very same port after drop_link, even when the OS chose it.
        bus._tcp_address = (bound_host, bound_port)
        bus.port = f"socket://{bound_host}:{bound_port}"
        return bus

    def peripheral(self, name: str) -> SimPeripheral:
        for p in self.peripherals:
            if p.NAME == name:
                return p
        raise KeyError(f"no simulated device named {name!r}")

    def publish_link_file(self, path: Path | str) -> None:
        """Write the pty path to ``path`` now and again whenever the pty is replaced."""
        self.link_file = Path(path)
        write_link_file(self.link_file, self.port)

    def save_state(self) -> None:
        """Keep the devices' physical state in the state file, if there is one and it changed.
        A failed write is reported and tried again at the next change: the bus keeps serving."""
        if self.state_file is None:
            return
        try:
            self.state_file.save_if_changed()
        except OSError as exc:
            print(f"hil.sim: cannot save state to {self.state_file.path}: {exc}", file=sys.stderr)

    # --- running ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="mdb-sim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        self._close_link()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _close_link(self) -> None:
        """Close the VMC's way in: the pty (both sides) or the TCP connection and listener."""
        with self._write_lock:
            # A TCP connection's fd belongs to its socket object: never close it twice.
            own_fds = (self._fd, self._slave_fd) if self._kind == "pty" else (self._slave_fd,)
            for fd in own_fds:
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._fd = self._slave_fd = -1
            for sock in (self._conn, self._listener):
                if sock is not None:
                    sock.close()
            self._conn = self._listener = None

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    # --- the port disappears and comes back ------------------------------------------------

    def drop_link(self, seconds: float) -> dict[str, Any]:
        """Close the link now and offer it again ``seconds`` later. Returns once it is closed.

        pty: the VMC side reads end-of-file (hang-up); a new pty is opened afterwards and its
        path written to the link file. TCP: the connection and the listening socket close
        (connecting is refused meanwhile); then the same host:port listens again.
        """
        if not 0 <= seconds <= MAX_LINK_DOWN_S:
            raise ValueError(f"drop_link: seconds must be 0..{MAX_LINK_DOWN_S}: {seconds}")
        if self._thread is None:
            raise RuntimeError("drop_link: the bus is not serving")
        if not self._link_up or self._drop_request_s is not None:
            raise RuntimeError("drop_link: the link is already down")
        old_port = self.port
        self._link_dropped.clear()
        self._drop_request_s = seconds
        self._wake()
        if not self._link_dropped.wait(DROP_LINK_WAIT_S):
            raise RuntimeError("drop_link: the serving thread did not close the link in time")
        return {"port": old_port, "down_s": seconds, "drops": self.link_drops}

    def link_status(self) -> dict[str, Any]:
        return {
            "up": self._link_up,
            "port": self.port,
            "kind": self._kind,
            "drops": self.link_drops,
        }

    def _drop_and_reopen(self, seconds: float) -> None:
        """In the serving thread: close everything, wait, open a new link."""
        self._close_link()
        self._link_up = False
        self.link_drops += 1
        # Words half-read from the old link mean nothing on the new one.
        self._decoder.reset()
        self._framers = self._new_framers()
        self._awaiting = None
        self._reply_done_ns = 0
        self._drop_request_s = None
        self._link_dropped.set()
        if self._stop.wait(seconds):
            return
        while True:
            try:
                if self._kind == "pty":
                    if self._fd < 0:
                        self._open_pty()
                    if self.link_file is not None:
                        write_link_file(self.link_file, self.port)
                else:
                    self._listener = socket.create_server(self._tcp_address)
                break
            except OSError:
                # The port is taken meanwhile (or ptys ran out): try again, as a device
                # plugged into a busy hub would enumerate later.
                if self._stop.wait(SERVE_WAKE_S):
                    return
        self._link_up = True

    def __enter__(self) -> SimBus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._drop_request_s is not None:
                self._drop_and_reopen(self._drop_request_s)
                continue
            fd = self._current_fd()
            if fd < 0:
                continue
            ready, _, _ = select.select([fd, self._wake_r], [], [], SERVE_WAKE_S)
            if self._wake_r in ready:
                self._drain_wake()
            if fd not in ready:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:
                if self._conn is not None:  # TCP client went away: wait for the next one
                    self._conn.close()
                    self._conn = None
                    self._fd = -1
                    continue
                time.sleep(0.01)  # pty with nobody on the other side yet
                continue
            self._on_bytes(data)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 64)

    def _current_fd(self) -> int:
        if self._kind == "pty":
            return self._fd
        if self._listener is None:
            self._stop.wait(SERVE_WAKE_S)  # only while stopping: nothing to serve
            return -1
        if self._conn is None:
            listener_fd = self._listener.fileno()
            ready, _, _ = select.select([listener_fd, self._wake_r], [], [], SERVE_WAKE_S)
            if self._wake_r in ready:
                self._drain_wake()
            if listener_fd not in ready:
                return -1
            conn, _addr = self._listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
            self._fd = conn.fileno()
            self._decoder.reset()
        return self._fd

    def _on_bytes(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        # Word by word, every framer in turn: an ACK for one peripheral and the next command
        # for another often arrive in one read, and must be handled in the order sent.
        for item in self._decoder.feed(data):
            for address, framer in self._framers.items():
                for event in framer.feed((item,)):
                    self._on_event(self._by_address[address], event, now)

    def _on_event(self, peripheral: SimPeripheral, event: CommandEvent, now: int) -> None:
        if isinstance(event, ControlReceived):
            if peripheral is not self._awaiting:
                return
            if (
                self.record_samples
                and event.value == ACK
                and self._reply_done_ns
                and len(self.samples.ack_turnaround_ns) < MAX_SAMPLES
            ):
                self.samples.ack_turnaround_ns.append(now - self._reply_done_ns)
            self._reply_done_ns = 0
            if peripheral.faults.unplugged:
                return
            resend = peripheral.control_word(event.value)
            if event.value != ACK:
                if resend is not None:
                    self._send(peripheral, resend)
            else:
                self._awaiting = None
            self.save_state()
        elif isinstance(event, CommandReceived):
            if self.record_samples and len(self.samples.command_arrival_ns) < MAX_SAMPLES:
                self.samples.command_arrival_ns.append(now)
            self._on_command(peripheral, event)
        # BadCommand: a real peripheral ignores a block it cannot check; the VMC times out and
        # sends it again.

    def _on_command(self, peripheral: SimPeripheral, command: CommandReceived) -> None:
        faults = peripheral.faults
        if faults.unplugged:
            return
        peripheral.reset_if_due()
        if faults.nak_replies > 0:
            # Refused, not carried out: the VMC sends the command again.
            faults.nak_replies -= 1
            with peripheral.lock:
                peripheral.counters.naks_sent += 1
            self._awaiting = None
            self._write_words(peripheral, [encode_word(NAK, True)], data_reply=False)
            return
        reply = peripheral.answer(command)
        peripheral.command_taken()
        self.save_state()
        if reply is None:
            return
        if faults.drop_replies > 0:
            faults.drop_replies -= 1
            return
        self._send(peripheral, reply)

    def _send(self, peripheral: SimPeripheral, data: bytes) -> None:
        faults = peripheral.faults
        words: list[bytes]
        if data:
            block = bytearray(reply_block(data))
            if faults.bad_checksum > 0:
                faults.bad_checksum -= 1
                block[-1] ^= 0x5A
            words = [encode_word(b) for b in block[:-1]] + [encode_word(block[-1], True)]
            self._awaiting = peripheral
        else:
            words = [encode_word(ACK, True)]
            self._awaiting = None
        self._write_words(peripheral, words, data_reply=bool(data))

    def _write_words(self, peripheral: SimPeripheral, words: list[bytes], data_reply: bool) -> None:
        """Write one reply's words, with the garbage and lateness faults applied."""
        faults = peripheral.faults
        if faults.garbage:
            self._write(faults.garbage)
            faults.garbage = b""
        if faults.late_replies > 0:
            faults.late_replies -= 1
            time.sleep(faults.late_by_s)
        if self.timing:
            time.sleep(RESPONSE_DELAY_S)
            for word in words:
                start = time.perf_counter()
                self._write(word)
                _pace_until(start + WORD_TIME_S)
        else:
            self._write(b"".join(words))
        self._reply_done_ns = time.perf_counter_ns() if data_reply else 0

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self._fd, view)
                except BlockingIOError:
                    select.select([], [self._fd], [], 0.05)
                    continue
                except OSError:
                    return  # the VMC side went away; nothing to deliver to
                view = view[n:]


def _pace_until(deadline: float) -> None:
    """Wait until ``deadline`` (perf_counter): sleep most of it, spin the last 0.2 ms."""
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return
        if remaining > 0.0003:
            time.sleep(remaining - 0.0002)
