"""A simulated MDB bus: peripherals served over a pty or TCP in the PARMRK encoding.

One thread reads the VMC's words, hands each peripheral's command framer the same words (each
answers only blocks for its address), and writes the replies back, optionally at 9600-baud word
pace (../shared/contracts/mdb-sim-link.md "Timing"). Faults configured on a peripheral are
applied here, where the bytes are written.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
import tty
from dataclasses import dataclass, field

from drivers.mdb.block import (
    ACK,
    CommandEvent,
    CommandFramer,
    CommandReceived,
    ControlReceived,
    reply_block,
)
from drivers.mdb.codec import WordDecoder, encode_word
from hil.sim.peripheral import SimPeripheral

#: One 11-bit word at 9600 baud: the pace of replies when timing is emulated.
WORD_TIME_S = 11 / 9600
#: With timing emulated, how long after the command's last word a peripheral starts answering
#: (MDB allows up to 5 ms; real peripherals typically take around 1 ms).
RESPONSE_DELAY_S = 0.001
#: How often the serving thread wakes to check for a stop request.
SERVE_WAKE_S = 0.1
#: Most ACK-turnaround samples kept (the benchmark reads them).
MAX_SAMPLES = 2_000_000


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
        self._decoder = WordDecoder()
        self._framers = {p.ADDRESS: CommandFramer(p.ADDRESS, p.length_of()) for p in peripherals}
        self._by_address = {p.ADDRESS: p for p in peripherals}
        self._awaiting: SimPeripheral | None = None  # sent data, waiting for ACK/RET
        self._reply_done_ns = 0
        self._fd = -1
        self._slave_fd = -1
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def on_pty(cls, peripherals: list[SimPeripheral], *, timing: bool = False) -> SimBus:
        bus = cls(peripherals, timing=timing)
        master_fd, slave_fd = os.openpty()
        tty.setraw(master_fd)
        tty.setraw(slave_fd)
        bus._fd = master_fd
        # Keep the slave open ourselves, so the VMC may close and reopen it without the
        # master side reading EIO in between.
        bus._slave_fd = slave_fd
        bus.port = os.ttyname(slave_fd)
        return bus

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
        listener = socket.create_server((host, port))
        bus._listener = listener
        bound_host, bound_port = listener.getsockname()[:2]
        bus.port = f"socket://{bound_host}:{bound_port}"
        return bus

    def peripheral(self, name: str) -> SimPeripheral:
        for p in self.peripherals:
            if p.NAME == name:
                return p
        raise KeyError(f"no simulated device named {name!r}")

    # --- running ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="mdb-sim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        # A TCP connection's fd belongs to its socket object, closed below: never close it twice.
        own_fds = (self._slave_fd,) if self._listener is not None else (self._fd, self._slave_fd)
        for fd in own_fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._slave_fd = -1
        for sock in (self._conn, self._listener):
            if sock is not None:
                sock.close()
        self._conn = self._listener = None

    def __enter__(self) -> SimBus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stop.is_set():
            fd = self._current_fd()
            if fd < 0:
                continue
            ready, _, _ = select.select([fd], [], [], SERVE_WAKE_S)
            if not ready:
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

    def _current_fd(self) -> int:
        if self._listener is None:
            return self._fd
        if self._conn is None:
            ready, _, _ = select.select([self._listener], [], [], SERVE_WAKE_S)
            if not ready:
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
        reply = peripheral.answer(command)
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
        self._reply_done_ns = time.perf_counter_ns() if data else 0

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
