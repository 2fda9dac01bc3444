"""One exception root for everything the hardware layer raises.

Each subclass carries the bytes or code that failed, so a log line or a test can show exactly
what was on the wire.
"""

from __future__ import annotations


class DriverError(Exception):
    """Root of every error raised by ``drivers``."""


class MdbError(DriverError):
    """Root of every MDB error."""


class FramingError(MdbError):
    """Bytes on the link that are not a valid MDB word stream or block."""

    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(f"{message} (raw {raw.hex(' ') or '-'})")
        self.raw = raw


class ChecksumError(FramingError):
    """A block whose CHK byte does not match the sum of the bytes before it."""


class BlockTooLong(FramingError):
    """A block longer than the 36 bytes MDB allows."""


class NoResponse(MdbError):
    """The peripheral did not answer within the MDB response window, after every retry."""

    def __init__(self, address: int, attempts: int) -> None:
        super().__init__(f"no response from MDB address 0x{address:02X} after {attempts} attempts")
        self.address = address
        self.attempts = attempts


class NakReceived(MdbError):
    """The peripheral answered NAK to every attempt."""

    def __init__(self, address: int, attempts: int) -> None:
        super().__init__(f"MDB address 0x{address:02X} answered NAK {attempts} times")
        self.address = address
        self.attempts = attempts


class LinkClosed(MdbError):
    """The link was closed (daemon stopping, port unplugged)."""


class LinkConfigError(DriverError):
    """A link description that cannot be opened as written."""


class MotorError(DriverError):
    """Root of every motor board error."""
