"""CRC-16/ARC, the checksum of EVA-DTS: the report's G85 segment and the DEX/UCS link blocks.

Reflected polynomial 0xA001 (x^16 + x^15 + x^2 + 1), initial value 0, no final xor; the
catalogue's check value for ``b"123456789"`` is 0xBB3D."""

from __future__ import annotations

from typing import Final

POLYNOMIAL_REFLECTED: Final = 0xA001


def _table() -> tuple[int, ...]:
    entries = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ POLYNOMIAL_REFLECTED if crc & 1 else crc >> 1
        entries.append(crc)
    return tuple(entries)


_TABLE: Final = _table()


def crc16_arc(data: bytes, crc: int = 0) -> int:
    """CRC-16/ARC of ``data``; pass a previous result as ``crc`` to continue over more bytes."""
    for byte in data:
        crc = (crc >> 8) ^ _TABLE[(crc ^ byte) & 0xFF]
    return crc
