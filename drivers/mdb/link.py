"""The two ways MDB words reach the line (../shared/contracts/mdb-sim-link.md).

* ``StreamLink``: the PARMRK byte encoding over a byte stream: a pty (or any tty) path, or
  ``socket://host:port`` (pyserial's URL form; a simulator, the HIL rig, a ser2net bridge).
* ``UartLink``: a real UART whose 9th bit is made with stick parity: MARK for the address byte,
  SPACE for the rest, and read back in PARMRK mode, so received bytes use the same encoding.

Links are blocking objects used only from the bus master's line thread: reads wait with
``select.poll`` on the file descriptor, so a busy event loop cannot delay them.
"""

from __future__ import annotations

import abc
import errno
import fcntl
import os
import select
import socket
import struct
import termios
import time
import tty
from urllib.parse import urlsplit

from drivers.errors import LinkClosed, LinkConfigError
from drivers.mdb.codec import encode_command, encode_word

#: Python's termios lacks CMSPAR (Linux "stick" parity); value from <asm-generic/termbits.h>.
CMSPAR = 0o10000000000
#: TIOCGSERIAL/TIOCSSERIAL and ASYNC_LOW_LATENCY from <linux/serial.h>: ask the UART driver to
#: hand received bytes over at once instead of batching them.
TIOCGSERIAL = 0x541E
TIOCSSERIAL = 0x541F
ASYNC_LOW_LATENCY = 1 << 13
SERIAL_STRUCT_FORMAT = "iiIiiiiiHcciHHPHIL"

MDB_BAUD = 9600
READ_CHUNK = 256


class MdbLink(abc.ABC):
    """A blocking MDB line. Only the line thread calls these methods."""

    #: True when bytes leave at the UART's pace (9600 baud), so replies take word times.
    paced = False

    @abc.abstractmethod
    def fileno(self) -> int: ...

    @abc.abstractmethod
    def send_command(self, block: bytes) -> None:
        """Send a VMC command block: mode bit on the first word only."""

    @abc.abstractmethod
    def send_control(self, value: int) -> None:
        """Send ACK/RET/NAK (mode bit 0)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def send_break(self, duration_s: float) -> bool:
        """A bus-wide reset; False where the link cannot carry a BREAK (simulated links)."""
        return False

    def read(self, timeout_s: float) -> bytes:
        """Bytes available within ``timeout_s`` (b"" on timeout). Raises LinkClosed at EOF."""
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        events = poller.poll(max(0.0, timeout_s) * 1000.0)
        if not events:
            return b""
        try:
            data = os.read(self.fileno(), READ_CHUNK)
        except BlockingIOError:
            return b""
        except OSError as exc:
            # A pty whose other side closed reads EIO.
            raise LinkClosed(f"link read failed: {exc}") from exc
        if not data:
            raise LinkClosed("link closed by the other side")
        return data

    def discard_input(self) -> bytes:
        """Drop whatever is waiting (stale bytes of a late reply); return it for the trace."""
        dropped = bytearray()
        while True:
            chunk = self.read(0.0)
            if not chunk:
                return bytes(dropped)
            dropped += chunk

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fileno(), view)
            except BlockingIOError:
                select.select([], [self.fileno()], [], 0.05)
                continue
            except OSError as exc:
                raise LinkClosed(f"link write failed: {exc}") from exc
            view = view[n:]


class StreamLink(MdbLink):
    """PARMRK-encoded words over a pty/tty path or ``socket://host:port``."""

    def __init__(self, port: str, *, connect_timeout_s: float = 5.0) -> None:
        self.port = port
        self._sock: socket.socket | None = None
        self._fd = -1
        if port.startswith("socket://"):
            parts = urlsplit(port)
            if not parts.hostname or not parts.port:
                raise LinkConfigError(f"expected socket://host:port, found {port!r}")
            try:
                sock = socket.create_connection((parts.hostname, parts.port), connect_timeout_s)
            except OSError as exc:
                raise LinkConfigError(f"cannot connect to {port}: {exc}") from exc
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            self._sock = sock
            self._fd = sock.fileno()
        else:
            try:
                self._fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            except OSError as exc:
                raise LinkConfigError(f"cannot open {port}: {exc}") from exc
            if os.isatty(self._fd):
                tty.setraw(self._fd)

    def fileno(self) -> int:
        if self._fd < 0:
            raise LinkClosed("link is closed")
        return self._fd

    def send_command(self, block: bytes) -> None:
        self._write_all(encode_command(block))

    def send_control(self, value: int) -> None:
        self._write_all(encode_word(value))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        elif self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


class UartLink(MdbLink):
    """A real UART, 9600 8-bit + stick parity as the 9th bit, received in PARMRK mode.

    pyserial opens and sets the port up once; after that only termios is used, because pyserial
    re-runs its whole set-up (and clears PARMRK) whenever one of its attributes changes.
    """

    paced = True

    def __init__(self, port: str) -> None:
        import serial  # imported here: only real-UART set-ups need pyserial's termios set-up

        self.port = port
        try:
            self._serial = serial.Serial(port, baudrate=MDB_BAUD, bytesize=8, timeout=0)
        except (serial.SerialException, OSError) as exc:
            raise LinkConfigError(f"cannot open UART {port}: {exc}") from exc
        self._fd: int = int(self._serial.fileno())
        attrs = termios.tcgetattr(self._fd)
        iflag, _oflag, cflag = attrs[0], attrs[1], attrs[2]
        # Receive: SPACE parity checked (INPCK) and marked (PARMRK): a mode-bit byte has a
        # parity "error" and reads FF 00 X; a literal FF reads FF FF. BREAK is ignored.
        iflag |= termios.INPCK | termios.PARMRK | termios.IGNBRK
        iflag &= ~(termios.IGNPAR | termios.ISTRIP | termios.BRKINT | termios.IXON | termios.IXOFF)
        cflag |= termios.PARENB | CMSPAR | termios.CLOCAL | termios.CREAD
        cflag &= ~(termios.PARODD | termios.CRTSCTS)
        attrs[0], attrs[2] = iflag, cflag
        termios.tcsetattr(self._fd, termios.TCSANOW, attrs)
        self._space_attrs = attrs
        self._mark_attrs = list(attrs)
        self._mark_attrs[2] = cflag | termios.PARODD
        self._set_low_latency()

    def _set_low_latency(self) -> None:
        try:
            buf = bytearray(struct.calcsize(SERIAL_STRUCT_FORMAT))
            fcntl.ioctl(self._fd, TIOCGSERIAL, buf, True)
            fields = list(struct.unpack(SERIAL_STRUCT_FORMAT, buf))
            fields[4] |= ASYNC_LOW_LATENCY  # the "flags" member
            fcntl.ioctl(self._fd, TIOCSSERIAL, struct.pack(SERIAL_STRUCT_FORMAT, *fields))
        except OSError as exc:
            if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.EPERM):
                raise

    def fileno(self) -> int:
        return self._fd

    def send_command(self, block: bytes) -> None:
        # MARK parity for the address byte, SPACE for the rest; drain between so the parity
        # change cannot overtake bytes still in the UART's FIFO.
        termios.tcsetattr(self._fd, termios.TCSANOW, self._mark_attrs)
        self._write_all(block[:1])
        termios.tcdrain(self._fd)
        termios.tcsetattr(self._fd, termios.TCSANOW, self._space_attrs)
        self._write_all(block[1:])
        termios.tcdrain(self._fd)

    def send_control(self, value: int) -> None:
        self._write_all(bytes((value,)))
        termios.tcdrain(self._fd)

    def send_break(self, duration_s: float) -> bool:
        termios.tcsendbreak(self._fd, 0)  # Linux sends 0.25-0.5 s: longer than MDB's 100 ms
        time.sleep(max(0.0, duration_s - 0.25))
        return True

    def close(self) -> None:
        if self._fd >= 0:
            self._serial.close()
            self._fd = -1


def open_link(kind: str, port: str) -> MdbLink:
    """Open the link the configuration names; the daemon never guesses the kind."""
    if kind == "stream":
        return StreamLink(port)
    if kind == "uart":
        if port.startswith("socket://"):
            raise LinkConfigError('a socket:// port carries no parity: use link = "stream"')
        return UartLink(port)
    raise LinkConfigError(f"unknown MDB link kind {kind!r} (expected 'uart' or 'stream')")
